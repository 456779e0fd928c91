"""The tracking schedule of `AnnotationEntropyCallback`, computable without torch."""

from __future__ import annotations

import math
from typing import Dict, List, Optional


def tracking_schedule(
    num_examples: int,
    batch_size: int,
    num_epochs: int,
    track_every: int = 100,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
    max_steps: Optional[int] = None,
):
    """The tracking points `AnnotationEntropyCallback` records for a Trainer run, as (step, reason) pairs.

    Steps per epoch follow the Trainer: ``ceil(ceil(n / (batch * world)) / accumulation)`` (no
    `dataloader_drop_last`). Points: step 0, every `track_every` steps, every epoch end and the last
    step, each step once with its reasons joined by "+".

    Example:
        >>> tracking_schedule(50, 8, 3, track_every=4)[:4]
        [(0, 'step0'), (4, 'interval'), (7, 'epoch_end'), (8, 'interval')]
    """
    batches = math.ceil(num_examples / (batch_size * world_size))
    per_epoch = batches // gradient_accumulation_steps + int(batches % gradient_accumulation_steps > 0)
    last = max_steps if max_steps and max_steps > 0 else per_epoch * num_epochs
    points: Dict[int, List[str]] = {0: ["step0"]}
    for step in range(1, last + 1):
        reasons = []
        if track_every and step % track_every == 0:
            reasons.append("interval")
        if step % per_epoch == 0:
            reasons.append("epoch_end")
        if step == last:
            reasons.append("final")
        if reasons:
            points[step] = reasons
    return [(s, "+".join(r)) for s, r in sorted(points.items())]
