"""Drift instrument: attention entropy, representation similarity to the start (CKA), weight update norms.

Rows (instrument ``drift``) at every point:

- ``attention_entropy``, component = layer index ("0" = first layer): entropy (nats) of the
  read-out token's attention distribution over the example's non-padding tokens, mean over heads and
  over the sample's examples. The read-out token is the one the classifier reads: the first
  (``[CLS]`` / ``<s>``) for encoders, the last non-padding token for decoders. The weights are
  renormalised over the non-padding keys (the model's mask already gives padding ~0 weight).
- ``cka``, component = index into the model's ``hidden_states`` ("0" = the embeddings output, "i" =
  the output of layer i, as transformers returns them): linear CKA (Kornblith et al. 2019) between the
  sample's representations now and at the first tracking point; an example's representation is the
  mean of the layer's hidden states over its non-padding tokens (the read-out token alone is the same
  vector for every example at the embeddings). 1 = unchanged up to rotation and scale; NaN where a
  layer has no variance over the sample.
- ``update_norm``, component = module name (as in ``model.named_modules()``): Frobenius norm of the
  weight update since the first point. LoRA layers: of the effective update ``B A * scaling``
  (peft's ``get_delta_weight``, every active adapter); every other trainable parameter (full
  fine-tuning, the classification head, IA3 vectors, ...): of ``W - W0``, taken together per owning
  module. ``update_norm_total`` (component "") is the norm over all of them.

Attention weights: transformers' SDPA (and flash) kernels do not return them. For the instrument pass
only, a model whose attention is not already eager is switched to eager with
``set_attn_implementation("eager")`` and asked for ``output_attentions=True``; its previous
implementation is restored right after (also on an error), so training steps run the model's own
kernel. Eager and SDPA compute the same attention, so the entropies do not depend on the model's
implementation. A model that cannot switch (no AttentionInterface support) gets no
``attention_entropy`` rows, and the run config says so.

The reference (first point) is kept in memory and saved with the trajectory in checkpoints
(``instrument_reference.npz``): after a resume the Trainer has already loaded the checkpoint's
weights, so the initial ones could not be recovered from the model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional

import numpy as np
import torch

from .base import Instrument, Measurement, PointContext, trainable_parameters

#: Names of a LoRA layer's own factor containers (their update is B A * scaling, not W - W0).
_LORA_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_mode(model) -> Optional[str]:
    """How attention weights are obtained for `model`: "eager", "switch" (to eager and back) or None."""
    base = _base_model(model)
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if impl == "eager":
        return "eager"
    can = getattr(base, "_can_set_attn_implementation", None)
    if hasattr(base, "set_attn_implementation") and callable(can) and can():
        return "switch"
    return None


def describe_attention(model) -> str:
    """The run config's `instruments.attention` text for `model`."""
    impl = getattr(getattr(_base_model(model), "config", None), "_attn_implementation", None)
    mode = attention_mode(model)
    if mode == "eager":
        return "eager attention weights (output_attentions=True); the model runs eager attention"
    if mode == "switch":
        return (
            f"eager attention weights (output_attentions=True): the model's {impl!r} attention is switched to "
            f"'eager' for the instrument pass only and restored after it; training steps run {impl!r}"
        )
    return f"unavailable: the model runs {impl!r} attention and cannot switch to eager (no attention_entropy rows)"


@contextlib.contextmanager
def eager_attention(model):
    """Run the block with eager attention (yields True), restoring the model's own after; False if impossible."""
    mode = attention_mode(model)
    if mode != "switch":
        yield mode == "eager"
        return
    base = _base_model(model)
    configs = {}
    for module in base.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            configs[id(cfg)] = (cfg, cfg._attn_implementation_internal)
    original = base.config._attn_implementation
    try:
        base.set_attn_implementation("eager")
        yield True
    finally:
        base.set_attn_implementation(original)
        # Exactly the values found, sub-configs included (whatever set_attn_implementation resolved them to).
        for cfg, value in configs.values():
            cfg._attn_implementation_internal = value


def readout_index(attention_mask: torch.Tensor, decoder: bool) -> torch.Tensor:
    """Position of each row's read-out token: its first non-padding token, or its last for a decoder."""
    mask = attention_mask.bool()
    t = mask.shape[1]
    if decoder:
        return t - 1 - torch.argmax(mask.flip(1).int(), dim=1)
    return torch.argmax(mask.int(), dim=1)


def readout_attention_entropy(attentions, attention_mask: torch.Tensor, decoder: bool) -> torch.Tensor:
    """(batch, layers) entropy in nats of the read-out token's attention over non-padding keys, mean over heads.

    Args:
        attentions: one (batch, heads, queries, keys) tensor per layer (softmax weights).
        attention_mask (`torch.Tensor`): (batch, keys), 1 for tokens, 0 for padding.
        decoder (`bool`): read out the last token (else the first).
    """
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
    q = readout_index(attention_mask, decoder)
    valid = attention_mask.bool()[:, None, :]
    out = []
    for a in attentions:
        p = a[rows, :, q, :].double() * valid  # (batch, heads, keys)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
        ent = -torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(-1)
        out.append(ent.mean(-1))
    return torch.stack(out, dim=1)


def mean_pooled(hidden_states, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, layers + 1, hidden) mean of each hidden state over the non-padding tokens."""
    m = attention_mask.to(torch.float32)[:, :, None]
    n = m.sum(1).clamp_min(1.0)
    return torch.stack([(h.float() * m).sum(1) / n for h in hidden_states], dim=1)


def linear_cka(x, y) -> float:
    """Linear CKA of two representations of the same n examples, (n, d1) and (n, d2), in float64.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred Xc, Yc (computed through
    the n x n Gram matrices when n is smaller than the widths). NaN when either has no variance.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 8))
        >>> round(linear_cka(x, 3 * x @ np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))[0]), 6)
        1.0
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: {x.shape[0]} vs {y.shape[0]} examples")
    x = x - x.mean(0)
    y = y - y.mean(0)
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T
        hsic, nx, ny = (kx * ky).sum(), np.linalg.norm(kx), np.linalg.norm(ky)
    else:
        hsic, nx, ny = np.linalg.norm(y.T @ x) ** 2, np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if nx == 0 or ny == 0 or not (np.isfinite(nx) and np.isfinite(ny)):
        return float("nan")
    return float(hsic / (nx * ny))


def lora_layers(model) -> Dict[str, torch.nn.Module]:
    """The model's LoRA layers by module name (empty without peft or LoRA)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is optional for full fine-tuning
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _lora_prefixes(layers) -> tuple:
    return tuple(f"{name}.{part}." for name in layers for part in _LORA_FACTORS)


def initial_weights(model) -> Dict[str, torch.Tensor]:
    """Copies of the trainable parameters whose update is ``W - W0`` (all but LoRA's A and B factors)."""
    skip = _lora_prefixes(lora_layers(model))
    return {n: p.detach().clone() for n, p in trainable_parameters(model) if not n.startswith(skip)}


@torch.no_grad()
def update_norms(model, initial: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Frobenius norm of each module's update since `initial` (see the module docstring), in module order."""
    layers = lora_layers(model)
    skip = _lora_prefixes(layers)
    squares: Dict[str, float] = {}
    for name, layer in layers.items():
        total = 0.0
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {}):
                total += float(layer.get_delta_weight(adapter).double().pow(2).sum())
        squares[name] = total
    for name, p in trainable_parameters(model):
        if name.startswith(skip):
            continue
        if name not in initial:
            raise RuntimeError(
                f"drift: trainable parameter {name!r} has no initial value in the reference (the set of trainable "
                "parameters changed since the first tracking point)"
            )
        owner = name.rsplit(".", 1)[0]
        diff = p.detach().double() - initial[name].to(p.device).double()
        squares[owner] = squares.get(owner, 0.0) + float(diff.pow(2).sum())
    return {k: math.sqrt(v) for k, v in squares.items()}


class Drift(Instrument):
    """Attention entropy per layer, CKA to the first point per layer, and weight update norms per module."""

    name = "drift"

    def measure(self, ctx: PointContext, out: Measurement) -> None:
        ref = ctx.reference
        model = ctx.model
        local_ent, local_pooled = [], []
        with eager_attention(model) as has_attention, torch.inference_mode():
            for idx in ctx.chunks(ctx.mine):
                batch = ctx.batch(idx)
                output = model(**ctx.model_inputs(batch), output_hidden_states=True, output_attentions=has_attention)
                am = batch["attention_mask"]
                hidden = getattr(output, "hidden_states", None)
                attentions = getattr(output, "attentions", None) if has_attention else None
                if hidden is not None:
                    local_pooled.append(mean_pooled(hidden, am).cpu())
                if attentions is not None:
                    local_ent.append(readout_attention_entropy(attentions, am, ctx.decoder).float().cpu())
        # Each process learns the layer counts from a first example (a process with an empty shard
        # still takes part in the gathers, with the shapes the others send).
        shapes = self._shapes(ctx, local_pooled, local_ent)
        if shapes["hidden"] is not None:
            pooled = ctx.gather(_stack(local_pooled, (len(ctx.mine),) + shapes["hidden"]))
            pooled = np.transpose(pooled, (1, 0, 2))  # (layers + 1, examples, hidden)
            if "hidden" not in ref:
                ref["hidden"] = pooled.copy()
            if ref["hidden"].shape != pooled.shape:
                raise RuntimeError(
                    f"drift: the reference representations have shape {ref['hidden'].shape}, now {pooled.shape} "
                    "(another sample or model than at the first point)"
                )
            for layer in range(pooled.shape[0]):
                out.add(self.name, "cka", linear_cka(pooled[layer], ref["hidden"][layer]), component=str(layer))
        if shapes["attention"] is not None:
            ent = ctx.gather(_stack(local_ent, (len(ctx.mine),) + shapes["attention"]))
            for layer in range(ent.shape[1]):
                out.add(self.name, "attention_entropy", float(np.mean(ent[:, layer])), component=str(layer))
        if "weights" not in ref:
            ref["weights"] = initial_weights(model)
        norms = update_norms(model, ref["weights"])
        for module, value in norms.items():
            out.add(self.name, "update_norm", value, component=module)
        out.add(self.name, "update_norm_total", math.sqrt(sum(v * v for v in norms.values())))

    @staticmethod
    def _shapes(ctx: PointContext, pooled: List[torch.Tensor], ent: List[torch.Tensor]) -> dict:
        """Per-example shapes of the pooled states and entropies, agreed over processes (None = not available)."""
        mine = [
            pooled[0].shape[1] if pooled else -1,
            pooled[0].shape[2] if pooled else -1,
            ent[0].shape[1] if ent else -1,
        ]
        if ctx.world > 1:
            t = torch.tensor(mine, dtype=torch.float32)
            mine = [int(v) for v in ctx.all_reduce_max(t)]
        return {
            "hidden": (mine[0], mine[1]) if mine[0] > 0 else None,
            "attention": (mine[2],) if mine[2] > 0 else None,
        }


def _stack(parts: List[torch.Tensor], shape: tuple) -> np.ndarray:
    if parts:
        return torch.cat(parts).numpy()
    return np.zeros(shape, dtype=np.float32)
