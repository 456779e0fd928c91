"""`InstrumentSuite`: the instruments a tracker runs, their sample, reference and history."""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from ..runs import (
    INSTRUMENT_COLUMNS,
    INSTRUMENT_EXAMPLE_COLUMNS,
    INSTRUMENT_REFERENCE_FILE,
    RunFormatError,
    instrument_frame,
    load_instrument_reference,
)
from .base import Measurement, PointContext, parse_instruments, preserved_rng
from .drift import Drift, describe_attention
from .gradients import GradAlignment, GradNorms
from .loss import InstrumentLoss
from .sample import stratified_sample

logger = logging.getLogger(__name__)

_WEIGHT_KEY = "weight:"


class InstrumentSuite:
    """The opt-in instruments of an `EntropyTracker`, measured at its tracking points.

    The tracker calls `prepare` once (after its own), `measure` inside each tracking point (model in eval
    mode) and `commit` once the point is recorded. The suite draws the sample (`stratified_sample` of the
    first tracked set, the training set by the tracker's convention), keeps every value measured so far
    and what the drift instrument needs from the first point, and saves / restores both.

    Args:
        names (`Sequence[str]` or `str`): instruments to run, from `INSTRUMENTS`.
        sample_per_category (`int`, *optional*): examples per entropy category; `None` = the whole set.
        seed (`int`, *optional*, defaults to 0): seed of the sample.
        loss (`InstrumentLoss`, `str` or `dict`, *optional*): the loss as trained; default `"ce"` (see
            `InstrumentLoss`; `AnnotationEntropyCallback` reads it from a `ClassWeightedTrainer`).
    """

    def __init__(self, names, *, sample_per_category: Optional[int] = None, seed: int = 0, loss=None):
        self.names = parse_instruments(names)
        if not self.names:
            raise ValueError("InstrumentSuite: no instrument named")
        if sample_per_category is not None and (
            isinstance(sample_per_category, bool) or not isinstance(sample_per_category, int) or sample_per_category < 1
        ):
            raise ValueError(
                f"instrument_sample_per_category must be an integer >= 1 or None (the whole set), got "
                f"{sample_per_category!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"instrument_seed must be an integer, got {seed!r}")
        self.sample_per_category = sample_per_category
        self.seed = seed
        self.loss = InstrumentLoss.coerce(loss)
        self.loss_given = loss is not None
        both = "grad_norms" in self.names
        build = {"grad_alignment": lambda: GradAlignment(per_example=both), "grad_norms": GradNorms, "drift": Drift}
        self.instruments = [build[n]() for n in self.names]
        self.set_name: Optional[str] = None
        self.sample: Optional[np.ndarray] = None
        self.attention: Optional[str] = None
        self.cache: Dict[str, Any] = {}
        self.description: Dict[str, Any] = {}
        self.reset()

    # ---- set-up -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the values and the reference (the sample stays)."""
        self.rows: list = []
        self.example_rows: list = []
        self.reference: Dict[str, Any] = {}

    def set_loss(self, loss) -> None:
        """The loss as trained (e.g. read from the Trainer at the start of training)."""
        self.loss = InstrumentLoss.coerce(loss)
        self.loss_given = True
        if self.description:
            self.description.update(self._loss_fields())

    def prepare(self, tracker, model) -> None:
        """Draw the sample from the tracker's first set and describe the instruments in its config."""
        self.set_name = next(iter(tracker.sets))
        tset = tracker.sets[self.set_name]
        picked = stratified_sample(tset.categories, self.sample_per_category, self.seed)
        # Longest first, like the tracking pass, so batches need little padding.
        self.sample = picked[np.argsort(-tset.token_length[picked], kind="stable")]
        self.attention = describe_attention(model) if "drift" in self.names else None
        self.description = {
            "names": list(self.names),
            "sample_per_category": self.sample_per_category,
            "seed": self.seed,
            **self._loss_fields(),
            "attention": self.attention,
            "set": self.set_name,
            "sample_size": int(len(self.sample)),
        }
        # The same dict object as the tracker's config entry: later facts (the per-example strategy) show up there.
        tracker.config["instruments"] = self.description

    def _loss_fields(self) -> Dict[str, Any]:
        fields = self.loss.describe()
        fields.setdefault("class_weights", None)
        return fields

    # ---- measuring ----------------------------------------------------------------------------

    def measure(self, model, tracker, point: int, step: int) -> Measurement:
        """Every instrument at one point (every process must call it); the model is in eval mode."""
        tset = tracker.sets[self.set_name]
        self._materialize_reference(model)
        ctx = PointContext(model, tracker.tokenizer, tset, self.sample, self.loss, step, self.cache, self.reference)
        out = Measurement(point, step)
        with preserved_rng():
            for instrument in self.instruments:
                instrument.measure(ctx, out)
        if self.reference and "step" not in self.reference:
            self.reference["step"] = int(step)
        if "per_example_strategy" in self.cache:
            self.description["per_example_gradients"] = self.cache["per_example_strategy"]
        return out

    def commit(self, measurement: Measurement) -> None:
        """Store a measurement (after its point was recorded)."""
        p, s = measurement.point, measurement.step
        self.rows.extend((p, s, *r) for r in measurement.rows)
        self.example_rows.extend((p, s, *r) for r in measurement.examples)

    def metrics(self, measurement: Measurement, prefix: str) -> Dict[str, float]:
        """A few of the point's values for the Trainer's log (the run files keep all of them)."""
        out: Dict[str, float] = {}
        layers: Dict[str, list] = {}
        for instrument, quantity, group, component, value in measurement.rows:
            if quantity in ("cosine", "group_grad_norm", "grad_norm_mean"):
                out[f"{prefix}{quantity}_{group}"] = value
            elif quantity == "update_norm_total":
                out[f"{prefix}{quantity}"] = value
            elif quantity in ("cka", "attention_entropy"):
                layers.setdefault(quantity, []).append(value)
        if "cka" in layers:
            out[f"{prefix}cka_last_layer"] = layers["cka"][-1]
        if "attention_entropy" in layers:
            out[f"{prefix}attention_entropy_mean"] = float(np.mean(layers["attention_entropy"]))
        return out

    # ---- tables, state ------------------------------------------------------------------------

    def tables(self) -> Tuple[Any, Any]:
        """(instruments, instrument_examples) DataFrames of everything measured so far."""
        return (
            instrument_frame(self.rows, INSTRUMENT_COLUMNS),
            instrument_frame(self.example_rows, INSTRUMENT_EXAMPLE_COLUMNS),
        )

    def reference_arrays(self) -> Optional[Dict[str, np.ndarray]]:
        """The reference as arrays for ``instrument_reference.npz`` (None when nothing needs one yet)."""
        if "drift" not in self.names or not self.reference:
            return None
        arrays = {
            "sample_index": np.asarray(self.sample, dtype=np.int64),
            "reference_step": np.asarray(self.reference.get("step", -1), dtype=np.int64),
        }
        if "hidden" in self.reference:
            arrays["hidden"] = np.asarray(self.reference["hidden"], dtype=np.float32)
        for name, w in (self.reference.get("weights") or {}).items():
            # float32 holds bf16 / fp16 values exactly, and numpy has no bf16.
            value = w.detach().float().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32)
            arrays[_WEIGHT_KEY + name] = value
        return arrays

    def state_dict(self) -> Dict[str, Any]:
        rows, examples = self.tables()
        return {
            "config": dict(self.description),
            "rows": rows,
            "examples": examples,
            "reference": self.reference_arrays(),
        }

    def state_from_run(self, run) -> Optional[Dict[str, Any]]:
        """The saved instrument state of a loaded run directory (None when it had no instruments)."""
        described = run.config.get("instruments")
        if not isinstance(described, Mapping) or not described.get("names"):
            return None
        reference = load_instrument_reference(run.path) if "drift" in self.names else None
        return {
            "config": dict(described),
            "rows": run.instruments,
            "examples": run.instrument_examples,
            "reference": reference,
        }

    def load_state_dict(
        self, state: Optional[Mapping[str, Any]], *, up_to_step: Optional[int], where: str, points: int
    ):
        """Continue from a saved state (`state_dict()`, or a run directory's files); `points` = points kept.

        Raises:
            RunFormatError: when the saved values were measured on another sample or loss, or when the drift
                instrument's reference is missing (it cannot be recovered from a resumed model).
        """
        self.reset()
        if points == 0:
            return
        if not state:
            if "drift" in self.names:
                raise RunFormatError(
                    f"{where}: the saved trajectory has no instrument values, and the drift instrument needs the "
                    f"reference taken at the first tracking point ({INSTRUMENT_REFERENCE_FILE}), which a resumed "
                    "model cannot give back; resume without the drift instrument, or start the run again with it"
                )
            warnings.warn(
                f"{where}: the saved trajectory has no instrument values; the instruments start at the resumed step "
                "(the run config says instruments.history_complete = false)",
                RuntimeWarning,
                stacklevel=3,
            )
            self.description["history_complete"] = False
            return
        saved = dict(state.get("config") or {})
        for key, now in (
            ("sample_per_category", self.sample_per_category),
            ("seed", self.seed),
            ("set", self.set_name),
            ("loss", self.loss.kind),
        ):
            if key in saved and saved[key] != now:
                raise RunFormatError(
                    f"{where}: the saved instrument values were measured with {key} = {saved[key]!r}, this run has "
                    f"{now!r}; resume with the same instrument settings"
                )
        new = [n for n in self.names if n not in (saved.get("names") or [])]
        if new:
            if "drift" in new:
                raise RunFormatError(
                    f"{where}: the drift instrument was not on before this resume, so its reference (the first "
                    "tracking point) does not exist; resume without it, or start the run again with it"
                )
            warnings.warn(
                f"{where}: instruments {new} were not on before this resume; their values start at the resumed step",
                RuntimeWarning,
                stacklevel=3,
            )
            self.description["history_complete"] = False
        elif saved.get("history_complete") is False:
            self.description["history_complete"] = False
        rows = instrument_frame(state.get("rows"), INSTRUMENT_COLUMNS)
        examples = instrument_frame(state.get("examples"), INSTRUMENT_EXAMPLE_COLUMNS)
        if up_to_step is not None:
            rows = rows[rows["step"] <= up_to_step]
            examples = examples[examples["step"] <= up_to_step]
        self.rows = list(rows.itertuples(index=False, name=None))
        self.example_rows = list(examples.itertuples(index=False, name=None))
        if "drift" in self.names:
            self.reference = self._reference_from_arrays(state.get("reference"), where)

    def _reference_from_arrays(self, arrays: Optional[Mapping[str, np.ndarray]], where: str) -> Dict[str, Any]:
        if not arrays:
            raise RunFormatError(
                f"{where}: {INSTRUMENT_REFERENCE_FILE} is missing; the drift instrument needs the reference taken at "
                "the first tracking point, which a resumed model cannot give back (checkpoints hold it; a final run "
                "directory does not)"
            )
        index = np.asarray(arrays.get("sample_index", []), dtype=np.int64)
        if not np.array_equal(index, self.sample):
            raise RunFormatError(
                f"{where}: {INSTRUMENT_REFERENCE_FILE} was taken on another instrument sample than this run's"
            )
        ref: Dict[str, Any] = {"step": int(arrays.get("reference_step", -1))}
        if "hidden" in arrays:
            ref["hidden"] = np.asarray(arrays["hidden"], dtype=np.float32)
        ref["weights"] = {k[len(_WEIGHT_KEY) :]: np.asarray(v) for k, v in arrays.items() if k.startswith(_WEIGHT_KEY)}
        return ref

    def _materialize_reference(self, model) -> None:
        """Loaded reference weights (numpy) -> tensors on each parameter's device and in its dtype."""
        weights = self.reference.get("weights")
        if not weights or not any(isinstance(v, np.ndarray) for v in weights.values()):
            return
        params = dict(model.named_parameters())
        out = {}
        for name, value in weights.items():
            if name not in params:
                raise RunFormatError(
                    f"{INSTRUMENT_REFERENCE_FILE}: parameter {name!r} of the reference is not in the model"
                )
            p = params[name]
            out[name] = torch.as_tensor(value).to(device=p.device, dtype=p.dtype)
        self.reference["weights"] = out
