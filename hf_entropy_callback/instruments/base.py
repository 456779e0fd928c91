"""What every instrument is given at a tracking point (`PointContext`) and what it returns (`Measurement`)."""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

from ..peft_setup import is_decoder
from ..tracker import TrackedSet, _forward_parameters, distributed_world

#: The instruments, in the order they are measured (`parse_instruments` accepts any order).
INSTRUMENTS = ("grad_alignment", "grad_norms", "drift")

#: Examples per forward (and per vmap chunk) in the instrument passes: the sample is small, and eager
#: attention weights of every layer are held for a whole batch.
INSTRUMENT_BATCH_SIZE = 16


def parse_instruments(value) -> Tuple[str, ...]:
    """Instrument names from a list or a comma- / space-separated string, checked, each once, in `INSTRUMENTS` order.

    Example:
        >>> parse_instruments("drift, grad_norms")
        ('grad_norms', 'drift')
        >>> parse_instruments(None)
        ()
    """
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    names = []
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"instrument names must be strings, got {item!r}")
        names.extend(item.replace(",", " ").split())
    unknown = [n for n in names if n not in INSTRUMENTS]
    if unknown:
        raise ValueError(f"unknown instrument(s) {unknown}; the instruments are {', '.join(INSTRUMENTS)}")
    return tuple(n for n in INSTRUMENTS if n in names)


@dataclass
class Measurement:
    """The values one instrument pass produced at one point, before they are stored.

    `rows` are (instrument, quantity, group, component, value); `examples` are (instrument, quantity,
    set, index, example_id, value); the point and step are added when the point is recorded.
    """

    point: int
    step: int
    rows: List[Tuple[str, str, str, str, float]] = field(default_factory=list)
    examples: List[Tuple[str, str, str, int, str, float]] = field(default_factory=list)

    def add(self, instrument: str, quantity: str, value: float, *, group: str = "", component: str = "") -> None:
        self.rows.append((instrument, quantity, group, component, float(value)))


class Instrument:
    """An instrument: measured at tracking points on the instrument sample, in eval mode.

    Subclasses set `name` (one of `INSTRUMENTS`) and implement `measure`, which appends tidy rows to
    the `Measurement`. Every process calls `measure` (the sample is sharded over processes, like the
    tracking pass) and must leave the same rows on each; the world process zero writes them.
    """

    name = ""

    def measure(self, ctx: "PointContext", out: Measurement) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def preserved_rng():
    """Leave every random stream as it was: torch (CPU and each initialised CUDA device), numpy, `random`.

    The instruments draw no random numbers themselves (eval mode, no dropout), but anything in a model's
    forward that does would otherwise shift the training's dropout masks and data order.
    """
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


class PointContext:
    """The model and the instrument sample at one tracking point, with batching and collectives.

    Attributes:
        model: the unwrapped model (DDP / compile wrappers peeled off), in eval mode.
        tset (`TrackedSet`): the tracked set the sample is drawn from.
        sample (`np.ndarray`): positions of the sample in `tset`, longest first (the shard order).
        mine (`np.ndarray`): indices into `sample` of this process's shard (every `world`-th).
        decoder (`bool`): the model reads out the last token (else the first).
        step (`int`): the optimizer step of the point.
        reference (`dict`): what instruments keep from the first point (filled by them, saved for resume).
    """

    def __init__(
        self, model, tokenizer, tset: TrackedSet, sample: np.ndarray, loss, step: int, cache: dict, reference: dict
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.tset = tset
        self.sample = sample
        self.loss = loss
        self.step = step
        self.cache = cache  # survives across points (e.g. the per-example gradient strategy)
        self.reference = reference  # the drift instrument's reference, taken at the first point
        self.world, self.rank = distributed_world()
        self.mine = np.arange(len(sample))[self.rank :: self.world]
        first = next(model.parameters())
        self.device = first.device
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.accepted = _forward_parameters(model)
        self.decoder = is_decoder(model)
        self.shared: dict = {}  # results several instruments use at this point (computed once)

    # ---- batches ------------------------------------------------------------------------------

    def batch(self, sample_idx) -> Dict[str, torch.Tensor]:
        """Padded model inputs of the given sample entries, always with an `attention_mask`."""
        feats = []
        for i in sample_idx:
            f = self.tset.features[int(self.sample[i])]
            keep = ("input_ids", "attention_mask")
            feats.append({k: v for k, v in f.items() if self.accepted is None or k in self.accepted or k in keep})
        batch = dict(self.tokenizer.pad(feats, padding=True, return_tensors="pt"))
        if "attention_mask" not in batch:
            # Rebuilt from the lengths (the padding side is the tokenizer's): the instruments need it to
            # find the read-out token and to leave padding out.
            width = batch["input_ids"].shape[1]
            mask = torch.zeros_like(batch["input_ids"])
            for row, f in enumerate(feats):
                n = len(f["input_ids"])
                if self.tokenizer.padding_side == "left":
                    mask[row, width - n :] = 1
                else:
                    mask[row, :n] = 1
            batch["attention_mask"] = mask
        return {k: v.to(self.device) for k, v in batch.items()}

    def chunks(self, sample_idx, size: int = INSTRUMENT_BATCH_SIZE) -> Iterator[np.ndarray]:
        sample_idx = np.asarray(sample_idx)
        for start in range(0, len(sample_idx), size):
            yield sample_idx[start : start + size]

    def model_inputs(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """`batch` without the inputs the model's forward does not take (e.g. an attention mask)."""
        return {k: v for k, v in batch.items() if self.accepted is None or k in self.accepted}

    def labels(self, sample_idx) -> torch.Tensor:
        return torch.as_tensor(self.tset.labels[self.sample[np.asarray(sample_idx)]], device=self.device)

    def counts(self, sample_idx) -> torch.Tensor:
        return torch.as_tensor(
            self.tset.label_counts[self.sample[np.asarray(sample_idx)]], dtype=torch.float32, device=self.device
        )

    def categories(self, sample_idx) -> np.ndarray:
        return self.tset.categories[self.sample[np.asarray(sample_idx)]].astype(str)

    # ---- collectives --------------------------------------------------------------------------

    def _comm_device(self):
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def gather(self, local: np.ndarray) -> np.ndarray:
        """Per-sample values of this shard (rows in `mine` order) -> the whole sample's (rows in `sample` order).

        As in the tracking pass, shards are padded to one size for `all_gather` and the padding is dropped
        by index, so every entry is stored once.
        """
        local = np.asarray(local, dtype=np.float32)
        out = np.full((len(self.sample),) + local.shape[1:], np.nan, dtype=np.float32)
        if self.world == 1:
            out[self.mine] = local
            return out
        dev = self._comm_device()
        width = math.ceil(len(self.sample) / self.world)
        vals = torch.full((width,) + local.shape[1:], float("nan"), device=dev)
        vals[: len(self.mine)] = torch.as_tensor(local, device=dev)
        index = torch.full((width,), -1, dtype=torch.long, device=dev)
        index[: len(self.mine)] = torch.as_tensor(self.mine, device=dev)
        all_vals = [torch.empty_like(vals) for _ in range(self.world)]
        all_index = [torch.empty_like(index) for _ in range(self.world)]
        torch.distributed.all_gather(all_vals, vals)
        torch.distributed.all_gather(all_index, index)
        for v, i in zip(all_vals, all_index):
            ok = i >= 0
            out[i[ok].cpu().numpy()] = v[ok].cpu().numpy()
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes (itself with one process)."""
        if self.world == 1:
            return tensor
        dev = self._comm_device()
        moved = tensor.to(dev)
        torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.SUM)
        return moved.to(tensor.device)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of `tensor` over the processes."""
        if self.world == 1:
            return tensor
        moved = tensor.to(self._comm_device())
        torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.MAX)
        return moved.to(tensor.device)

    def example_ids(self, sample_idx) -> List[str]:
        return [self.tset.example_ids[int(self.sample[i])] for i in sample_idx]


def trainable_parameters(model) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter that is trained (`requires_grad`), in the model's order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
