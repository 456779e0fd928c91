"""LoRA / IA3 / full fine-tuning of sequence classifiers, with per-architecture defaults."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

METHODS = ("none", "lora", "ia3")
#: LoRA alpha / r, held constant across ranks when alpha is not given.
LORA_ALPHA_RATIO = 2.0


def lora_alpha_for(r: int, lora_alpha: Optional[float] = None) -> float:
    """The LoRA alpha used for rank `r`: `lora_alpha` when given, else `LORA_ALPHA_RATIO * r`."""
    return LORA_ALPHA_RATIO * r if lora_alpha is None else lora_alpha


#: Model types that classify from the last token (a `score` head) and want LEFT padding.
DECODER_MODEL_TYPES = frozenset(
    "qwen2 qwen2_moe qwen3 qwen3_moe llama mistral mixtral gemma gemma2 gemma3_text phi phi3 gpt2 gpt_neox gptj "
    "gpt_neo falcon olmo olmo2 starcoder2 stablelm mpt bloom opt smollm3 granite".split()
)
_DECODER_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

#: LoRA targets: query / value projections for encoders, q, k, v, o for decoders (the study's setup).
LORA_TARGETS: Dict[str, List[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
}
#: IA3 (target_modules, feedforward_modules): keys, values and the feed-forward output, as peft's defaults.
IA3_TARGETS: Dict[str, Tuple[List[str], List[str]]] = {
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "xlm-roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
}
_DECODER_IA3 = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
#: Head modules peft's SEQ_CLS task does not save by itself ("classifier" and "score" it does).
EXTRA_HEAD_MODULES: Dict[str, List[str]] = {
    "distilbert": ["pre_classifier"],
    "deberta-v2": ["pooler"],
    "deberta": ["pooler"],
}


def is_decoder(model_or_config) -> bool:
    """Whether a sequence classifier is decoder-only (last-token head, left padding)."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) in DECODER_MODEL_TYPES:
        return True
    # Decoder classification heads are called `score`; encoder ones `classifier`.
    return hasattr(model_or_config, "score") and not hasattr(model_or_config, "classifier")


def default_targets(model_type: str, method: str, decoder: bool = False) -> Tuple[List[str], List[str]]:
    """(target_modules, feedforward_modules) for `method` on `model_type`."""
    if method == "lora":
        if decoder:
            return list(_DECODER_ATTN), []
        if model_type in LORA_TARGETS:
            return list(LORA_TARGETS[model_type]), []
    elif method == "ia3":
        if decoder:
            return list(_DECODER_IA3[0]), list(_DECODER_IA3[1])
        if model_type in IA3_TARGETS:
            t, f = IA3_TARGETS[model_type]
            return list(t), list(f)
    raise ValueError(
        f"No default {method} target modules for model type {model_type!r}; pass --target_modules "
        "(and --feedforward_modules for ia3) naming the modules to adapt"
    )


def apply_peft(
    model,
    method: str = "lora",
    r: int = 8,
    lora_alpha: Optional[float] = None,
    lora_dropout: float = 0.05,
    target_modules: Optional[Sequence[str]] = None,
    feedforward_modules: Optional[Sequence[str]] = None,
):
    """Wrap a sequence classifier for LoRA or IA3 (or return it unchanged for `method="none"`).

    The classification head is always trained and saved with the adapter (peft's SEQ_CLS task saves
    `classifier` / `score`; DistilBERT's `pre_classifier` and DeBERTa's `pooler` are added here).

    Args:
        model (`PreTrainedModel`): a `...ForSequenceClassification` model.
        method (`str`): `"none"` (full fine-tuning), `"lora"` or `"ia3"`.
        r (`int`, *optional*, defaults to 8): LoRA rank.
        lora_alpha (`float`, *optional*): LoRA alpha; default `2 * r` (alpha / r = 2 at every rank).
        lora_dropout (`float`, *optional*, defaults to 0.05): LoRA dropout.
        target_modules (`Sequence[str]`, *optional*): modules to adapt; per-architecture default.
        feedforward_modules (`Sequence[str]`, *optional*): IA3 feed-forward modules (subset of targets).

    Returns:
        The (possibly PEFT-wrapped) model.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "none":
        return model
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    model_type = model.config.model_type
    decoder = is_decoder(model)
    if target_modules is None:
        target_modules, default_ff = default_targets(model_type, method, decoder)
        if feedforward_modules is None:
            feedforward_modules = default_ff
    modules_to_save = EXTRA_HEAD_MODULES.get(model_type)
    if method == "lora":
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=r,
            lora_alpha=lora_alpha_for(r, lora_alpha),
            lora_dropout=lora_dropout,
            target_modules=list(target_modules),
            modules_to_save=modules_to_save,
        )
    else:
        ff = list(feedforward_modules or [])
        if not set(ff) <= set(target_modules):
            raise ValueError(f"IA3 feedforward_modules {ff} must be a subset of target_modules {list(target_modules)}")
        config = IA3Config(
            task_type=TaskType.SEQ_CLS,
            target_modules=list(target_modules),
            feedforward_modules=ff,
            modules_to_save=modules_to_save,
        )
    return get_peft_model(model, config)


def count_parameters(model) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def describe_adaptation(model) -> dict:
    """How `model` is fine-tuned, read from the model itself, for a run's configuration.

    Returns `method` ("full", "lora", "ia3" or the peft type in lower case), `architecture`
    ("encoder" / "decoder") and, for LoRA, `rank`, `lora_alpha`, `lora_dropout`; for adapters
    also `target_modules`. Used when a user's own script passes no run configuration, so the run
    is never reported under an unknown method.
    """
    out = {"architecture": "decoder" if is_decoder(model) else "encoder", "method": "full"}
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return out
    name = getattr(model, "active_adapter", None)
    if not isinstance(name, str) or name not in peft_config:
        name = next(iter(peft_config))
    cfg = peft_config[name]
    kind = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", "adapter"))).lower()
    out["method"] = kind
    targets = getattr(cfg, "target_modules", None)
    if targets is not None:
        out["target_modules"] = sorted(targets) if isinstance(targets, (set, list, tuple)) else str(targets)
    if kind == "lora":
        out.update(rank=int(cfg.r), lora_alpha=float(cfg.lora_alpha), lora_dropout=float(cfg.lora_dropout))
    return out
