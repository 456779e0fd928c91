"""`AnnotationEntropyCallback`: per-example loss tracking for any `transformers.Trainer`."""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from .dynamics import accuracy, gold_loss
from .entropy import CATEGORIES, DEFAULT_THRESHOLDS, annotation_entropy, entropy_category
from .peft_setup import count_parameters
from .runs import TRACKING_DIRNAME, Run, RunFormatError, load_run, write_run
from .schedule import tracking_schedule  # noqa: F401  (re-exported: the schedule this callback follows)

logger = logging.getLogger(__name__)

ID_COLUMNS = ("example_id", "uid", "id", "idx")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class _TrackedSet:
    """A tracked set, tokenized once, with everything the run files need."""

    name: str
    example_ids: List[str]
    labels: np.ndarray
    entropy: np.ndarray
    categories: np.ndarray
    label_counts: np.ndarray
    noised: np.ndarray
    features: List[Dict[str, List[int]]]
    token_length: np.ndarray
    order: np.ndarray  # length-sorted positions, so batches need little padding


def _dist():
    """(world size, rank) of torch.distributed, or (1, 0) when not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _find_trainer_frame():
    """The locals of the running `Trainer._inner_training_loop`, if a Trainer called us.

    Callbacks are not handed the Trainer; its frame gives `trainer.log` (so our metrics reach every
    reporting integration) and the `resume_from_checkpoint` path.
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return frame.f_locals
            frame = frame.f_back
    finally:
        del frame
    return None


class AnnotationEntropyCallback(TrainerCallback):
    """Track every tracked example's loss over training and relate it to annotation entropy.

    At step 0 (before the first update), every `track_every` optimizer steps, at every epoch end and
    at the final step (each step at most once) the model is put in eval mode and, without gradients,
    a batched, length-sorted forward pass over each tracked set stores the log-probabilities of all
    classes per example. Under several processes each process takes a shard and the shards are
    gathered, so every example is stored exactly once; only the world process zero writes.
    The trajectory so far is saved with each checkpoint and picked up on resume. At the end of training
    the run directory (see `hf_entropy_callback.runs`) is written to ``<output_dir>/entropy_tracking``.

    At each point the mean loss per entropy category, each set's accuracy and the running Spearman rho
    of entropy vs loss go to the Trainer's log (and so to TensorBoard / W&B).

    Args:
        tracked (`datasets.Dataset` or `Mapping[str, datasets.Dataset]`):
            The tracked examples; a single dataset is named `"train"`. Each needs a label column and an
            `entropy` column (or `label_counts` to compute it), and either the two text columns (then
            the tokenizer is used) or `input_ids` (already tokenized). Optional: an id column
            (`example_id`, `uid`, `id` or `idx`), `category`, `label_counts`, `noised`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Tokenizes text and pads batches (its `padding_side` is respected, e.g. left for decoders).
            Defaults to the Trainer's `processing_class`.
        track_every (`int`, *optional*, defaults to 100):
            Track every this many optimizer steps (0 = only step 0, epoch ends and the final step).
        batch_size (`int`, *optional*, defaults to 64):
            Batch size of the tracking forward passes.
        text_columns (`Sequence[str]`, *optional*, defaults to `("premise", "hypothesis")`):
            One or two text columns, tokenized as a (pair of) sequence(s).
        label_column (`str`, *optional*, defaults to `"label"`): the gold label id column.
        max_length (`int`, *optional*, defaults to 128): truncation length for text columns.
        thresholds (`Tuple[float, float]`, *optional*, defaults to `(0.4, 0.7)`): entropy categories.
        output_dir (`str`, *optional*): where the run directory goes (default: `args.output_dir`).
        run_config (`Mapping`, *optional*): extra configuration stored in the run (model, method, ...).
        log_metrics (`bool`, *optional*, defaults to `True`): send per-point metrics to the Trainer's log.
        nan_policy (`str`, *optional*, defaults to `"record"`):
            `"record"` stores NaN losses and warns (the run summary reports them); `"raise"` stops training.

    Example:
        ```python
        trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                          callbacks=[AnnotationEntropyCallback({"train": chaos_train, "validation": chaos_val})])
        trainer.train()
        run = load_run(args.output_dir)
        ```
    """

    def __init__(
        self,
        tracked,
        tokenizer=None,
        track_every: int = 100,
        batch_size: int = 64,
        text_columns: Sequence[str] = ("premise", "hypothesis"),
        label_column: str = "label",
        max_length: int = 128,
        thresholds=DEFAULT_THRESHOLDS,
        output_dir: Optional[str] = None,
        run_config: Optional[Mapping[str, Any]] = None,
        log_metrics: bool = True,
        nan_policy: str = "record",
    ):
        if not isinstance(tracked, Mapping):
            tracked = {"train": tracked}
        if not tracked:
            raise ValueError("AnnotationEntropyCallback: no tracked set given")
        for name, ds in tracked.items():
            if ds is None or len(ds) == 0:
                raise ValueError(f"AnnotationEntropyCallback: tracked set {name!r} is empty")
        if track_every < 0:
            raise ValueError(f"track_every must be >= 0, got {track_every}")
        if nan_policy not in ("record", "raise"):
            raise ValueError(f"nan_policy must be 'record' or 'raise', got {nan_policy!r}")
        if not 1 <= len(text_columns) <= 2:
            raise ValueError("text_columns must name one or two columns")
        self.raw_sets = dict(tracked)
        self.tokenizer = tokenizer
        self.track_every = int(track_every)
        self.batch_size = int(batch_size)
        self.text_columns = tuple(text_columns)
        self.label_column = label_column
        self.max_length = max_length
        self.thresholds = tuple(thresholds)
        self.output_dir = output_dir
        self.run_config = dict(run_config or {})
        self.log_metrics = log_metrics
        self.nan_policy = nan_policy
        self.sets: Dict[str, _TrackedSet] = {}
        for name, ds in self.raw_sets.items():
            self._check_columns(name, ds)
        self._reset_trajectory()
        self._warned_unlearning = False
        self._nan_warned: set = set()

    # ---- preparation -------------------------------------------------------------------------

    def _reset_trajectory(self):
        self.steps: List[int] = []
        self.epochs: List[float] = []
        self.reasons: List[str] = []
        self.logprobs: Dict[str, List[np.ndarray]] = {name: [] for name in self.raw_sets}

    def _check_columns(self, name: str, ds) -> None:
        cols = ds.column_names
        if self.label_column not in cols:
            raise ValueError(f"tracked set {name!r}: missing label column {self.label_column!r} (columns: {cols})")
        if "entropy" not in cols and "label_counts" not in cols:
            raise ValueError(f"tracked set {name!r}: missing column 'entropy' (or 'label_counts' to compute it)")
        if "input_ids" not in cols:
            missing = [c for c in self.text_columns if c not in cols]
            if missing:
                raise ValueError(f"tracked set {name!r}: missing text columns {missing} and no 'input_ids'")

    def _prepare(self, tokenizer, num_labels: int) -> None:
        if self.sets:
            return
        if tokenizer is None:
            raise ValueError("AnnotationEntropyCallback needs a tokenizer: pass tokenizer= or processing_class= to the Trainer")
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "AnnotationEntropyCallback: the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
                "tokenizer.eos_token and model.config.pad_token_id accordingly) so examples can be batched"
            )
        for name, ds in self.raw_sets.items():
            self.sets[name] = self._build_set(name, ds, tokenizer, num_labels)

    def _build_set(self, name, ds, tokenizer, num_labels) -> _TrackedSet:
        cols = ds.column_names
        n = len(ds)
        id_col = next((c for c in ID_COLUMNS if c in cols), None)
        ids = [str(v) for v in ds[id_col]] if id_col else [f"{name}-{i}" for i in range(n)]
        if len(set(ids)) != n:
            raise ValueError(f"tracked set {name!r}: example ids in column {id_col!r} are not unique")
        labels = np.asarray(ds[self.label_column])
        if labels.dtype.kind not in "iu":
            raise ValueError(f"tracked set {name!r}: labels must be integer ids, got {labels.dtype}")
        bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"tracked set {name!r}: example {ids[i]!r} has label {labels[i]}, outside the model's 0..{num_labels - 1} "
                f"({bad.size} such examples)"
            )
        counts = np.asarray(ds["label_counts"], dtype=np.int64) if "label_counts" in cols else np.zeros((n, num_labels), np.int64)
        if "entropy" in cols:
            entropy = np.asarray(ds["entropy"], dtype=np.float64)
        else:
            entropy = np.asarray(annotation_entropy(counts), dtype=np.float64).reshape(n)
        if np.isnan(entropy).any():
            i = int(np.flatnonzero(np.isnan(entropy))[0])
            raise ValueError(f"tracked set {name!r}: example {ids[i]!r} has no entropy (NaN); only annotated examples can be tracked")
        cats = np.asarray(ds["category"]) if "category" in cols else np.asarray(entropy_category(entropy, self.thresholds)).reshape(n)
        noised = np.asarray(ds["noised"], dtype=bool) if "noised" in cols else np.zeros(n, bool)
        if "input_ids" in cols:
            keep = [c for c in MODEL_INPUTS if c in cols]
            table = {c: ds[c] for c in keep}
            features = [{c: list(table[c][i]) for c in keep} for i in range(n)]
        else:
            texts = [list(ds[c]) for c in self.text_columns]
            enc = tokenizer(*texts, truncation=True, max_length=self.max_length)
            keep = [c for c in MODEL_INPUTS if c in enc]
            features = [{c: enc[c][i] for c in keep} for i in range(n)]
        token_length = np.asarray(
            [sum(f["attention_mask"]) if "attention_mask" in f else len(f["input_ids"]) for f in features], dtype=np.int64
        )
        order = np.argsort(-token_length, kind="stable")
        return _TrackedSet(name, ids, labels.astype(np.int64), entropy, cats, counts, noised, features, token_length, order)

    # ---- the forward pass --------------------------------------------------------------------

    def _forward_inputs(self, model) -> set:
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(target.forward).parameters
        return {k for k in MODEL_INPUTS if k in params}

    @torch.no_grad()
    def compute_logprobs(self, model, tset: _TrackedSet) -> np.ndarray:
        """Log-probabilities (examples, classes) of one tracked set; sharded over processes and gathered."""
        world, rank = _dist()
        device = next(model.parameters()).device
        accepted = self._forward_inputs(model)
        mine = tset.order[rank::world]
        out = []
        for start in range(0, len(mine), self.batch_size):
            idx = mine[start : start + self.batch_size]
            feats = [{k: v for k, v in tset.features[i].items() if k in accepted} for i in idx]
            batch = self.tokenizer.pad(feats, padding=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items() if k in accepted}
            logits = model(**batch).logits
            out.append(F.log_softmax(logits.float(), dim=-1).cpu())
        num_labels = int(getattr(model.config, "num_labels", 0) or (out[0].shape[-1] if out else 0))
        local = torch.cat(out) if out else torch.empty((0, num_labels))
        result = np.full((len(tset.labels), num_labels), np.nan, dtype=np.float32)
        if world == 1:
            result[mine] = local.numpy()
            return result
        # Every process takes part (a forward on one process only would hang FSDP / ZeRO-3); shards are
        # padded to one size for all_gather and the padding is dropped by index, so none is stored twice.
        width = math.ceil(len(tset.labels) / world)
        gather_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        vals = torch.full((width, num_labels), float("nan"), device=gather_device)
        vals[: len(mine)] = local.to(gather_device)
        index = torch.full((width,), -1, dtype=torch.long, device=gather_device)
        index[: len(mine)] = torch.as_tensor(mine, device=gather_device)
        all_vals = [torch.empty_like(vals) for _ in range(world)]
        all_index = [torch.empty_like(index) for _ in range(world)]
        torch.distributed.all_gather(all_vals, vals)
        torch.distributed.all_gather(all_index, index)
        for v, i in zip(all_vals, all_index):
            ok = i >= 0
            result[i[ok].cpu().numpy()] = v[ok].cpu().numpy()
        return result

    # ---- recording ---------------------------------------------------------------------------

    def _record(self, args, state, model, reason: str) -> None:
        step = int(state.global_step)
        if self.steps and self.steps[-1] == step:
            if reason not in self.reasons[-1].split("+"):
                self.reasons[-1] += "+" + reason
            return
        was_training = model.training
        model.eval()
        try:
            current = {name: self.compute_logprobs(model, tset) for name, tset in self.sets.items()}
        finally:
            if was_training:
                model.train()
        self.steps.append(step)
        self.epochs.append(float(state.epoch or 0.0))
        self.reasons.append(reason)
        for name, lp in current.items():
            self.logprobs[name].append(lp)
        self._check_nan(step, current)
        if self.log_metrics:
            self._log(args, state, self.point_metrics(-1))

    def _check_nan(self, step: int, current: Mapping[str, np.ndarray]) -> None:
        for name, lp in current.items():
            bad = np.isnan(lp).any(axis=1)
            if bad.any():
                ids = [self.sets[name].example_ids[i] for i in np.flatnonzero(bad)[:5]]
                msg = f"NaN loss on {int(bad.sum())} tracked examples of set {name!r} at step {step} (e.g. {ids})"
                if self.nan_policy == "raise":
                    raise FloatingPointError(msg)
                if name not in self._nan_warned:  # once per set: later points usually stay NaN
                    self._nan_warned.add(name)
                    warnings.warn(msg + "; recorded as NaN, the run summary reports them", RuntimeWarning, stacklevel=3)

    def losses(self, name: str) -> np.ndarray:
        """Gold-label cross-entropy so far, shape (points, examples)."""
        if not self.logprobs[name]:
            return np.zeros((0, len(self.sets[name].labels)))
        return gold_loss(np.stack(self.logprobs[name]), self.sets[name].labels)

    def point_metrics(self, point: int = -1) -> Dict[str, float]:
        """Metrics of one tracking point: mean loss per category, accuracy per set, Spearman rho."""
        from scipy.stats import spearmanr

        metrics: Dict[str, float] = {}
        for k, (name, tset) in enumerate(self.sets.items()):
            loss = self.losses(name)[point]
            lp = self.logprobs[name][point]
            metrics[f"entropy/{name}_accuracy"] = accuracy(lp, tset.labels)
            metrics[f"entropy/{name}_loss"] = float(np.mean(loss))
            if k > 0:
                continue  # per-category curves and rho for the first (training) set only
            for cat in CATEGORIES:
                m = tset.categories == cat
                if m.any():
                    metrics[f"entropy/{name}_loss_{cat}"] = float(loss[m].mean())
            ok = np.isfinite(loss)
            if ok.sum() > 2 and np.ptp(loss[ok]) > 0 and np.ptp(tset.entropy[ok]) > 0:
                metrics["entropy/spearman_rho"] = float(spearmanr(tset.entropy[ok], loss[ok]).statistic)
        return metrics

    def _log(self, args, state, metrics: Dict[str, float]) -> None:
        first = next(iter(self.sets))
        key = f"entropy/{first}_loss_contested"
        if not self._warned_unlearning and key in metrics and len(self.steps) > 1:
            start = float(self.losses(first)[0][self.sets[first].categories == "contested"].mean())
            if metrics[key] > start:
                self._warned_unlearning = True
                logger.warning(
                    "Un-learning: the contested examples' mean loss %.4f at step %d is above its value at the first "
                    "tracking point (%.4f).",
                    metrics[key],
                    self.steps[-1],
                    start,
                )
        frame = _find_trainer_frame()
        if frame is not None:
            frame["self"].log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    # ---- Trainer events ----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Tokenize the tracked sets, pick up a resumed trajectory, and record step 0."""
        self._prepare(self.tokenizer or processing_class or kwargs.get("tokenizer"), int(model.config.num_labels))
        self._reset_trajectory()
        self._warned_unlearning = False
        self._nan_warned = set()
        self._config = self._collect_config(args, model)
        if state.global_step > 0:
            self._resume(args, state)
        else:
            self._record(args, state, model, "step0")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """Record every `track_every` steps, at the last step of an epoch, and at the final step."""
        if self.track_every and state.global_step % self.track_every == 0:
            self._record(args, state, model, "interval")
        # The Trainer sets epoch = e + (batch + 1) / batches_in_epoch, a whole number exactly at the
        # epoch's last step. Recording here rather than only in on_epoch_end puts the point into a
        # checkpoint saved at this step, so a resumed run has it too.
        if state.epoch and float(state.epoch).is_integer():
            self._record(args, state, model, "epoch_end")
        if state.global_step >= state.max_steps or control.should_training_stop:
            self._record(args, state, model, "final")

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        """Record at every epoch end."""
        self._record(args, state, model, "epoch_end")

    def on_save(self, args, state, control, **kwargs):
        """Save the trajectory so far beside the checkpoint just written, for resume."""
        if not state.is_world_process_zero:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            self.save(os.path.join(ckpt, TRACKING_DIRNAME))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Make sure the last step is recorded, then write the run directory."""
        if not self.steps or self.steps[-1] != state.global_step:
            # Training stopped outside on_step_end's view; the model may be a reloaded best model.
            self._record(args, state, model, "final")
        if state.is_world_process_zero:
            self.save(os.path.join(self.output_dir or args.output_dir, TRACKING_DIRNAME))

    # ---- persistence -------------------------------------------------------------------------

    def _collect_config(self, args, model) -> Dict[str, Any]:
        config = getattr(model, "config", None)
        n_train, n_total = count_parameters(model)
        world, _ = _dist()
        base = {
            "model_name_or_path": getattr(config, "_name_or_path", None),
            "model_type": getattr(config, "model_type", None),
            "num_labels": getattr(config, "num_labels", None),
            "trainable_params": int(n_train),
            "total_params": int(n_total),
            "learning_rate": args.learning_rate,
            "seed": args.seed,
            "num_train_epochs": args.num_train_epochs,
            "max_steps": args.max_steps,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": world,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": getattr(args, "warmup_steps", None),
            "warmup_ratio": getattr(args, "warmup_ratio", None),
            "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm,
            "track_every": self.track_every,
            "thresholds": list(self.thresholds),
            "tracked_loss": "unweighted cross-entropy of the gold label",
        }
        base.update(self.run_config)
        return base

    def examples_table(self):
        """One row per tracked example (`hf_entropy_callback.runs.EXAMPLE_COLUMNS`)."""
        import pandas as pd

        frames = []
        for name, t in self.sets.items():
            frames.append(
                pd.DataFrame(
                    {
                        "example_id": t.example_ids,
                        "set": name,
                        "index": np.arange(len(t.labels)),
                        "entropy": t.entropy,
                        "category": t.categories.astype(str),
                        "label": t.labels,
                        "label_counts": [list(map(int, c)) for c in t.label_counts],
                        "token_length": t.token_length,
                        "noised": t.noised,
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def points_table(self):
        import pandas as pd

        return pd.DataFrame(
            {"point": np.arange(len(self.steps)), "step": self.steps, "epoch": self.epochs, "reason": self.reasons}
        )

    def to_run(self, path: str = "") -> Run:
        """The trajectory so far as an in-memory `Run` (what `load_run` returns after training)."""
        lp = {name: np.stack(v).astype(np.float32) for name, v in self.logprobs.items()}
        return Run(path, dict(getattr(self, "_config", self.run_config)), {}, self.examples_table(), self.points_table(), lp)

    def save(self, path: str) -> str:
        """Write the run directory to `path` (atomically)."""
        run = self.to_run(path)
        return write_run(path, run.config, run.examples, run.points, run.logprobs)

    def _resume(self, args, state) -> None:
        frame = _find_trainer_frame()
        candidates = []
        if frame is not None and isinstance(frame.get("resume_from_checkpoint"), str):
            candidates.append(frame["resume_from_checkpoint"])
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for ckpt in candidates:
            tdir = os.path.join(ckpt, TRACKING_DIRNAME)
            if os.path.isdir(tdir):
                self._load_trajectory(load_run(tdir), state.global_step, tdir)
                return
        warnings.warn(
            f"Resuming at step {state.global_step} but no saved trajectory was found in {candidates}: tracking "
            "starts here, and the run lacks the earlier points (AULC and Delta L will not cover the whole run).",
            RuntimeWarning,
            stacklevel=2,
        )
        self._config["resumed_without_history"] = True

    def _load_trajectory(self, run: Run, global_step: int, where: str) -> None:
        for name, tset in self.sets.items():
            if name not in run.logprobs:
                raise RunFormatError(f"{where}: the saved trajectory has no tracked set {name!r}")
            if run.set_examples(name)["example_id"].tolist() != tset.example_ids:
                raise RunFormatError(f"{where}: the saved trajectory's set {name!r} holds other examples than this run's")
        keep = run.points["step"].to_numpy() <= global_step
        self.steps = run.points["step"][keep].astype(int).tolist()
        self.epochs = run.points["epoch"][keep].astype(float).tolist()
        self.reasons = run.points["reason"][keep].astype(str).tolist()
        self.logprobs = {name: list(run.logprobs[name][keep]) for name in self.sets}

