"""Gradient instruments: alignment of the categories' gradients, and per-example gradient norms.

Both take gradients of the loss as trained (`InstrumentLoss`) with respect to the trainable
parameters only (`requires_grad`), so a LoRA run measures its adapter (and head) update space and a
full fine-tuning run all of its weights. Gradients come from `torch.autograd.grad` or `torch.func`,
never from `.backward()`: nothing is written into any parameter's `.grad`. The model is in eval mode
(no dropout), so a gradient is that of the deterministic network.

- ``grad_alignment``: per category c the summed gradient ``G_c = sum_i grad l_i`` over the sample's
  examples of c (summed over processes); rows ``cosine`` (group ``clean~contested``,
  ``clean~ambiguous``, ``ambiguous~contested``) = cos(G_a, G_b), and ``group_grad_norm`` (group = the
  category) = ``|G_c| / n_c``, the norm of the category's MEAN gradient, so that categories of
  different sizes compare. NaN where a category has no example or a zero gradient.
- ``grad_norms``: ``|grad l_i|`` per example (rows of ``instrument_examples.parquet``, quantity
  ``grad_norm``), and per category ``grad_norm_mean`` / ``grad_norm_median``.

Per-example gradients are vectorised with ``torch.func.vmap(grad(...))`` over a chunk of padded
examples. transformers builds its attention masks with data-dependent Python checks that vmap
cannot trace, so the chunk's mask is handed over already built (4-D, additive: 0 where a token may
attend, the dtype's minimum elsewhere; causal for decoders), which transformers passes through; a
model that reads a 2-D mask itself (DeBERTa-v2) gets the 2-D one. At the first point the strategy is
checked against single-example backward passes on two examples of the first chunk (the longest and
the most padded) and the first that agrees is kept (`"vmap_4d_mask"`, `"vmap_2d_mask"`); a model
that fails both gets a plain per-example loop (`"loop"`; one unpadded forward and backward each).
The chosen strategy is in the run config (`instruments.per_example_gradients`). The per-example pass
runs with eager attention (switched and restored as for the drift instrument, see `drift.py`):
torch.func has no batching rule for the SDPA kernels and would loop over the chunk inside them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..entropy import CATEGORIES
from ..tracker import _logits_of
from .base import INSTRUMENT_BATCH_SIZE, Instrument, Measurement, PointContext, trainable_parameters
from .drift import eager_attention

logger = logging.getLogger(__name__)

#: Pairs of categories whose gradients are compared, as (a, b) -> group "a~b".
ALIGNMENT_PAIRS = (("clean", "contested"), ("clean", "ambiguous"), ("ambiguous", "contested"))
#: Memory (bytes) one backward chunk may take (its activations, and per-example gradients under vmap): the
#: chunk shrinks to fit, down to one example (see `memory_chunks`).
CHUNK_MEMORY = 1 << 30
#: Activations a vmap(grad) pass keeps per example, relative to a plain backward pass of that example
#: (measured on CPU: about 1.6x for all-MiniLM-L6-v2, 2.8-3.3x for SmolLM2-135M, with LoRA).
VMAP_ACTIVATION_FACTOR = 3.5
#: Strategies for per-example gradients, tried in this order (see the module docstring).
STRATEGIES = ("vmap_4d_mask", "vmap_2d_mask", "loop")
#: Agreement a vmap strategy must show with single-example backward passes (relative).
_CHECK_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}


@dataclass
class GradientResult:
    """Gradients of one point over the whole sample (every process holds the same)."""

    sums: Dict[str, torch.Tensor]  # category -> flat float32 summed gradient over the trainable parameters
    counts: Dict[str, int]  # category -> examples
    norms: Optional[np.ndarray]  # per-example gradient norm in sample order (None without grad_norms)
    strategy: str


def additive_mask(attention_mask: torch.Tensor, decoder: bool, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, T, T) additive mask: 0 where a query may attend a key, the dtype's minimum elsewhere.

    Keys that are padding are masked; for a decoder also keys after the query (causal).
    """
    keep = attention_mask[:, None, None, :].bool()
    if decoder:
        t = attention_mask.shape[1]
        keep = keep & torch.tril(torch.ones(t, t, dtype=torch.bool, device=attention_mask.device))[None, None]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


class _Flat:
    """Offsets of the trainable parameters in one flat vector."""

    def __init__(self, params: List[Tuple[str, torch.nn.Parameter]]):
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.sizes = [p.numel() for p in self.params]
        self.total = sum(self.sizes)

    def zeros(self, device) -> torch.Tensor:
        return torch.zeros(self.total, dtype=torch.float32, device=device)

    def cat(self, grads) -> torch.Tensor:
        """Flat float32 vector of per-parameter gradients (None = unused parameter = zeros)."""
        return torch.cat(
            [
                (g.reshape(-1).float() if g is not None else torch.zeros(n, device=p.device))
                for g, n, p in zip(grads, self.sizes, self.params)
            ]
        )


def activation_bytes_per_token(config, seq_len: int) -> int:
    """A rough upper estimate of what a backward pass keeps per token: per layer about 12 hidden-size and
    4 intermediate-size float32 vectors, and the attention row of each head (eager attention keeps it)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or 1024
    inter = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None) or 24
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None) or 16
    return 4 * layers * (12 * hidden + 4 * inter + 3 * heads * seq_len)


def memory_chunks(ctx: PointContext, idx, per_example_bytes: int = 0, activation_factor: float = 1.0):
    """Positions into `idx` (sample entries, longest first) in chunks of at most `INSTRUMENT_BATCH_SIZE`
    examples within `CHUNK_MEMORY`.

    A chunk's cost is its size times (the longest example's activations x `activation_factor` +
    `per_example_bytes`), so long examples of a large model go one or a few at a time and short ones of
    a small model sixteen at a time.
    """
    idx = np.asarray(idx)
    config = getattr(ctx.model, "config", None)
    start = 0
    while start < len(idx):
        tokens = int(ctx.tset.token_length[ctx.sample[idx[start]]])
        each = per_example_bytes + activation_factor * tokens * activation_bytes_per_token(config, tokens)
        size = int(max(1, min(INSTRUMENT_BATCH_SIZE, CHUNK_MEMORY // max(each, 1))))
        yield np.arange(start, min(start + size, len(idx)))
        start += size


def _loss_of(ctx: PointContext, batch, idx) -> torch.Tensor:
    logits = _logits_of(ctx.model(**ctx.model_inputs(batch)), "instrument pass")
    return ctx.loss.per_example(logits, ctx.labels(idx), ctx.counts(idx))


def _single_grads(ctx: PointContext, flat: _Flat, i) -> torch.Tensor:
    """Flat gradient of one example's loss, from an unpadded forward and `autograd.grad`."""
    batch = ctx.batch([i])
    loss = _loss_of(ctx, batch, [i]).sum()
    return flat.cat(torch.autograd.grad(loss, flat.params, allow_unused=True))


def _vmap_grads(ctx: PointContext, flat: _Flat, idx, mask_kind: str) -> List[torch.Tensor]:
    """Per-example gradients of a padded chunk by `vmap(grad(...))`: one (chunk, numel) tensor per parameter."""
    from torch.func import functional_call, grad, vmap

    batch = ctx.batch(idx)
    inputs = ctx.model_inputs(batch)
    inputs.pop("attention_mask", None)
    am = batch["attention_mask"]
    mask = additive_mask(am, ctx.decoder, ctx.dtype) if mask_kind == "4d" else am
    pass_mask = ctx.accepted is None or "attention_mask" in ctx.accepted
    params = {n: p.detach() for n, p in zip(flat.names, flat.params)}
    model, loss = ctx.model, ctx.loss

    def one(p, inp, m, y, q):
        kw = {k: v.unsqueeze(0) for k, v in inp.items()}
        if pass_mask:
            kw["attention_mask"] = m.unsqueeze(0)
        logits = _logits_of(functional_call(model, p, args=(), kwargs=kw), "instrument pass")
        return loss.per_example(logits, y.unsqueeze(0), q.unsqueeze(0))[0]

    # randomness="error": in eval mode nothing may draw random numbers; a model that does fails here
    # (and is measured by the loop) rather than drawing different numbers than the training would.
    g = vmap(grad(one), in_dims=(None, 0, 0, 0, 0), randomness="error")(
        params, inputs, mask, ctx.labels(idx), ctx.counts(idx)
    )
    return [g[n].reshape(len(idx), -1) for n in flat.names]


def _chunk_norms(grads: List[torch.Tensor]) -> np.ndarray:
    """Each example's gradient norm over all parameters (per-parameter norms, combined in float64).

    No (chunk, P) copy is made: for a fully fine-tuned model that copy is the chunk's size times the model's.
    """
    squares = sum(torch.linalg.vector_norm(g.float(), dim=1).double().pow(2) for g in grads)
    return squares.sqrt().cpu().numpy()


def _add_chunk_sum(flat: _Flat, grads: List[torch.Tensor], total: torch.Tensor) -> None:
    """Add the chunk's summed per-example gradients into the flat vector `total`."""
    offset = 0
    for g, n in zip(grads, flat.sizes):
        total[offset : offset + n] += g.sum(0, dtype=torch.float32)
        offset += n


def _choose_strategy(ctx: PointContext, flat: _Flat, idx) -> Tuple[str, Optional[List[torch.Tensor]]]:
    """The first vmap strategy whose norms agree with single-example passes on this chunk, else "loop"."""
    probe = [0, len(idx) - 1] if len(idx) > 1 else [0]
    reference = np.array([float(torch.linalg.vector_norm(_single_grads(ctx, flat, idx[k]))) for k in probe])
    rtol = _CHECK_RTOL.get(ctx.dtype, 5e-2)
    problems = []
    for strategy, kind in (("vmap_4d_mask", "4d"), ("vmap_2d_mask", "2d")):
        try:
            grads = _vmap_grads(ctx, flat, idx, kind)
        except Exception as err:  # vmap cannot trace this model (data-dependent control flow, .item(), ...)
            problems.append(f"{strategy}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            continue
        got = _chunk_norms([g[probe] for g in grads])
        if np.all(np.isfinite(got)) and np.allclose(got, reference, rtol=rtol, atol=1e-8):
            return strategy, grads
        problems.append(f"{strategy}: norms {got.tolist()} vs single-example {reference.tolist()}")
    logger.info("Per-example gradients by a loop (vmap not usable for this model: %s)", "; ".join(problems))
    return "loop", None


def _per_example_pass(ctx, flat, cats, sums, local_norms, strategy) -> str:
    """Per-example gradients of this process's shard: norms into `local_norms`, sums into `sums`."""
    # Per example: its gradients (float32) and room for their float32 copies in the sums.
    factor = 1.0 if strategy == "loop" else VMAP_ACTIVATION_FACTOR  # undecided: sized for vmap
    # Chunks of one category each (longest first within it): the category's sum is then one reduction.
    for c in CATEGORIES:
        where = np.flatnonzero(cats == c)  # positions in this shard
        for chunk in memory_chunks(ctx, ctx.mine[where], 8 * flat.total, factor):
            part = where[chunk]
            idx = ctx.mine[part]
            grads = None
            if strategy is None:
                strategy, grads = _choose_strategy(ctx, flat, idx)
                ctx.cache["per_example_strategy"] = strategy
            if strategy == "loop":
                for k, i in zip(part, idx):
                    g = _single_grads(ctx, flat, i)
                    local_norms[k] = float(torch.linalg.vector_norm(g))
                    sums[c] += g
            else:
                if grads is None:
                    grads = _vmap_grads(ctx, flat, idx, "4d" if strategy == "vmap_4d_mask" else "2d")
                local_norms[part] = _chunk_norms(grads)
                _add_chunk_sum(flat, grads, sums[c])
                del grads
    return strategy


def gradient_pass(ctx: PointContext, per_example: bool) -> GradientResult:
    """Category gradient sums (and per-example norms) over the sample, once per point.

    Without per-example norms, each category's gradient comes from batched backward passes of the
    summed loss; with them, from the per-example gradients (summed).
    """
    key = ("gradients", per_example)
    if key in ctx.shared:
        return ctx.shared[key]
    flat = _Flat(trainable_parameters(ctx.model))
    if not flat.total:
        raise ValueError("gradient instruments: the model has no trainable parameters (requires_grad)")
    cats = ctx.categories(ctx.mine)
    sums = {c: flat.zeros(ctx.device) for c in CATEGORIES}
    local_norms = np.full(len(ctx.mine), np.nan, dtype=np.float64)
    strategy = "batched" if not per_example else ctx.cache.get("per_example_strategy")
    # Inference mode (a caller's) would make every tensor non-differentiable; grad mode is switched on
    # here only, and the model's parameters keep their requires_grad.
    with torch.inference_mode(False), torch.enable_grad():
        if not per_example:
            for c in CATEGORIES:
                members = ctx.mine[cats == c]
                for chunk in memory_chunks(ctx, members):
                    idx = members[chunk]
                    loss = _loss_of(ctx, ctx.batch(idx), idx).sum()
                    sums[c] += flat.cat(torch.autograd.grad(loss, flat.params, allow_unused=True))
        else:
            with eager_attention(ctx.model):
                # torch.func has no batching rule for the SDPA kernels (it would loop over the chunk); eager
                # attention's matmul and softmax vectorise. The model's own implementation is restored after.
                strategy = _per_example_pass(ctx, flat, cats, sums, local_norms, strategy)
    # Every process takes part in the same collectives in the same order, shard empty or not.
    sums = {c: ctx.all_reduce_sum(s) for c, s in sums.items()}
    counts = {c: int((ctx.categories(np.arange(len(ctx.sample))) == c).sum()) for c in CATEGORIES}
    norms = ctx.gather(local_norms) if per_example else None
    result = GradientResult(sums, counts, norms, strategy or "none")
    ctx.shared[key] = result
    return result


def gram(vectors: List[torch.Tensor], segment: int = 1 << 22) -> np.ndarray:
    """Float64 Gram matrix (all dot products) of equally long vectors, converted segment by segment.

    One pass over the vectors; only a segment of each is held in float64 at a time.
    """
    out = np.zeros((len(vectors), len(vectors)))
    for start in range(0, len(vectors[0]), segment):
        block = torch.stack([v[start : start + segment] for v in vectors]).double()
        out += (block @ block.T).cpu().numpy()
    return out


def cosine_from_gram(g: np.ndarray, a: int, b: int) -> float:
    """cos of vectors a and b from their Gram matrix; NaN when either is zero."""
    na, nb = math.sqrt(g[a, a]), math.sqrt(g[b, b])
    if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
        return float("nan")
    return float(g[a, b] / (na * nb))


class GradAlignment(Instrument):
    """Cosine similarity of the categories' summed gradients, and each category's mean-gradient norm."""

    name = "grad_alignment"

    def __init__(self, per_example: bool = False):
        self.per_example = per_example  # share the per-example pass when grad_norms runs too

    def measure(self, ctx: PointContext, out: Measurement) -> None:
        res = gradient_pass(ctx, self.per_example)
        g = gram([res.sums[c] for c in CATEGORIES])
        k = {c: i for i, c in enumerate(CATEGORIES)}
        for a, b in ALIGNMENT_PAIRS:
            ok = res.counts[a] > 0 and res.counts[b] > 0
            value = cosine_from_gram(g, k[a], k[b]) if ok else float("nan")
            out.add(self.name, "cosine", value, group=f"{a}~{b}")
        for c in CATEGORIES:
            n = res.counts[c]
            out.add(self.name, "group_grad_norm", math.sqrt(g[k[c], k[c]]) / n if n else float("nan"), group=c)


class GradNorms(Instrument):
    """Per-example gradient norms, and their mean and median per category."""

    name = "grad_norms"

    def measure(self, ctx: PointContext, out: Measurement) -> None:
        res = gradient_pass(ctx, True)
        norms = res.norms.astype(np.float64)
        cats = ctx.categories(np.arange(len(ctx.sample)))
        for c in CATEGORIES:
            vals = norms[cats == c]
            out.add(self.name, "grad_norm_mean", float(np.mean(vals)) if len(vals) else float("nan"), group=c)
            out.add(self.name, "grad_norm_median", float(np.median(vals)) if len(vals) else float("nan"), group=c)
        ids = ctx.example_ids(range(len(ctx.sample)))
        for k, (pos, ex_id) in enumerate(zip(ctx.sample, ids)):
            out.examples.append((self.name, "grad_norm", ctx.tset.name, int(pos), ex_id, float(norms[k])))
