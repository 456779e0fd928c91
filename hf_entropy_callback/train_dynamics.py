"""Per-example training dynamics of the whole training set, for free: `TrainDynamicsMixin` for any `Trainer`.

The training forward already computes every training example's logits each time the example is seen.
With the mixin (opt-in: ``record_train_dynamics=True``) the Trainer keeps, for every example of every
micro-batch, its log-probabilities and the unweighted cross-entropy of its label, keyed by a stable
example index, and writes one file per epoch to ``<output_dir>/train_dynamics/`` (format and loader:
`hf_entropy_callback.cartography`). These are **train-mode** records (dropout on, weights before the
step's update), labelled so in every file; the tracked points of `AnnotationEntropyCallback` are eval
mode and stay separate.

How it stays cheap and exact:

- the index: `add_example_index` (or the Trainer itself, for a `datasets.Dataset`) adds the column
  ``example_index``; the mixin adds it to the columns `remove_unused_columns` keeps, and pops it
  from the batch before the model's forward, so the model never sees it;
- the records: in `compute_loss`, from the logits the forward returned, detached, with no device
  sync; they stay on the device until an epoch end or a checkpoint, where every process's records
  are gathered once (``accelerator.gather``, padded to equal length first), moved to the host of the
  world process zero, and the duplicates that distributed samplers add to even out the last batch
  are dropped (first sighting kept);
- gradient accumulation: every micro-batch's examples are recorded, with the optimizer step they
  contribute to;
- resume: each checkpoint holds the records of the epoch in progress
  (``checkpoint-N/train_dynamics/partial-epoch-EEEE.parquet``); `train(resume_from_checkpoint=...)`
  picks them up, so a resumed run writes the same epoch files as an uninterrupted one;
- off (the default), nothing changes: no column, no callback, `compute_loss` is the parent's.

Use it with any Trainer subclass whose `compute_loss(..., return_outputs=True)` returns the model's
outputs with `logits` of shape (batch, classes): put the mixin FIRST, before the class that defines
`compute_loss`, so that its `compute_loss` wraps that one::

    class MyTrainer(TrainDynamicsMixin, Trainer):  # or (TrainDynamicsMixin, YourTrainerSubclass)
        pass

    trainer = MyTrainer(model=model, args=args, train_dataset=train, record_train_dynamics=True)
    trainer.train()
    records = load_train_dynamics(args.output_dir)

`ClassWeightedTrainer` has it built in.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .cartography import TRAIN_DYNAMICS_DIRNAME, _read_records_file, epoch_file_name, logprob_columns, write_records
from .labels import model_label_names
from .runs import _pid_alive
from .tracker import ID_COLUMNS, _logits_of, unwrap_model

logger = logging.getLogger(__name__)

EXAMPLE_INDEX_COLUMN = "example_index"
_TEMP_RE = re.compile(r"^\.(?:partial-)?epoch-\d+\.parquet\.tmp-(\d+)-")

__all__ = ["EXAMPLE_INDEX_COLUMN", "TrainDynamicsMixin", "add_example_index"]


def add_example_index(dataset, column: str = EXAMPLE_INDEX_COLUMN):
    """The `datasets.Dataset` with its row positions as the int64 column `column` (the stable example index).

    Add it before any `select` / `shuffle` / `filter` whose result you train on, so that the index names
    the same example in every run of the same data. A dataset that already has the column is returned
    unchanged.

    Example:
        >>> import datasets
        >>> list(add_example_index(datasets.Dataset.from_dict({"x": ["a", "b"]}))["example_index"])
        [0, 1]
    """
    if column in dataset.column_names:
        return dataset
    return dataset.add_column(column, np.arange(len(dataset), dtype=np.int64))


class _Recorder:
    """The records of the epoch in progress: on the device between boundaries, on process zero's host after."""

    def __init__(self, trainer, *, folder: Optional[str], index_column: str, example_ids):
        self.trainer = trainer
        self.folder_arg = folder
        self.index_column = index_column
        self.example_ids_arg = example_ids
        self.chunks: List[tuple] = []
        self.host: List[tuple] = []
        self.epoch: Optional[int] = None
        self.epoch_written = False
        self.history_complete = True
        self.restored: Optional[dict] = None
        self.resume_from: Optional[str] = None
        self.active = False
        self.num_labels: Optional[int] = None
        self.ids = None  # (sorted index values, ids in that order) or None

    @property
    def folder(self) -> str:
        return self.folder_arg or os.path.join(self.trainer.args.output_dir, TRAIN_DYNAMICS_DIRNAME)

    # ---- in the training step ----------------------------------------------------------------

    def add(self, index: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, step: int) -> None:
        if logits.ndim != 2 or labels.ndim != 1 or not (labels.shape[0] == logits.shape[0] == index.shape[0]):
            raise ValueError(
                f"record_train_dynamics: needs logits (batch, classes) and one integer label per example; got logits "
                f"{tuple(logits.shape)}, labels {tuple(labels.shape)}, index {tuple(index.shape)}"
            )
        if labels.is_floating_point():
            raise ValueError("record_train_dynamics: needs integer class labels (classification), got float labels")
        with torch.no_grad():
            lp = torch.log_softmax(logits.detach().float(), dim=-1)
            y = labels.detach().to(lp.device, torch.long)
            # The same value F.cross_entropy(reduction="none") gives: unweighted, whatever the training loss was.
            loss = -lp.gather(1, y[:, None])[:, 0]
            idx = index.detach().to(lp.device, torch.long)
            ints = torch.stack([idx, torch.full_like(idx, step), y], dim=1)
            self.chunks.append((ints, torch.cat([loss[:, None], lp], dim=1)))
        self.num_labels = self.num_labels or int(lp.shape[1])

    # ---- at boundaries (every process) -------------------------------------------------------

    def gather(self) -> None:
        """Move every process's records of the device to process zero's host (a collective: all processes call it)."""
        acc = self.trainer.accelerator
        device = self.trainer.args.device
        if self.chunks:
            ints = torch.cat([c[0] for c in self.chunks])
            floats = torch.cat([c[1] for c in self.chunks])
        else:
            k = self.num_labels or getattr(getattr(unwrap_model(self.trainer.model), "config", None), "num_labels", 0)
            ints = torch.zeros((0, 3), dtype=torch.long, device=device)
            floats = torch.zeros((0, 1 + int(k)), dtype=torch.float32, device=device)
        self.chunks = []
        if acc.num_processes > 1:
            counts = acc.gather(torch.tensor([ints.shape[0]], device=ints.device)).cpu().tolist()
            ints = acc.gather(acc.pad_across_processes(ints, dim=0))
            floats = acc.gather(acc.pad_across_processes(floats, dim=0))
            width = max(counts)
            keep = torch.cat([torch.arange(r * width, r * width + n) for r, n in enumerate(counts)]).to(ints.device)
            ints, floats = ints[keep], floats[keep]
        if self.trainer.is_world_process_zero():
            self.host.append((ints.cpu().numpy(), floats.cpu().numpy()))

    # ---- process zero ------------------------------------------------------------------------

    def _host_arrays(self):
        if not self.host:
            return np.zeros((0, 3), np.int64), np.zeros((0, 1 + (self.num_labels or 0)), np.float32)
        return np.concatenate([h[0] for h in self.host]), np.concatenate([h[1] for h in self.host])

    def _records(self):
        """The epoch's records, one per example (its first sighting), sorted by index; and the duplicates dropped."""
        ints, floats = self._host_arrays()
        order = np.argsort(ints[:, 1], kind="stable")  # by step; ties keep process, then batch order
        ints, floats = ints[order], floats[order]
        _, first = np.unique(ints[:, 0], return_index=True)
        dropped = len(ints) - len(first)
        ints, floats = ints[first], floats[first]
        records = {
            "example_index": ints[:, 0],
            "step": ints[:, 1],
            "label": ints[:, 2],
            "loss": floats[:, 0],
            "logprobs": floats[:, 1:],
        }
        if self.ids is not None:
            sorted_index, ids = self.ids
            pos = np.clip(np.searchsorted(sorted_index, ints[:, 0]), 0, max(len(sorted_index) - 1, 0))
            found = sorted_index[pos] == ints[:, 0] if len(sorted_index) else np.zeros(len(ints), bool)
            named = ids[pos] if len(ids) else np.full(len(ints), None, dtype=object)
            named[~found] = None  # an index the id list does not cover
            records["example_id"] = named
        return records, dropped

    def meta(self, epoch: int, complete: bool, dropped: int) -> Dict[str, Any]:
        model = unwrap_model(self.trainer.model)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = model_label_names(inner)
        ds = self.trainer.train_dataset
        return {
            "epoch": int(epoch),
            "epoch_complete": bool(complete),
            "n_examples": len(ds) if hasattr(ds, "__len__") else None,
            "duplicates_dropped": int(dropped),
            "label_names": list(names) if names else None,
            "world_size": int(self.trainer.args.world_size),
            "per_device_train_batch_size": int(self.trainer.args.per_device_train_batch_size),
            "gradient_accumulation_steps": int(self.trainer.args.gradient_accumulation_steps),
            "example_index_column": self.index_column,
            "history_complete": bool(self.history_complete),
        }

    def write_epoch(self, epoch: int, complete: bool) -> None:
        records, dropped = self._records()
        path = os.path.join(self.folder, epoch_file_name(epoch))
        write_records(path, records, self.meta(epoch, complete, dropped))
        logger.info(f"train dynamics: {len(records['loss'])} records of epoch {epoch} written to {path}")

    def write_partial(self, checkpoint: str, complete: bool) -> None:
        ints, floats = self._host_arrays()
        records = {
            "example_index": ints[:, 0],
            "step": ints[:, 1],
            "label": ints[:, 2],
            "loss": floats[:, 0],
            "logprobs": floats[:, 1:],
        }
        meta = dict(
            self.meta(self.epoch, complete, 0),
            partial=True,
            epoch_file_written=self.epoch_written,
            global_step=int(self.trainer.state.global_step),
        )
        write_records(
            os.path.join(checkpoint, TRAIN_DYNAMICS_DIRNAME, epoch_file_name(self.epoch, True)), records, meta
        )

    def resolve_ids(self) -> None:
        """(sorted index values, ids) of the training set, from `example_ids` or the training set's id column."""
        ds, arg = self.trainer.train_dataset, self.example_ids_arg
        columns = getattr(ds, "column_names", None) or []
        if arg is None:
            arg = next((c for c in ID_COLUMNS if c in columns), None)
            if arg is None:
                self.ids = None
                return
        if isinstance(arg, str):
            if arg not in columns:
                raise ValueError(
                    f"record_train_dynamics: example_ids={arg!r} is not a column of the training set {columns}"
                )
            index = np.asarray(ds[self.index_column], dtype=np.int64)
            ids = [str(v) for v in ds[arg]]
        else:
            ids = [str(v) for v in arg]
            if hasattr(ds, "__len__") and len(ids) != len(ds):
                raise ValueError(
                    f"record_train_dynamics: example_ids has {len(ids)} entries, the training set {len(ds)} examples"
                )
            index = np.arange(len(ids), dtype=np.int64)  # a sequence: example_ids[i] names the example of index i
        order = np.argsort(index, kind="stable")
        self.ids = (index[order], np.asarray(ids, dtype=object)[order])

    def restore(self, checkpoint: Optional[str], global_step: int) -> bool:
        """Pick up the records of the epoch in progress saved with `checkpoint` (process zero); False when it has none."""
        folder = os.path.join(checkpoint, TRAIN_DYNAMICS_DIRNAME) if checkpoint else None
        names = (
            sorted(n for n in os.listdir(folder) if n.startswith("partial-epoch-"))
            if folder and os.path.isdir(folder)
            else []
        )
        if not names:
            return False
        frame, meta = _read_records_file(os.path.join(folder, names[-1]))
        frame = frame[frame["step"] <= global_step]  # never the records of steps the resumed run will redo
        k = int(meta["num_labels"])
        self.num_labels = self.num_labels or k
        ints = frame[["example_index", "step", "label"]].to_numpy(np.int64)
        floats = np.concatenate(
            [frame[["loss"]].to_numpy(np.float32), frame[logprob_columns(k)].to_numpy(np.float32)], axis=1
        )
        self.host = [(ints, floats)]
        self.epoch = int(meta["epoch"])
        self.epoch_written = bool(meta.get("epoch_file_written", False))
        self.restored = meta
        self.history_complete = bool(meta.get("history_complete", True))
        return True

    def remove_stale(self, from_epoch: int) -> None:
        """Epoch files of this folder from `from_epoch` on (this run writes them again) and dead writers' temporaries."""
        folder = self.folder
        if not os.path.isdir(folder):
            return
        removed = []
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            m = re.match(r"^epoch-(\d+)\.parquet$", name)
            t = _TEMP_RE.match(name)
            if (m and int(m.group(1)) >= from_epoch) or (t and not _pid_alive(int(t.group(1)))):
                os.remove(path)
                removed.append(name)
        if removed:
            logger.warning(
                f"train dynamics: removed {sorted(removed)} from {folder} (left by an earlier run; rewritten now)"
            )


class _TrainDynamicsCallback(TrainerCallback):
    """Drives the recorder from the Trainer's events (added by `TrainDynamicsMixin`; every process runs it)."""

    def __init__(self, recorder: _Recorder):
        self.rec = recorder
        self.first_epoch = True
        self.restored = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        rec = self.rec
        rec.chunks, rec.host, rec.epoch, rec.epoch_written, rec.history_complete = [], [], None, False, True
        rec.restored = None
        self.first_epoch, self.restored = True, True
        model = unwrap_model(model) if model is not None else None
        config = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "config", None)
        rec.num_labels = getattr(config, "num_labels", None)
        if state.is_world_process_zero:
            rec.resolve_ids()
            if state.global_step > 0:
                self.restored = rec.restore(rec.resume_from, state.global_step)
        rec.active = True

    def on_epoch_begin(self, args, state, control, **kwargs):
        rec = self.rec
        # The Trainer sets epoch = e + (batch + 1) / batches_in_epoch, so at an epoch's start its integer part is
        # the number of epochs done, fresh or resumed mid-epoch.
        epoch = int(state.epoch or 0) + 1
        if state.is_world_process_zero:
            if rec.epoch is not None and rec.epoch < epoch:
                # Resumed from a checkpoint taken at the last step of epoch rec.epoch, before that epoch's file
                # was (known to be) written: its records are all in the checkpoint.
                if not rec.epoch_written:
                    rec.write_epoch(rec.epoch, bool(rec.restored and rec.restored.get("epoch_complete")))
                rec.host = []
                rec.history_complete = True
            if self.first_epoch:
                if not self.restored:
                    self._warn_unrestored(state, epoch)
                rec.remove_stale(epoch)
        self.first_epoch = False
        rec.epoch, rec.epoch_written = epoch, False

    def _warn_unrestored(self, state, epoch: int) -> None:
        rec = self.rec
        where = f"resuming at step {state.global_step} from {rec.resume_from!r}, which holds no train-dynamics records"
        if not float(state.epoch or 0).is_integer():
            rec.history_complete = False
            warnings.warn(
                f"record_train_dynamics: {where} of the epoch in progress: epoch {epoch}'s file will lack the examples "
                "seen before the checkpoint and say history_complete: false",
                RuntimeWarning,
                stacklevel=3,
            )
        elif epoch > 1 and not os.path.isfile(os.path.join(rec.folder, epoch_file_name(epoch - 1))):
            warnings.warn(
                f"record_train_dynamics: {where}, and epoch {epoch - 1}'s file is missing", RuntimeWarning, stacklevel=3
            )

    def on_epoch_end(self, args, state, control, **kwargs):
        rec = self.rec
        rec.gather()
        if state.is_world_process_zero:
            rec.write_epoch(rec.epoch, float(state.epoch or 0).is_integer())
        rec.host, rec.epoch_written, rec.history_complete = [], True, True

    def on_save(self, args, state, control, **kwargs):
        rec = self.rec
        rec.gather()
        if state.is_world_process_zero:
            ckpt = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(ckpt):
                rec.write_partial(ckpt, float(state.epoch or 0).is_integer())
            else:
                logger.warning(f"train dynamics: checkpoint folder {ckpt} not found; its partial epoch is not saved")

    def on_train_end(self, args, state, control, **kwargs):
        self.rec.active = False


class TrainDynamicsMixin:
    """Record every training example's loss and log-probabilities from the training forward, once per epoch.

    Put it first among the bases: ``class MyTrainer(TrainDynamicsMixin, Trainer)`` (or before your own Trainer
    subclass), so that its `compute_loss` wraps the one that computes your loss. That `compute_loss` must
    return the model's outputs with `logits` (batch, classes) when called with ``return_outputs=True`` (the
    base Trainer's does). See the module docstring for what is stored and how.

    Args:
        record_train_dynamics (`bool`, *optional*, defaults to `False`):
            Keep the per-example records of the training forward and write one file per epoch. Off: the
            Trainer behaves exactly as without the mixin.
        train_dynamics_dir (`str`, *optional*): where the epoch files go; default ``<output_dir>/train_dynamics``.
        example_index_column (`str`, *optional*, defaults to `"example_index"`):
            The stable example index. A `datasets.Dataset` without it gets it (its row positions,
            `add_example_index`) when the training dataloader is built; other datasets must yield it in
            every example.
        example_ids (`str` or `Sequence[str]`, *optional*):
            Ids stored beside the index: a column of the training set, or a sequence whose i-th entry names
            the example of index i. Default: the training set's ``example_id`` column when it has one.
        *args, **kwargs: passed on to the next class (the Trainer).
    """

    def __init__(
        self,
        *args,
        record_train_dynamics: bool = False,
        train_dynamics_dir: Optional[str] = None,
        example_index_column: str = EXAMPLE_INDEX_COLUMN,
        example_ids: Union[str, Sequence[str], None] = None,
        **kwargs,
    ):
        # Set before the Trainer's __init__, in case it already calls the methods overridden here.
        self.record_train_dynamics = bool(record_train_dynamics)
        self._train_dynamics: Optional[_Recorder] = None
        super().__init__(*args, **kwargs)
        if self.record_train_dynamics:
            self._train_dynamics = _Recorder(
                self, folder=train_dynamics_dir, index_column=example_index_column, example_ids=example_ids
            )
            self.add_callback(_TrainDynamicsCallback(self._train_dynamics))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self._train_dynamics is not None:
            ckpt = resume_from_checkpoint
            if ckpt is True:
                ckpt = get_last_checkpoint(self.args.output_dir)  # what the Trainer resumes from
            self._train_dynamics.resume_from = ckpt if isinstance(ckpt, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        rec = self._train_dynamics
        if rec is not None and rec.index_column not in self._signature_columns:
            # remove_unused_columns keeps only the forward's arguments (and these): the index must survive it.
            self._signature_columns.append(rec.index_column)

    def get_train_dataloader(self):
        rec = self._train_dynamics
        if rec is not None:
            ds = self.train_dataset
            columns = getattr(ds, "column_names", None)
            if columns is not None and rec.index_column not in columns and hasattr(ds, "add_column"):
                self.train_dataset = add_example_index(ds, rec.index_column)
            elif columns is not None and rec.index_column in columns and hasattr(ds, "__len__"):
                index = np.asarray(ds[rec.index_column])
                if len(np.unique(index)) != len(index):
                    raise ValueError(
                        f"record_train_dynamics: the training set's {rec.index_column!r} column has repeated values; "
                        "each example needs its own index (add_example_index before select / concatenate)"
                    )
        return super().get_train_dataloader()

    def _label_tensor(self, inputs):
        for name in (*(self.label_names or ()), "labels", "label"):
            value = inputs.get(name)
            if isinstance(value, torch.Tensor):
                return value
        return None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The parent's loss; in training, with recording on, the batch's records are kept from its outputs."""
        rec = self._train_dynamics
        if rec is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = dict(inputs)
        index = inputs.pop(rec.index_column, None)
        if not (rec.active and model.training):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if not isinstance(index, torch.Tensor):
            raise ValueError(
                f"record_train_dynamics: the training batch has no {rec.index_column!r} column; give a datasets.Dataset "
                "(the index is added for you) or yield the index in every example"
            )
        labels = self._label_tensor(inputs)  # read before the parent's compute_loss, which may pop them
        if labels is None:
            raise ValueError("record_train_dynamics: the training batch has no labels ('labels' or 'label')")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # The step this micro-batch contributes to: the Trainer counts it once the update is done.
        rec.add(index, labels, _logits_of(outputs, "record_train_dynamics"), self.state.global_step + 1)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        rec = self._train_dynamics
        if rec is not None and rec.index_column in inputs:
            # An evaluation set with the index column keeps it too (same signature columns); the model must not see it.
            inputs = {k: v for k, v in inputs.items() if k != rec.index_column}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
