"""One run configuration: what a run was, built in one place and read back the same way everywhere.

`RunConfig` is saved as the ``config`` object of a run's ``entropy_tracking/run_config.json`` (with
``config_version``) and read back by `RunConfig.from_dict` (which `Run.run_config` calls). The study
script builds it from its arguments (`run_glue_entropy.build_run_config`), the callback completes it
from the Trainer's arguments, the model and the Trainer (`RunConfig.for_training`), and the analysis
groups runs by its fields (`hf_entropy_callback.study.conditions.describe_run`); none of them
guesses a missing setting on its own.

Precedence when the callback completes a given configuration: what it *reads* (the Trainer's
arguments, the model's PEFT adapter, the Trainer's loss) is what the run did, so it replaces a given
value that disagrees, with a warning naming both; what it cannot read (dataset, composition, data
files, ...) comes from the given configuration.

Fields are grouped by `FIELD_GROUPS`; ``extra`` holds any other key (a user's own notes), kept and
written back unchanged. Keys recorded while the run goes (``n_train``, parameter counts, class
weights, ``history_complete``, ...) are not part of `RunConfig.fingerprint`, the settings that must
match for an output folder's run to be continued.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

#: Version of the configuration's fields (independent of the run directory's format version).
#: 1: this dataclass. Configurations without ``config_version`` (written before it) are version 0 and
#: are upgraded by `RunConfig.from_dict` (see there).
RUN_CONFIG_VERSION = 1

_RECORDED = {"recorded": True}  # field metadata: filled while the run goes, not a setting


@dataclass
class RunConfig:
    """A tracked run's configuration (see the module docstring for who fills what).

    Every field may be `None` ("not recorded") except where a default is stated; the defaults are the
    study's main setting (composition "all", no label noise, loss "ce", one process, no gradient
    accumulation).

    Example:
        >>> cfg = RunConfig(method="lora", rank=8, lora_alpha=16.0, dataset="snli", learning_rate=1e-4)
        >>> cfg.to_dict()["rank"], RunConfig.from_dict(cfg.to_dict()) == cfg
        (8, True)
        >>> RunConfig.from_dict({"rank": 16}).method    # written before config_version: upgraded once, here
        'lora'
    """

    # -- model
    model_name_or_path: Optional[str] = None
    tokenizer_name: Optional[str] = None
    gguf_file: Optional[str] = None
    model_revision: Optional[str] = None
    model_type: Optional[str] = field(default=None, metadata=_RECORDED)
    architecture: Optional[str] = field(default=None, metadata=_RECORDED)  # "encoder" / "decoder"
    trainable_params: Optional[int] = field(default=None, metadata=_RECORDED)
    total_params: Optional[int] = field(default=None, metadata=_RECORDED)
    # -- adaptation
    method: Optional[str] = None  # "full", "lora", "ia3" (or another PEFT type, lower case)
    rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = None
    target_modules: Optional[Any] = None
    feedforward_modules: Optional[Any] = None
    # -- data
    dataset: Optional[str] = None
    composition: str = "all"
    label_noise: float = 0.0
    label_noise_exclude_original: bool = False
    chaosnli_file: Optional[str] = None
    train_file: Optional[str] = None
    train_dataset_config: Optional[str] = None
    bulk_size: Optional[int] = None
    chaosnli_val_fraction: Optional[float] = None
    split_seed: Optional[int] = None
    max_seq_length: Optional[int] = None
    pad_to_max_length: Optional[bool] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    max_tracked_samples: Optional[int] = None
    n_train: Optional[int] = field(default=None, metadata=_RECORDED)
    # Bulk examples actually in the training set: fewer than bulk_size when the bulk file holds fewer
    # (the MNLI subset's 9,999 for the study's 20,000), so reports name the data the run saw.
    n_bulk: Optional[int] = field(default=None, metadata=_RECORDED)
    n_tracked: Optional[int] = field(default=None, metadata=_RECORDED)
    n_validation: Optional[int] = field(default=None, metadata=_RECORDED)
    # -- loss
    loss: str = "ce"  # the training loss: "ce" (class-weighted when use_class_weights) or "soft_kl"
    use_class_weights: Optional[bool] = None
    class_weights: Optional[List[float]] = field(default=None, metadata=_RECORDED)
    # -- tracking
    track_every: Optional[int] = None
    label_names: Optional[List[str]] = field(default=None, metadata=_RECORDED)
    num_labels: Optional[int] = field(default=None, metadata=_RECORDED)
    thresholds: Optional[List[float]] = field(default=None, metadata=_RECORDED)
    max_length: Optional[int] = field(default=None, metadata=_RECORDED)
    tracked_loss: Optional[str] = field(default=None, metadata=_RECORDED)
    tracking_autocast: Optional[str] = field(default=None, metadata=_RECORDED)  # "bfloat16" when the pass autocasts
    # Train-mode records of the whole training set (`hf_entropy_callback.train_dynamics`); they do not
    # change the run's numbers, so they are recorded, not fingerprinted.
    record_train_dynamics: Optional[bool] = field(default=None, metadata=_RECORDED)
    # The instruments measured at tracking points and how (`hf_entropy_callback.instruments`): names,
    # sample per category, seed, loss, attention. Recorded, not fingerprinted: they do not change training.
    instruments: Optional[Dict[str, Any]] = field(default=None, metadata=_RECORDED)
    # -- optimisation (the Trainer's arguments)
    learning_rate: Optional[float] = None
    seed: Optional[int] = None
    data_seed: Optional[int] = None
    num_train_epochs: Optional[float] = None
    max_steps: Optional[int] = None
    per_device_train_batch_size: Optional[int] = None
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    lr_scheduler_type: Optional[str] = None
    warmup_steps: Optional[float] = None
    warmup_ratio: Optional[float] = None
    weight_decay: Optional[float] = None
    max_grad_norm: Optional[float] = None
    optim: Optional[str] = None
    adam_beta1: Optional[float] = None
    adam_beta2: Optional[float] = None
    adam_epsilon: Optional[float] = None
    label_smoothing_factor: Optional[float] = None
    fp16: Optional[bool] = None
    bf16: Optional[bool] = None
    # -- environment
    library_versions: Optional[Dict[str, Optional[str]]] = None
    # -- bookkeeping (not settings: never part of the fingerprint)
    run_name: Optional[str] = field(default=None, metadata=_RECORDED)
    preset: Optional[str] = field(default=None, metadata=_RECORDED)
    # -- what happened during the run
    resumed_without_history: Optional[bool] = field(default=None, metadata=_RECORDED)
    history_complete: Optional[bool] = field(default=None, metadata=_RECORDED)
    best_model_checkpoint: Optional[str] = field(default=None, metadata=_RECORDED)
    # -- anything else given (kept as is)
    extra: Dict[str, Any] = field(default_factory=dict, metadata=_RECORDED)

    # ---- reading and writing -----------------------------------------------------------------

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    def to_dict(self) -> Dict[str, Any]:
        """The flat JSON object stored in ``run_config.json`` (``extra`` keys at the top level)."""
        out: Dict[str, Any] = {"config_version": RUN_CONFIG_VERSION}
        for name in self.field_names():
            out[name] = getattr(self, name)
        for key, value in self.extra.items():
            if key not in out:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """Read a stored configuration; unknown keys go to ``extra``.

        Version 0 (no ``config_version``, written before this class) is upgraded here, once: a run
        with a ``rank`` but no ``method`` was LoRA, and ``max_length`` defaults to ``max_seq_length``
        (the script passed that to the tracker). Missing fields take the defaults above.

        Raises:
            ValueError: for a configuration written by a newer version of the library.
        """
        if isinstance(data, RunConfig):
            return dataclasses.replace(data, extra=dict(data.extra))
        data = dict(data)
        version = data.pop("config_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version > RUN_CONFIG_VERSION:
            raise ValueError(
                f"run configuration version {version!r} is newer than this library reads ({RUN_CONFIG_VERSION}); "
                "upgrade hf_entropy_callback"
            )
        names = set(cls.field_names())
        known = {k: v for k, v in data.items() if k in names and v is not None}
        extra = {k: v for k, v in data.items() if k not in names}
        if version == 0:
            if "method" not in known and known.get("rank") is not None:
                known["method"] = "lora"
            if "max_length" not in known and known.get("max_seq_length") is not None:
                known["max_length"] = known["max_seq_length"]
        return cls(**known, extra=extra)

    def fingerprint(self) -> Dict[str, Any]:
        """The settings that must match for an output folder's run to be continued or reused.

        Everything set before training that changes the run's numbers; not what is recorded while it
        runs, nor ``run_name`` / ``preset`` / ``extra``.
        """
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.metadata.get("recorded") and f.name != "extra"
        }

    def replace(self, **changes) -> "RunConfig":
        """A copy with `changes`; names that are not fields go to ``extra``."""
        names = set(self.field_names())
        extra = dict(self.extra)
        extra.update({k: v for k, v in changes.items() if k not in names})
        return dataclasses.replace(self, extra=extra, **{k: v for k, v in changes.items() if k in names})

    # ---- building it while a run starts -------------------------------------------------------

    @classmethod
    def for_training(
        cls,
        args=None,
        model=None,
        *,
        trainer=None,
        given: Optional[Mapping[str, Any]] = None,
        world_size: int = 1,
    ) -> "RunConfig":
        """The configuration of a run about to train: `given` completed from what can be read.

        Reads the Trainer's arguments `args` (learning rate, seed, epochs, batch, schedule), the `model`
        (name, type, encoder / decoder, parameter counts, PEFT method / rank / alpha / dropout / target
        modules from ``model.peft_config``; full fine-tuning when there is none) and, for a
        `ClassWeightedTrainer`, its loss and class weights. A `given` value that disagrees with what is
        read is replaced, with a warning naming both.
        """
        read: Dict[str, Any] = {}
        if model is not None:
            read.update(_read_model(model))
        if args is not None:
            read.update(_read_args(args, world_size))
        if trainer is not None:
            read.update(_read_trainer(trainer))
        given_cfg = cls.from_dict(given or {})
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        # A value equal to the field's default was not really given (a RunConfig() carries every default).
        given_keys = {k for k, v in dict(given or {}).items() if v is not None and not _same(v, defaults.get(k))}
        changes: Dict[str, Any] = {}
        conflicts = []
        for key, value in read.items():
            if key == "model_name_or_path":
                if given_cfg.model_name_or_path is None:  # the user's name (e.g. a hub id) stays
                    changes[key] = value
                continue
            if key in given_keys and not _same(getattr(given_cfg, key, None), value):
                conflicts.append(f"{key}: given {getattr(given_cfg, key)!r}, the run has {value!r}")
            elif key == "target_modules" and _same(given_cfg.target_modules, value):
                continue  # the same modules, kept in the form given (the fingerprint's form)
            changes[key] = value
        if conflicts:
            warnings.warn(
                "run_config disagrees with the Trainer's arguments / the model; recording what the run does ("
                + "; ".join(conflicts)
                + ")",
                UserWarning,
                stacklevel=3,
            )
        return given_cfg.replace(**changes)


def _read_model(model) -> Dict[str, Any]:
    from .peft_setup import count_parameters, describe_adaptation

    config = getattr(model, "config", None)
    n_train, n_total = count_parameters(model)
    read: Dict[str, Any] = {
        "model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
        "trainable_params": int(n_train),
        "total_params": int(n_total),
    }
    adaptation = describe_adaptation(model)
    if adaptation.get("method") == "full":
        # Full fine-tuning has no rank / alpha / adapter targets: a value given for them would be wrong.
        adaptation.update(rank=None, lora_alpha=None, lora_dropout=None, target_modules=None)
    read.update(adaptation)
    return read


def _read_args(args, world_size: int) -> Dict[str, Any]:
    return {
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": world_size,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": getattr(args, "warmup_steps", None),
        "warmup_ratio": getattr(args, "warmup_ratio", None),
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "fp16": bool(getattr(args, "fp16", False)),
        "bf16": bool(getattr(args, "bf16", False)),
    }


def _read_trainer(trainer) -> Dict[str, Any]:
    """The loss of a `ClassWeightedTrainer` (any Trainer with ``loss_type`` / ``class_weights``) and whether it
    records train-mode dynamics (`TrainDynamicsMixin`)."""
    out: Dict[str, Any] = {}
    if getattr(trainer, "record_train_dynamics", False):
        out["record_train_dynamics"] = True
    loss_type = getattr(trainer, "loss_type", None)
    if not isinstance(loss_type, str):
        return out  # another Trainer's loss is not known: what the user gave (or "ce") stays
    weights = getattr(trainer, "class_weights", None)
    out.update(loss=loss_type, use_class_weights=weights is not None)
    if weights is not None:
        out["class_weights"] = [float(w) for w in weights.tolist()]
    return out


def _module_set(value):
    if value is None:
        return None
    return {str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)}


def _same(a, b) -> bool:
    """Equal as settings: numbers by value, module lists as sets."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b if a is None or b is None else bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    if isinstance(a, (list, tuple, set)) or isinstance(b, (list, tuple, set)):
        return _module_set(a) == _module_set(b)
    return a == b


__all__ = ["RUN_CONFIG_VERSION", "RunConfig"]
