"""`AnnotationEntropyCallback`: per-example loss tracking for any `transformers.Trainer`.

A thin adapter: Trainer events drive an `EntropyTracker` (see `tracker.py`), which does the work.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from typing import Any, Dict, Mapping, Optional

from transformers import TrainerCallback

from .run_config import RunConfig
from .runs import TRACKING_DIRNAME, RunFormatError, find_tracking_dir
from .schedule import tracking_schedule  # noqa: F401  (re-exported: the schedule this callback follows)
from .tracker import DEFAULT_SAMPLE_PER_CATEGORY, EntropyTracker, distributed_world, unwrap_model

logger = logging.getLogger(__name__)

_OPTIONS = (
    "tokenizer, trainer, track_every, batch_size, text_columns, label_column, label_names, max_length, preprocess, "
    "thresholds, output_dir, run_config, log_metrics, nan_policy, autocast, instruments, "
    "instrument_sample_per_category, instrument_seed, instrument_loss"
)


def _from_stack(pick):
    """The first non-None `pick(frame_locals)` walking up the call stack, or None."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            found = pick(frame.f_locals)
            if found is not None:
                return found
            frame = frame.f_back
    finally:
        del frame
    return None


def _find_trainer():
    """The `Trainer` whose training loop is running, found on the call stack.

    Callbacks are not handed their Trainer and transformers documents no way to reach it; pass
    `trainer=` (or call `callback.set_trainer(trainer)`) to avoid this lookup.
    """
    from transformers import Trainer

    return _from_stack(lambda local: local.get("self") if isinstance(local.get("self"), Trainer) else None)


def _resume_checkpoint_on_stack() -> Optional[str]:
    """The `resume_from_checkpoint` path of the running `Trainer.train` call, if any.

    The Trainer keeps it in a local variable only; the checkpoint folder under `output_dir` is the
    fallback when this lookup finds nothing.
    """
    return _from_stack(
        lambda local: (
            local.get("resume_from_checkpoint") if isinstance(local.get("resume_from_checkpoint"), str) else None
        )
    )


class AnnotationEntropyCallback(TrainerCallback):
    """Track every tracked example's loss over training and relate it to annotation entropy.

    At step 0 (before the first update), every `track_every` optimizer steps, at every epoch end and
    at the last step (each step at most once) the model is put in eval mode and, without gradients,
    a batched, length-sorted forward pass over each tracked set stores the log-probabilities of all
    classes per example (in the model's class order; tracked labels given in another order of the same
    names are remapped, other names are refused). Under several processes each process takes a shard
    and the shards are gathered, so every example is stored exactly once; only the world process zero
    writes. The trajectory so far is saved with each checkpoint and picked up on resume. At the end of
    training the run directory (see `hf_entropy_callback.runs`) is written to ``<output_dir>/entropy_tracking``.

    At each point the mean loss per entropy category, each set's accuracy and the running Spearman rho
    of entropy vs loss are logged through the Trainer (so they reach TensorBoard / W&B and
    `state.log_history`) without touching the Trainer's own `loss` / `learning_rate` entries.

    The last point is the model as trained: when training stops early (e.g. `EarlyStoppingCallback`)
    it is recorded before `load_best_model_at_end` reloads a checkpoint; the reloaded model is not a
    point of its own, and `run_config["best_model_checkpoint"]` names it.

    Args:
        tracked (`datasets.Dataset` or `Mapping[str, datasets.Dataset]`):
            The tracked examples; see `EntropyTracker` for the columns.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): defaults to the Trainer's `processing_class`.
        trainer (`Trainer`, *optional*):
            The Trainer, for logging and for the checkpoint being resumed. When not given it is looked up
            on the call stack once, at the start of training.
        track_every (`int`, *optional*, defaults to 100): track every this many optimizer steps.
        batch_size (`int`, *optional*, defaults to 64): batch size of the tracking forward passes.
        text_columns, label_column, label_names, max_length, preprocess, thresholds, nan_policy:
            as in `EntropyTracker`. Set `max_length` to the truncation your training data used.
        output_dir (`str`, *optional*): where the run directory goes (default: `args.output_dir`).
        run_config (`RunConfig` or `Mapping`, *optional*):
            What the callback cannot read (dataset, data files, composition, ...), stored with the run. The
            method (full / lora / ia3), rank, alpha and target modules are read from the model's
            `peft_config`, the optimisation settings from `TrainingArguments` and the loss from a
            `ClassWeightedTrainer` (`RunConfig.for_training`); a given value that disagrees is replaced,
            with a warning.
        log_metrics (`bool`, *optional*, defaults to `True`): send per-point metrics to the Trainer's log.
        autocast (`bool`, *optional*):
            Run the tracking forward under bfloat16 autocast (see `EntropyTracker`). Default: the Trainer's
            `args.bf16`, so a bf16 run tracks its model as it trains it; fp16 and fp32 runs track in the model's
            own dtype (an fp32 run's values are exactly those of a plain forward). The log-probabilities are
            float32 either way.
        instruments (`Sequence[str]` or `str`, *optional*):
            Opt-in instruments measured at every tracking point (`"grad_alignment"`, `"grad_norms"`,
            `"drift"`; see `hf_entropy_callback.instruments`), saved with the trajectory and its checkpoints.
        instrument_sample_per_category (`int`, *optional*): examples per entropy category the instruments
            measure (a fixed, seeded, stratified sample of the first tracked set); default 32; `None` = the
            whole set.
        instrument_seed (`int`, *optional*, defaults to 0): seed of that sample.
        instrument_loss (*optional*): the loss the gradient instruments differentiate (see `EntropyTracker`);
            by default read from the Trainer: a `ClassWeightedTrainer`'s class-weighted CE or soft-label KL,
            else the unweighted cross-entropy.

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
        *positional,
        tokenizer=None,
        trainer=None,
        track_every: int = 100,
        batch_size: int = 64,
        text_columns=("premise", "hypothesis"),
        label_column: str = "label",
        label_names=None,
        max_length: Optional[int] = None,
        preprocess=None,
        thresholds=None,
        output_dir: Optional[str] = None,
        run_config: Optional[Mapping[str, Any]] = None,
        log_metrics: bool = True,
        nan_policy: str = "record",
        autocast: Optional[bool] = None,
        instruments=None,
        instrument_sample_per_category: Optional[int] = DEFAULT_SAMPLE_PER_CATEGORY,
        instrument_seed: int = 0,
        instrument_loss=None,
    ):
        if positional:
            raise TypeError(
                f"AnnotationEntropyCallback takes its options as keywords, e.g. AnnotationEntropyCallback(tracked, "
                f"tokenizer=tok, track_every=100); got {len(positional)} more positional argument(s). Options: {_OPTIONS}"
            )
        self.tracker = EntropyTracker(
            tracked,
            tokenizer,
            track_every=track_every,
            batch_size=batch_size,
            text_columns=text_columns,
            label_column=label_column,
            label_names=label_names,
            max_length=max_length,
            preprocess=preprocess,
            thresholds=thresholds,
            run_config=None,
            nan_policy=nan_policy,
            instruments=instruments,
            instrument_sample_per_category=instrument_sample_per_category,
            instrument_seed=instrument_seed,
            instrument_loss=instrument_loss,
        )
        if autocast is not None and not isinstance(autocast, bool):
            raise TypeError(f"AnnotationEntropyCallback: autocast must be None, True or False, got {autocast!r}")
        self.autocast = autocast
        self.trainer = trainer
        self.output_dir = output_dir
        self.user_config = run_config.to_dict() if isinstance(run_config, RunConfig) else dict(run_config or {})
        self.log_metrics = log_metrics

    def set_trainer(self, trainer) -> None:
        """Tell the callback its Trainer (instead of the call-stack lookup)."""
        self.trainer = trainer

    @property
    def run_config(self) -> Dict[str, Any]:
        """The configuration given for the run (a dict you may still add to before training starts)."""
        return self.user_config

    # Convenience views of the tracker's state.
    @property
    def sets(self):
        return self.tracker.sets

    @property
    def steps(self):
        return self.tracker.steps

    def losses(self, name: str = "train"):
        return self.tracker.losses(name)

    # ---- logging -----------------------------------------------------------------------------

    def _log(self, args, state, control, metrics: Dict[str, float]) -> None:
        if not metrics or not self.log_metrics:
            return
        trainer = self.trainer
        if trainer is None:
            state.log_history.append({**metrics, "step": state.global_step})
            return
        # Trainer.log sends the metrics to every reporting integration and to log_history, and its
        # callback handler then clears `should_log`; the Trainer decides after on_step_end whether to
        # write its own loss / grad_norm / learning_rate entry from that flag, so it is put back.
        flags = (control.should_log, control.should_evaluate, control.should_save)
        trainer.log(dict(metrics))
        for ctl in {id(control): control, id(trainer.control): trainer.control}.values():
            ctl.should_log, ctl.should_evaluate, ctl.should_save = flags

    def _track(self, args, state, control, model, reason: str) -> None:
        metrics = self.tracker.track(model, state.global_step, state.epoch or 0.0, reason)
        self._log(args, state, control, metrics)

    # ---- Trainer events ----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Tokenize the tracked sets, pick up a resumed trajectory, and record step 0."""
        if model is None:
            raise ValueError("AnnotationEntropyCallback: the Trainer passed no model to on_train_begin")
        if self.trainer is None:
            self.trainer = _find_trainer()
        suite = self.tracker.instruments
        if suite is not None and not suite.loss_given:
            from .instruments import InstrumentLoss

            suite.set_loss(InstrumentLoss.from_trainer(self.trainer))
        self.tracker.autocast = bool(getattr(args, "bf16", False)) if self.autocast is None else self.autocast
        self.tracker.prepare(model, self.tracker.tokenizer or processing_class or kwargs.get("tokenizer"))
        self.tracker.reset()
        self.tracker.config = self._collect_config(args, model)
        self._pending = None
        if state.global_step > 0:
            self._resume(args, state)
        else:
            # Logged at the first step instead of now: the Trainer's progress bar, which prints logs, is
            # set up in its own on_train_begin, after the user's callbacks.
            self._pending = self.tracker.track(model, 0, state.epoch or 0.0, "step0")

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush(args, state, control)

    def _flush(self, args, state, control) -> None:
        pending, self._pending = getattr(self, "_pending", None), None
        if pending:
            self._log(args, state, control, pending)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """Record every `track_every` steps, at the last step of an epoch, and at the final step."""
        reasons = []
        if self.tracker.track_every and state.global_step % self.tracker.track_every == 0:
            reasons.append("interval")
        # The Trainer sets epoch = e + (batch + 1) / batches_in_epoch, a whole number exactly at the
        # epoch's last step. Recording here rather than only in on_epoch_end puts the point into a
        # checkpoint saved at this step, so a resumed run has it too.
        if state.epoch and float(state.epoch).is_integer():
            reasons.append("epoch_end")
        if state.global_step >= state.max_steps or control.should_training_stop:
            reasons.append("final")
        if reasons:
            self._track(args, state, control, model, "+".join(reasons))

    def _record_stop(self, args, state, control, model) -> None:
        # Callbacks such as EarlyStoppingCallback stop training after on_step_end (in on_evaluate);
        # the next events still see the model as trained, before load_best_model_at_end reloads one.
        if control.should_training_stop and model is not None and state.global_step > 0:
            self._track(args, state, control, model, "final")

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._record_stop(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        """Record at every epoch end (a partial last epoch, from fractional epochs or `max_steps`, ends at
        the last step, as `tracking_schedule` says), and where training stops."""
        reasons = ["epoch_end"]
        if state.global_step >= state.max_steps or control.should_training_stop:
            reasons.append("final")
        if state.global_step > 0:
            self._track(args, state, control, model, "+".join(reasons))

    def on_save(self, args, state, control, model=None, **kwargs):
        """Save the trajectory so far beside the checkpoint just written, for resume."""
        self._record_stop(args, state, control, model)
        if not state.is_world_process_zero:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt):
            self.tracker.save(os.path.join(ckpt, TRACKING_DIRNAME))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Make sure the last step is recorded, then write the run directory."""
        self._flush(args, state, control)
        best = state.best_model_checkpoint if getattr(args, "load_best_model_at_end", False) else None
        if best:
            self.tracker.config["best_model_checkpoint"] = best
        if not self.tracker.steps or self.tracker.steps[-1] != state.global_step:
            if best:
                warnings.warn(
                    f"AnnotationEntropyCallback: training ended at step {state.global_step} outside the events the "
                    f"callback sees and the best model ({best}) was reloaded; the last tracked point is step "
                    f"{self.tracker.steps[-1]}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                self._track(args, state, control, model, "final")
        if state.is_world_process_zero:
            # The instruments' reference (for resuming) stays in the checkpoints: a finished run needs none.
            self.tracker.save(
                os.path.join(self.output_dir or args.output_dir, TRACKING_DIRNAME), instrument_reference=False
            )

    # ---- configuration and resume ------------------------------------------------------------

    def _collect_config(self, args, model) -> Dict[str, Any]:
        # One builder (RunConfig.for_training) completes what was given from the arguments, the model
        # and the Trainer's loss, so a user's own script is recorded under its real method and rank.
        world, _ = distributed_world()
        # A None the user left (every unset RunConfig field is one) must not erase what the tracker recorded.
        given = {**self.tracker.config, **{k: v for k, v in self.user_config.items() if v is not None}}
        config = RunConfig.for_training(args, unwrap_model(model), trainer=self.trainer, given=given, world_size=world)
        return config.to_dict()

    def _resume(self, args, state) -> None:
        candidates = []
        frame_ckpt = _resume_checkpoint_on_stack()
        if frame_ckpt:
            candidates.append(frame_ckpt)
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for ckpt in candidates:
            try:
                tdir = find_tracking_dir(os.path.join(ckpt, TRACKING_DIRNAME))
            except RunFormatError:
                continue
            self.tracker.load(tdir, up_to_step=state.global_step)
            return
        suite = self.tracker.instruments
        if suite is not None and "drift" in suite.names:
            raise RunFormatError(
                f"Resuming at step {state.global_step} without a saved trajectory (looked in {candidates}): the drift "
                "instrument's reference (the model at the first tracking point) cannot be recovered from the resumed "
                "model; resume without the drift instrument, or start the run again"
            )
        warnings.warn(
            f"Resuming at step {state.global_step} but no saved trajectory was found in {candidates}: tracking "
            "starts here, and the run lacks the earlier points (AULC and Delta L will not cover the whole run; the "
            "run is marked history_complete=false and left out of the analysis' means).",
            RuntimeWarning,
            stacklevel=2,
        )
        self.tracker.config["resumed_without_history"] = True
        self.tracker.config["history_complete"] = False
