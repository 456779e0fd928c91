"""`EntropyTracker`: per-example loss tracking for any training loop (no Trainer needed).

The tracker holds the tracked sets (tokenized once), runs the batched, sharded and gathered
forward pass at the points the loop asks for, keeps the trajectory of log-probabilities, computes
the per-point metrics, and saves / restores all of it. `AnnotationEntropyCallback` is a thin
adapter that drives it from Trainer events; a custom loop calls it directly::

    tracker = EntropyTracker({"train": chaos_train, "validation": chaos_val}, tokenizer, track_every=100)
    for step in ...:
        ...optimizer.step()...
        accelerator.log(tracker.maybe_track(model, step, epoch), step=step)
    tracker.save("runs/x/entropy_tracking")
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .chaosnli import NLI_LABELS
from .dynamics import accuracy, gold_loss
from .entropy import CATEGORIES, annotation_entropy, category_thresholds, entropy_category
from .labels import LabelSpace, model_label_names, normalize_label_name, resolve_label_space
from .run_config import RunConfig
from .runs import Run, RunFormatError, load_run, write_run
from .trajectory import Trajectory

logger = logging.getLogger(__name__)

ID_COLUMNS = ("example_id", "uid", "id", "idx")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: Reasons a tracking point can have (joined with "+" when several fall on one step).
REASONS = ("step0", "interval", "epoch_end", "final")
_ENTROPY_ATOL = 1e-6
#: Rise (nats) of the contested examples' mean loss over its first value that counts as un-learning in
#: the warning; smaller rises are noise of a few steps (the run files keep every value either way).
UNLEARNING_MARGIN = 0.02
#: Padding a tracking batch may carry, as a share of its tokens (see `EntropyTracker._shard_batches`).
PADDING_SLACK = 0.05
#: Default examples per entropy category the instruments measure: all three instruments then add less than
#: the plain tracking point at the study's settings (benchmarks/bench_instruments.py).
DEFAULT_SAMPLE_PER_CATEGORY = 32


@dataclass
class TrackedSet:
    """A tracked set, tokenized once, with everything the run files need (labels in the model's ids)."""

    name: str
    example_ids: List[str]
    labels: np.ndarray
    entropy: np.ndarray
    categories: np.ndarray
    label_counts: np.ndarray
    noised: np.ndarray
    original_labels: np.ndarray  # the label before label noise (= labels where there was none)
    features: List[Dict[str, List[int]]]
    token_length: np.ndarray
    order: np.ndarray  # length-sorted positions, so batches need little padding


def join_reasons(reasons: Sequence[str]) -> str:
    """Reasons of one point, each once, in the order of `REASONS` (others after, as given).

    Example:
        >>> join_reasons(["final", "epoch_end", "final"])
        'epoch_end+final'
    """
    unique = list(dict.fromkeys(r for r in reasons if r))
    return "+".join(sorted(unique, key=lambda r: (REASONS.index(r) if r in REASONS else len(REASONS), unique.index(r))))


def distributed_world() -> Tuple[int, int]:
    """(world size, rank) of torch.distributed, or (1, 0) when not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def unwrap_model(model):
    """The module to call: DDP / DataParallel wrappers and `torch.compile` are peeled off.

    FSDP and DeepSpeed engines are kept: their forward gathers the sharded weights, so every
    process must call them (the tracker shards the examples, not the model).
    """
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def _without_amp_wrapper(model):
    """Call `model` without the autocast that accelerate's mixed precision wrapped its forward in, for a while.

    `Accelerator.prepare` (and so the Trainer under `bf16` / `fp16`) replaces `model.forward` with an autocast
    wrapper and keeps the original as `model._original_forward`, on the model object itself; an outer
    `torch.autocast(enabled=False)` cannot undo it. The original is put back in place for the pass and the
    wrapper restored after, as accelerate's own `extract_model_from_parallel(keep_fp32_wrapper=False)` does
    for good.
    """
    original = model.__dict__.get("_original_forward")
    wrapper = model.__dict__.get("forward")
    if original is None or wrapper is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapper


def _forward_parameters(model) -> Optional[set]:
    """The model inputs its forward accepts; None when it takes **kwargs (pass all)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(target.forward).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()) and "input_ids" not in params:
        return None
    return {k for k in MODEL_INPUTS if k in params}


def _logits_of(output, where: str) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{where}: the model's output has no `logits` (got {type(output).__name__}); the tracker needs a "
            "sequence classifier whose forward returns an object or dict with `logits` of shape (batch, classes)"
        )
    return logits


class EntropyTracker:
    """Track every tracked example's loss over training, in any training loop.

    Args:
        tracked (`datasets.Dataset` or `Mapping[str, datasets.Dataset]`):
            The tracked examples; a single dataset is named `"train"`. Each needs a label column (ids, or
            names mapped through the label names) and an `entropy` column in nats or `label_counts`
            (K counts per example) to compute it. Inputs: the text column(s) (tokenized with `tokenizer`),
            `input_ids` (already tokenized), or any columns that `preprocess` turns into inputs.
            Optional: an id column (`example_id`, `uid`, `id` or `idx`), `category`, `noised`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Tokenizes text and pads batches (its `padding_side` is respected, e.g. left for decoders).
        track_every (`int`, *optional*, defaults to 100):
            `maybe_track` records every this many optimizer steps (0 = only step 0, epoch ends and the end).
        batch_size (`int`, *optional*, defaults to 64): batch size of the tracking forward passes.
        text_columns (`Sequence[str]`, *optional*, defaults to `("premise", "hypothesis")`):
            One or two text columns, tokenized as a (pair of) sequence(s) when there is no `preprocess`.
        label_column (`str`, *optional*, defaults to `"label"`): the gold label column.
        label_names (`Sequence[str]`, *optional*):
            Class names of the tracked label ids. Default: the label column's `ClassLabel` names, else the
            ChaosNLI order (entailment, neutral, contradiction) when the model's own names are NLI names.
            They are compared with the model's `config.id2label`: the same names in another order are
            remapped to the model's ids (logged once); different names raise `LabelSpaceError`.
        max_length (`int`, *optional*):
            Truncation length for text; default the tokenizer's `model_max_length`, which is what
            `tokenizer(..., truncation=True)` used for training. Pass your training script's value.
        preprocess (`Callable[[dict], Any]`, *optional*):
            Turns one example (a dict of its columns) into model inputs (a dict with `input_ids`, ...) or
            into text (a string, or a pair of strings), e.g. your training preprocessing or prompt template.
        thresholds (`Tuple[float, float]`, *optional*):
            Entropy category thresholds in nats; default the study's (0.4, 0.7) for K = 3, carried over to
            K classes by `entropy.category_thresholds` (same share of ln K).
        run_config (`RunConfig` or `Mapping`, *optional*): configuration stored with the run (dataset, ...);
            the model's method, rank and size are read from the model (`RunConfig.for_training`).
        nan_policy (`str`, *optional*, defaults to `"record"`):
            `"record"` stores NaN losses and warns once per set; `"raise"` raises `FloatingPointError`.
        metric_prefix (`str`, *optional*, defaults to `"entropy/"`): prefix of the metric names.
        autocast (`bool`, *optional*, defaults to `False`):
            Run the tracking forward under `torch.autocast(device_type, dtype=torch.bfloat16)`, as bf16 mixed
            precision training does (the log-probabilities are computed and stored in float32 either way).
            Turn it on when your training uses bf16 autocast: the pass is faster on hardware with bf16 units and
            sees the model as training does. Off, the forward runs in the model's own dtype, and the values are
            exactly those of a plain forward, also when accelerate's mixed precision (`Accelerator.prepare` with
            `mixed_precision="bf16"`, the Trainer's `bf16=True`) has wrapped the model's forward in autocast: that
            wrapper is set aside for the pass. The run configuration records it (`tracking_autocast`).
        instruments (`Sequence[str]` or `str`, *optional*):
            Opt-in instruments measured at every tracking point: `"grad_alignment"`, `"grad_norms"`, `"drift"`
            (see `hf_entropy_callback.instruments`); stored in the run directory and its checkpoints.
        instrument_sample_per_category (`int`, *optional*):
            Examples per entropy category of the first tracked set that the instruments measure (a fixed,
            seeded, stratified sample); default `DEFAULT_SAMPLE_PER_CATEGORY` (32); `None` = the whole set.
        instrument_seed (`int`, *optional*, defaults to 0): seed of that sample.
        instrument_loss (`str`, `dict` or `InstrumentLoss`, *optional*):
            The loss as trained, which the gradient instruments differentiate: `"ce"` (default),
            `"soft_kl"`, or `{"kind": "class_weighted_ce", "class_weights": [...]}` (model's class order).

    Example:
        ```python
        tracker = EntropyTracker({"train": chaos_train, "validation": chaos_val}, tokenizer, track_every=100)
        metrics = tracker.track(model, step=0, epoch=0.0, reason="step0")   # {"entropy/train_loss": ...}
        ...
        tracker.save(os.path.join(output_dir, "entropy_tracking"))
        ```
    """

    def __init__(
        self,
        tracked,
        tokenizer=None,
        *,
        track_every: int = 100,
        batch_size: int = 64,
        text_columns: Sequence[str] = ("premise", "hypothesis"),
        label_column: str = "label",
        label_names: Optional[Sequence[str]] = None,
        max_length: Optional[int] = None,
        preprocess: Optional[Callable[[dict], Any]] = None,
        thresholds: Optional[Tuple[float, float]] = None,
        run_config: Optional[Mapping[str, Any]] = None,
        nan_policy: str = "record",
        metric_prefix: str = "entropy/",
        autocast: bool = False,
        instruments: Optional[Sequence[str]] = None,
        instrument_sample_per_category: Optional[int] = DEFAULT_SAMPLE_PER_CATEGORY,
        instrument_seed: int = 0,
        instrument_loss=None,
    ):
        if not isinstance(tracked, Mapping):
            tracked = {"train": tracked}
        if not tracked:
            raise ValueError("EntropyTracker: no tracked set given")
        for name, ds in tracked.items():
            if ds is None or len(ds) == 0:
                raise ValueError(f"EntropyTracker: tracked set {name!r} is empty")
        if not isinstance(track_every, int) or track_every < 0:
            raise ValueError(f"EntropyTracker: track_every must be an integer >= 0, got {track_every!r}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"EntropyTracker: batch_size must be an integer >= 1, got {batch_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise ValueError(f"EntropyTracker: max_length must be a positive integer, got {max_length!r}")
        if nan_policy not in ("record", "raise"):
            raise ValueError(f"EntropyTracker: nan_policy must be 'record' or 'raise', got {nan_policy!r}")
        if isinstance(text_columns, str):
            text_columns = (text_columns,)
        if not 1 <= len(text_columns) <= 2:
            raise ValueError("EntropyTracker: text_columns must name one or two columns")
        if preprocess is not None and not callable(preprocess):
            raise TypeError("EntropyTracker: preprocess must be a callable (example dict -> inputs or text)")
        self.raw_sets = dict(tracked)
        self.tokenizer = tokenizer
        self.track_every = track_every
        self.batch_size = batch_size
        self.text_columns = tuple(text_columns)
        self.label_column = label_column
        self.label_names = None if label_names is None else tuple(str(n) for n in label_names)
        self.max_length = max_length
        self.preprocess = preprocess
        self.user_thresholds = None if thresholds is None else tuple(float(t) for t in thresholds)
        self.config: Dict[str, Any] = (
            run_config.to_dict() if isinstance(run_config, RunConfig) else dict(run_config or {})
        )
        self.nan_policy = nan_policy
        self.prefix = metric_prefix
        self.autocast = autocast
        self.sets: Dict[str, TrackedSet] = {}
        self.label_space: Optional[LabelSpace] = None
        self.num_labels: Optional[int] = None
        self.thresholds: Optional[Tuple[float, float]] = None
        self._batches: Dict[Tuple[str, int, int, str], list] = {}
        for name, ds in self.raw_sets.items():
            self._check_columns(name, ds)
        self.instruments = None
        if instruments:
            from .instruments import InstrumentSuite  # the instruments build on this module

            self.instruments = InstrumentSuite(
                instruments,
                sample_per_category=instrument_sample_per_category,
                seed=instrument_seed,
                loss=instrument_loss,
            )
        self.reset()

    # ---- preparation -------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the trajectory (the prepared sets stay)."""
        self.steps: List[int] = []
        self.epochs: List[float] = []
        self.reasons: List[str] = []
        # Per set, the points recorded so far in one growing array (see `trajectory.py`): recording a
        # point, its metrics, `state_dict`, `to_run` and `save` never copy the whole history.
        self._trajectories: Dict[str, Trajectory] = {}
        self._first_loss: Dict[str, np.ndarray] = {}
        self._warned_unlearning = False
        self._nan_warned: set = set()
        if self.instruments is not None:
            self.instruments.reset()

    @property
    def autocast(self) -> bool:
        """Whether the tracking forward runs under bfloat16 autocast (set it before the first point)."""
        return self._autocast

    @autocast.setter
    def autocast(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"EntropyTracker: autocast must be True or False, got {value!r}")
        self._autocast = value
        self.config["tracking_autocast"] = "bfloat16" if value else None

    @property
    def prepared(self) -> bool:
        return bool(self.sets)

    def _trajectory(self, name: str) -> Trajectory:
        if name not in self._trajectories:
            self._trajectories[name] = Trajectory(len(self.sets[name].labels), self.num_labels)
        return self._trajectories[name]

    @property
    def logprobs(self) -> Dict[str, np.ndarray]:
        """Per set, the log-probabilities recorded so far: float32 (points, examples, classes), read-only views."""
        if not self.prepared:
            return {name: np.zeros((0, 0, 0), np.float32) for name in self.raw_sets}
        return {name: self._trajectory(name).view() for name in self.sets}

    def _check_columns(self, name: str, ds) -> None:
        cols = ds.column_names
        if self.label_column not in cols:
            raise ValueError(f"tracked set {name!r}: missing label column {self.label_column!r} (columns: {cols})")
        if "entropy" not in cols and "label_counts" not in cols:
            raise ValueError(f"tracked set {name!r}: missing column 'entropy' (or 'label_counts' to compute it)")
        if "input_ids" not in cols and self.preprocess is None:
            missing = [c for c in self.text_columns if c not in cols]
            if missing:
                raise ValueError(
                    f"tracked set {name!r}: missing text columns {missing} and no 'input_ids' (or pass preprocess=)"
                )

    def _tracked_label_names(self, model_names: Optional[Sequence[str]], num_labels: int) -> Optional[Tuple[str, ...]]:
        if self.label_names is not None:
            return self.label_names
        found = None
        for name, ds in self.raw_sets.items():
            names = getattr(ds.features.get(self.label_column), "names", None)
            if names is not None:
                if found is not None and list(names) != list(found):
                    raise ValueError(
                        f"tracked sets disagree on the label names: {list(found)} vs {list(names)} in set {name!r}"
                    )
                found = tuple(names)
        if found is not None:
            return found
        nli = sorted(NLI_LABELS)
        if (
            num_labels == len(NLI_LABELS)
            and model_names
            and sorted(normalize_label_name(n) for n in model_names) == nli
        ):
            return NLI_LABELS  # ChaosNLI / GLUE-MNLI order, the default of `load_chaosnli`
        return None

    def prepare(self, model, tokenizer=None) -> "EntropyTracker":
        """Resolve the label space against `model`, validate and tokenize the tracked sets (once)."""
        if self.prepared:
            return self
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if self.tokenizer is None:
            raise ValueError(
                "EntropyTracker needs a tokenizer (to tokenize text and pad batches): pass tokenizer= "
                "(with a Trainer, processing_class= works too)"
            )
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "EntropyTracker: the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = "
                "tokenizer.eos_token and model.config.pad_token_id accordingly) so examples can be batched"
            )
        model = unwrap_model(model)
        config = getattr(model, "config", None)
        num_labels = getattr(config, "num_labels", None)
        model_names = model_label_names(model)
        if num_labels is None:
            num_labels = self._infer_num_labels()
            if num_labels is None:
                raise ValueError(
                    f"EntropyTracker: the model ({type(model).__name__}) has no `config.num_labels` and the tracked "
                    "sets give no class count; pass label_names= (one name per class) or a `label_counts` column"
                )
        self.num_labels = int(num_labels)
        tracked_names = self._tracked_label_names(model_names, self.num_labels)
        self.label_space = resolve_label_space(tracked_names, model_names, self.num_labels)
        if self.label_space.permutation is not None:
            logger.warning(self.label_space.note)
        elif model_names is None or tracked_names is None or self.label_space.names != tuple(model_names):
            logger.warning(self.label_space.note)
        else:
            logger.info(self.label_space.note)
        self.thresholds = self.user_thresholds or category_thresholds(self.num_labels)
        sets = {name: self._build_set(name, ds, tracked_names) for name, ds in self.raw_sets.items()}
        seen: Dict[str, str] = {}
        for name, tset in sets.items():
            for ex_id in tset.example_ids:
                if ex_id in seen:
                    raise ValueError(
                        f"tracked sets {seen[ex_id]!r} and {name!r} both hold example id {ex_id!r}; an example can be "
                        "tracked in one set only (give each set its own ids)"
                    )
                seen[ex_id] = name
        self.sets = sets
        self.config.setdefault("label_names", list(self.label_space.names))
        self.config.setdefault("num_labels", self.num_labels)
        self.config.setdefault("thresholds", list(self.thresholds))
        self.config.setdefault("track_every", self.track_every)
        self.config.setdefault("max_length", self.max_length or self._tokenizer_max_length())
        self.config.setdefault("tracked_loss", "unweighted cross-entropy of the gold label")
        # The model's own adaptation (method, rank, ...) and size, so a custom loop's run is never "unknown".
        self.config = RunConfig.for_training(model=model, given=self.config).to_dict()
        if self.instruments is not None:
            self.instruments.prepare(self, model)
        return self

    def _tokenizer_max_length(self) -> Optional[int]:
        n = getattr(self.tokenizer, "model_max_length", None)
        return int(n) if isinstance(n, int) and n < 1_000_000 else None

    def _infer_num_labels(self) -> Optional[int]:
        if self.label_names is not None:
            return len(self.label_names)
        for ds in self.raw_sets.values():
            names = getattr(ds.features.get(self.label_column), "names", None)
            if names:
                return len(names)
            if "label_counts" in ds.column_names:
                return len(ds[0]["label_counts"])
        return None

    def _labels(self, name: str, ds, ids: List[str], tracked_names, column: Optional[str] = None) -> np.ndarray:
        column = column or self.label_column
        raw = list(ds[column])
        if raw and all(isinstance(v, str) for v in raw):
            if tracked_names is None:
                raise ValueError(
                    f"tracked set {name!r}: labels are strings ({raw[0]!r}, ...) but no label names are known; pass "
                    "label_names= in the model's order"
                )
            lookup = {normalize_label_name(n): i for i, n in enumerate(tracked_names)}
            out = []
            for ex_id, v in zip(ids, raw):
                key = normalize_label_name(v)
                if key not in lookup:
                    raise ValueError(
                        f"tracked set {name!r}: example {ex_id!r} has {column} {v!r}, not one of {list(tracked_names)}"
                    )
                out.append(lookup[key])
            return np.asarray(out, dtype=np.int64)
        labels = np.asarray(raw)
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        if labels.dtype.kind not in "iu":
            raise ValueError(f"tracked set {name!r}: {column} must be integer ids or label names, got {labels.dtype}")
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_labels))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"tracked set {name!r}: example {ids[i]!r} has {column} {labels[i]}, outside the model's "
                f"0..{self.num_labels - 1} ({bad.size} such examples)"
            )
        return labels.astype(np.int64)

    def _entropy(self, name: str, ds, ids: List[str], counts: Optional[np.ndarray]) -> np.ndarray:
        k = self.num_labels
        max_h = math.log(k)
        if counts is not None:
            if counts.ndim != 2 or counts.shape[1] != k:
                raise ValueError(
                    f"tracked set {name!r}: label_counts have {counts.shape[-1] if counts.ndim else 0} classes per "
                    f"example but the model has {k}"
                )
            totals = counts.sum(axis=1)
            if (counts < 0).any() or (totals <= 0).any():
                i = int(np.flatnonzero((counts < 0).any(axis=1) | (totals <= 0))[0])
                raise ValueError(
                    f"tracked set {name!r}: example {ids[i]!r} has label_counts {counts[i].tolist()}; counts must be "
                    "non-negative with a positive total"
                )
            from_counts = np.asarray(annotation_entropy(counts), dtype=np.float64).reshape(len(ids))
        if "entropy" not in ds.column_names:
            return from_counts
        try:
            h = np.asarray(ds["entropy"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"tracked set {name!r}: the entropy column is not numeric ({err})") from None
        bad = ~np.isfinite(h)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"tracked set {name!r}: example {ids[i]!r} has entropy {h[i]}; entropy must be finite (only annotated "
                f"examples can be tracked; {int(bad.sum())} such examples)"
            )
        if counts is not None:
            off = np.abs(h - from_counts) > _ENTROPY_ATOL
            if off.any():
                i = int(np.flatnonzero(off)[0])
                in_bits = np.abs(h - from_counts / math.log(2)) <= _ENTROPY_ATOL
                if in_bits.all():
                    raise ValueError(
                        f"tracked set {name!r}: the entropy column is in bits (base 2; e.g. example {ids[i]!r}: "
                        f"{h[i]:.4f} = {from_counts[i]:.4f} nats); the study's thresholds are in nats: drop the "
                        "column (it is computed from label_counts) or multiply it by ln 2"
                    )
                raise ValueError(
                    f"tracked set {name!r}: the entropy column disagrees with label_counts for {int(off.sum())} "
                    f"examples (e.g. {ids[i]!r}: entropy {h[i]:.6f}, from counts {counts[i].tolist()} "
                    f"{from_counts[i]:.6f} nats)"
                )
        low, high = h < -_ENTROPY_ATOL, h > max_h + _ENTROPY_ATOL
        if low.any() or high.any():
            i = int(np.flatnonzero(low | high)[0])
            hint = ""
            if high.any() and (h <= math.log2(k) + _ENTROPY_ATOL).all():
                hint = f"; values up to log2({k}) = {math.log2(k):.4f} suggest entropy in bits, the tracker needs nats"
            raise ValueError(
                f"tracked set {name!r}: example {ids[i]!r} has entropy {h[i]:.6f}, outside [0, ln {k}] = "
                f"[0, {max_h:.4f}] nats ({int((low | high).sum())} such examples){hint}"
            )
        return np.clip(h, 0.0, max_h)

    def _inputs(self, name: str, ds) -> List[Dict[str, List[int]]]:
        n = len(ds)
        tok_kwargs = dict(truncation=True, max_length=self.max_length)
        if self.preprocess is not None:
            features = []
            for i in range(n):
                out = self.preprocess(ds[i])
                if isinstance(out, str):
                    out = (out,)
                if isinstance(out, (tuple, list)) and out and all(isinstance(t, str) for t in out) and len(out) <= 2:
                    out = self.tokenizer(*out, **tok_kwargs)
                if not isinstance(out, Mapping) or "input_ids" not in out:
                    raise TypeError(
                        f"tracked set {name!r}: preprocess must return model inputs (a dict with input_ids) or text "
                        f"(a string or a pair of strings); got {type(out).__name__} for example {i}"
                    )
                features.append({c: list(out[c]) for c in MODEL_INPUTS if c in out})
            return features
        cols = ds.column_names
        if "input_ids" in cols:
            keep = [c for c in MODEL_INPUTS if c in cols]
            table = {c: ds[c] for c in keep}
            return [{c: list(table[c][i]) for c in keep} for i in range(n)]
        texts = [list(ds[c]) for c in self.text_columns]
        for col, values in zip(self.text_columns, texts):
            bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
            if bad:
                raise ValueError(
                    f"tracked set {name!r}: text column {col!r} is empty or not a string at row {bad[0]} "
                    f"({values[bad[0]]!r}; {len(bad)} such rows)"
                )
        enc = self.tokenizer(*texts, **tok_kwargs)
        keep = [c for c in MODEL_INPUTS if c in enc]
        return [{c: enc[c][i] for c in keep} for i in range(n)]

    def _build_set(self, name: str, ds, tracked_names) -> TrackedSet:
        cols = ds.column_names
        n = len(ds)
        id_col = next((c for c in ID_COLUMNS if c in cols), None)
        ids = [str(v) for v in ds[id_col]] if id_col else [f"{name}-{i}" for i in range(n)]
        if len(set(ids)) != n:
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"tracked set {name!r}: example ids in column {id_col!r} are not unique (e.g. {dup!r})")
        labels = self._labels(name, ds, ids, tracked_names)
        counts = np.asarray(ds["label_counts"], dtype=np.int64) if "label_counts" in cols else None
        entropy = self._entropy(name, ds, ids, counts)
        if counts is None:
            counts = np.zeros((n, self.num_labels), np.int64)
        labels = self.label_space.to_model_ids(labels)
        counts = self.label_space.counts_to_model_order(counts)
        if "category" in cols:
            cats = np.asarray(ds["category"]).astype(str)
        else:
            cats = np.asarray(entropy_category(entropy, self.thresholds)).reshape(n)
        noised = np.asarray(ds["noised"], dtype=bool) if "noised" in cols else np.zeros(n, bool)
        if "original_label" in cols:
            original = self.label_space.to_model_ids(self._labels(name, ds, ids, tracked_names, "original_label"))
        else:
            original = labels.copy()
        features = self._inputs(name, ds)
        token_length = np.asarray(
            [sum(f["attention_mask"]) if "attention_mask" in f else len(f["input_ids"]) for f in features],
            dtype=np.int64,
        )
        order = np.argsort(-token_length, kind="stable")
        return TrackedSet(name, ids, labels, entropy, cats, counts, noised, original, features, token_length, order)

    # ---- the forward pass --------------------------------------------------------------------

    def _shard_batches(self, tset: TrackedSet, accepted: Optional[set], world: int, rank: int, device) -> list:
        """Padded batches of this process's shard, built once (the tracked set never changes).

        The shard is in decreasing length; a batch takes the next examples while it holds at most
        `batch_size` and its padding stays within `PADDING_SLACK` of its tokens, so it costs about what
        exact-length groups cost. A batch without padding goes without its attention mask, which lets
        attention take its unmasked (faster) path; the numbers are the same.
        """
        key = (tset.name, world, rank, str(device))
        if key not in self._batches:
            mine = tset.order[rank::world]
            lengths = [len(tset.features[i]["input_ids"]) for i in mine]
            batches, start = [], 0
            while start < len(mine):
                longest, tokens, end = lengths[start], lengths[start], start + 1
                while (
                    end < len(mine)
                    and end - start < self.batch_size
                    and longest * (end - start + 1) <= (tokens + lengths[end]) * (1 + PADDING_SLACK)
                ):
                    tokens += lengths[end]
                    end += 1
                idx = mine[start:end]
                feats = [{k: v for k, v in tset.features[i].items() if accepted is None or k in accepted} for i in idx]
                batch = self.tokenizer.pad(feats, padding=True, return_tensors="pt")
                if "attention_mask" in batch and bool(batch["attention_mask"].all()):
                    del batch["attention_mask"]
                batches.append({k: v.to(device) for k, v in batch.items() if accepted is None or k in accepted})
                start = end
            self._batches[key] = (mine, batches)
        return self._batches[key]

    @torch.inference_mode()
    def compute_logprobs(self, model, name: str) -> np.ndarray:
        """Log-probabilities (examples, classes) of one tracked set; sharded over processes and gathered."""
        tset = self.sets[name]
        model = unwrap_model(model)
        world, rank = distributed_world()
        device = next(model.parameters()).device
        mine, batches = self._shard_batches(tset, _forward_parameters(model), world, rank, device)
        out = []
        # Autocast off means off: also when accelerate's mixed precision has wrapped the forward in it.
        with contextlib.nullcontext() if self.autocast else _without_amp_wrapper(model):
            # A bar only for passes that take a while (tqdm's delay), on one process.
            for batch in tqdm(batches, desc=f"tracking {name!r}", delay=5, leave=False, disable=rank != 0):
                # Only the model's forward under autocast: log_softmax runs on float32 logits outside it.
                with torch.autocast(device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext():
                    output = model(**batch)
                logits = _logits_of(output, f"tracked set {name!r}")
                if logits.ndim != 2 or logits.shape[-1] != self.num_labels:
                    raise ValueError(
                        f"tracked set {name!r}: the model returned logits of shape {tuple(logits.shape)}, expected "
                        f"(batch, {self.num_labels})"
                    )
                out.append(F.log_softmax(logits.float(), dim=-1).cpu())
        local = torch.cat(out) if out else torch.empty((0, self.num_labels))
        result = np.full((len(tset.labels), self.num_labels), np.nan, dtype=np.float32)
        if world == 1:
            result[mine] = local.numpy()
            return result
        # Every process takes part (a forward on one process only would hang FSDP / ZeRO-3); shards are
        # padded to one size for all_gather and the padding is dropped by index, so none is stored twice.
        width = math.ceil(len(tset.labels) / world)
        gather_device = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        vals = torch.full((width, self.num_labels), float("nan"), device=gather_device)
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

    def track(self, model, step: int, epoch: Optional[float] = None, reason: str = "interval") -> Dict[str, float]:
        """Record a tracking point at optimizer step `step` (every process must call it).

        Puts the model in eval mode for the pass (and back), runs the forward over every tracked set and
        stores the log-probabilities. A step already recorded is not recorded again; its reasons are
        merged.

        Args:
            model (`torch.nn.Module`): the model being trained (DDP / compiled wrappers are unwrapped).
            step (`int`): optimizer steps taken so far (0 = before the first update).
            epoch (`float`, *optional*): training progress in epochs, stored with the point.
            reason (`str`, *optional*, defaults to `"interval"`): one of `REASONS` or several joined by "+".

        Returns:
            `Dict[str, float]`: the point's metrics (see `point_metrics`), empty when the step was recorded.
        """
        if not self.prepared:
            self.prepare(model)
        step = int(step)
        if self.steps and step <= self.steps[-1]:
            if step == self.steps[-1]:
                self.reasons[-1] = join_reasons(self.reasons[-1].split("+") + reason.split("+"))
                return {}
            raise ValueError(f"EntropyTracker.track: step {step} is before the last recorded step {self.steps[-1]}")
        wrapped = unwrap_model(model)
        was_training = wrapped.training
        wrapped.eval()
        measured = None
        try:
            current = {name: self.compute_logprobs(wrapped, name) for name in self.sets}
            if self.instruments is not None:
                measured = self.instruments.measure(wrapped, self, len(self.steps), step)
        finally:
            if was_training:
                wrapped.train()
        self.steps.append(step)
        self.epochs.append(float(epoch) if epoch is not None else float("nan"))
        self.reasons.append(join_reasons(reason.split("+")))
        for name, lp in current.items():
            self._trajectory(name).append(lp)
        self._check_nan(step, current)
        metrics = self.point_metrics(-1)
        if measured is not None:
            self.instruments.commit(measured)
            metrics.update(self.instruments.metrics(measured, self.prefix))
        self._warn_unlearning(metrics)
        return metrics

    def maybe_track(
        self, model, step: int, epoch: Optional[float] = None, *, epoch_end: bool = False, final: bool = False
    ) -> Dict[str, float]:
        """Record a point if the schedule says so: step 0, every `track_every` steps, an epoch end, the end.

        Call it after every optimizer step (and once before the first, with step 0); pass
        `epoch_end=True` at the last step of an epoch and `final=True` at the last step of training.

        Returns:
            `Dict[str, float]`: the point's metrics, or an empty dict when no point was recorded.
        """
        reasons = []
        if step == 0:
            reasons.append("step0")
        if self.track_every and step > 0 and step % self.track_every == 0:
            reasons.append("interval")
        if epoch_end and step > 0:
            reasons.append("epoch_end")
        if final and step > 0:
            reasons.append("final")
        if not reasons:
            return {}
        return self.track(model, step, epoch, join_reasons(reasons))

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
                    warnings.warn(msg + "; recorded as NaN, the run summary reports them", RuntimeWarning, stacklevel=4)

    def losses(self, name: str = "train") -> np.ndarray:
        """Gold-label cross-entropy so far, shape (points, examples)."""
        return gold_loss(self._trajectory(name).view(), self.sets[name].labels)

    def _point_loss(self, name: str, point: int) -> np.ndarray:
        # One point only: the cost per point does not grow with the history.
        return gold_loss(self._trajectory(name).point(point)[None], self.sets[name].labels)[0]

    def point_metrics(self, point: int = -1) -> Dict[str, float]:
        """Metrics of one tracking point: mean loss per category, accuracy per set, Spearman rho.

        Keys: `<prefix><set>_loss`, `<prefix><set>_accuracy` for every set; for the first set also
        `<prefix><set>_loss_<category>` and `<prefix>spearman_rho` (entropy vs loss at this point).
        """
        from scipy.stats import spearmanr

        p = self.prefix
        metrics: Dict[str, float] = {}
        for k, (name, tset) in enumerate(self.sets.items()):
            loss = self._point_loss(name, point)
            metrics[f"{p}{name}_accuracy"] = accuracy(self._trajectory(name).point(point), tset.labels)
            metrics[f"{p}{name}_loss"] = float(np.mean(loss))
            if k > 0:
                continue  # per-category curves and rho for the first (training) set only
            for cat in CATEGORIES:
                m = tset.categories == cat
                if m.any():
                    metrics[f"{p}{name}_loss_{cat}"] = float(loss[m].mean())
            ok = np.isfinite(loss)
            if ok.sum() > 2 and np.ptp(loss[ok]) > 0 and np.ptp(tset.entropy[ok]) > 0:
                metrics[f"{p}spearman_rho"] = float(spearmanr(tset.entropy[ok], loss[ok]).statistic)
        return metrics

    def _warn_unlearning(self, metrics: Mapping[str, float]) -> None:
        first = next(iter(self.sets))
        key = f"{self.prefix}{first}_loss_contested"
        if self._warned_unlearning or key not in metrics or len(self.steps) < 2:
            return
        mask = self.sets[first].categories == "contested"
        start = float(self._point_loss(first, 0)[mask].mean())
        if metrics[key] > start + UNLEARNING_MARGIN and distributed_world()[1] == 0:
            self._warned_unlearning = True
            logger.warning(
                "Un-learning: the contested examples' mean loss %.4f at step %d is more than %.2f nats above its "
                "value at the first tracking point (step %d: %.4f).",
                metrics[key],
                self.steps[-1],
                UNLEARNING_MARGIN,
                self.steps[0],
                start,
            )

    # ---- state, saving, loading --------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The trajectory so far, for your own checkpoints (`torch.save` / pickle it).

        The log-probabilities are read-only views of the tracker's own arrays, not copies; points recorded
        later do not change them.
        """
        return {
            "steps": list(self.steps),
            "epochs": list(self.epochs),
            "reasons": list(self.reasons),
            "example_ids": {name: list(t.example_ids) for name, t in self.sets.items()},
            "logprobs": {name: (v if len(v) else None) for name, v in self.logprobs.items()},
            "config": dict(self.config),
            "instruments": self.instruments.state_dict() if self.instruments is not None else None,
        }

    def load_state_dict(
        self, state: Mapping[str, Any], *, up_to_step: Optional[int] = None, where: str = "state"
    ) -> None:
        """Continue from a `state_dict()` (or a saved run); points after `up_to_step` are dropped.

        The tracked sets must hold the same examples as when the state was saved.
        """
        if not self.prepared:
            raise RuntimeError("EntropyTracker.load_state_dict: call prepare(model) first (the sets are checked)")
        steps = np.asarray(state["steps"], dtype=np.int64)
        keep = steps <= up_to_step if up_to_step is not None else np.ones(len(steps), bool)
        for name, tset in self.sets.items():
            if name not in state["example_ids"]:
                raise RunFormatError(f"{where}: the saved trajectory has no tracked set {name!r}")
            if list(state["example_ids"][name]) != tset.example_ids:
                raise RunFormatError(
                    f"{where}: the saved trajectory's set {name!r} holds other examples than this run's"
                )
            arr = state["logprobs"][name]
            expected = (len(steps), len(tset.labels), self.num_labels)
            if (arr is None and len(steps)) or (arr is not None and np.shape(arr) != expected):
                raise RunFormatError(
                    f"{where}: the saved log-probabilities of set {name!r} have shape "
                    f"{None if arr is None else np.shape(arr)}, expected {expected} (points, examples, classes)"
                )
        self.reset()
        self.steps = steps[keep].astype(int).tolist()
        self.epochs = np.asarray(state["epochs"], dtype=np.float64)[keep].tolist()
        self.reasons = [str(r) for r, k in zip(state["reasons"], keep) if k]
        for name in self.sets:
            arr = state["logprobs"][name]
            if arr is not None:
                arr = np.asarray(arr)
                # Copied into this tracker's own array, once (`state` may hold another tracker's views).
                self._trajectories[name] = Trajectory.from_array(arr if keep.all() else arr[keep])
        if self.instruments is not None:
            self.instruments.load_state_dict(
                state.get("instruments"), up_to_step=up_to_step, where=where, points=len(self.steps)
            )

    def load(self, path: str, *, up_to_step: Optional[int] = None) -> None:
        """Continue from a run directory written by `save` (e.g. in a checkpoint)."""
        run = load_run(path)
        state = {
            "steps": run.points["step"].tolist(),
            "epochs": run.points["epoch"].tolist(),
            "reasons": run.points["reason"].tolist(),
            "example_ids": {name: run.set_examples(name)["example_id"].tolist() for name in run.logprobs},
            "logprobs": dict(run.logprobs),
        }
        if self.instruments is not None:
            state["instruments"] = self.instruments.state_from_run(run)
        self.load_state_dict(state, up_to_step=up_to_step, where=run.path)

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
                        "original_label": t.original_labels,
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
        """The trajectory so far as an in-memory `Run` (what `load_run` returns after saving).

        Its `logprobs` are read-only views of the tracker's arrays (no copy: a large trajectory is 100s of MB).
        """
        if not self.steps:
            raise RuntimeError("EntropyTracker: nothing recorded yet")
        tables = self.instruments.tables() if self.instruments is not None else (None, None)
        return Run(
            path,
            dict(self.config),
            {},
            self.examples_table(),
            self.points_table(),
            self.logprobs,
            instruments=tables[0],
            instrument_examples=tables[1],
        )

    def save(self, path: str, *, instrument_reference: bool = True) -> str:
        """Write the run directory to `path` (atomically; see `hf_entropy_callback.runs`).

        With instruments on, their tables go with it, and with `instrument_reference` the drift instrument's
        first-point reference (``instrument_reference.npz``, needed to resume from `path`; for full
        fine-tuning it holds a copy of the initial trainable weights).
        """
        run = self.to_run(path)
        extra = {}
        if self.instruments is not None:
            extra = dict(
                instruments=run.instruments,
                instrument_examples=run.instrument_examples,
                instrument_reference=self.instruments.reference_arrays() if instrument_reference else None,
            )
        return write_run(path, run.config, run.examples, run.points, run.logprobs, **extra)
