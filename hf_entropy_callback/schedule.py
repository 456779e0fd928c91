"""The tracking schedule of `AnnotationEntropyCallback`, computable without torch."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union


def _steps_per_epoch(num_examples: int, batch_size: int, gradient_accumulation_steps: int, world_size: int) -> int:
    # As `Trainer.set_initial_training_values`: batches per process, then optimizer updates (a last,
    # shorter accumulation round still makes an update).
    batches = math.ceil(num_examples / (batch_size * world_size))
    return max(batches // gradient_accumulation_steps + int(batches % gradient_accumulation_steps > 0), 1)


def tracking_schedule(
    num_examples: int,
    batch_size: int,
    num_epochs: Union[int, float],
    *,
    track_every: int = 100,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
    max_steps: Optional[int] = None,
) -> List[Tuple[int, str]]:
    """The tracking points `AnnotationEntropyCallback` records for a Trainer run, as (step, reason) pairs.

    The number of steps follows the Trainer: ``ceil(ceil(n / (batch * world)) / accumulation)`` steps per epoch
    (no `dataloader_drop_last`), ``ceil(num_epochs * steps_per_epoch)`` steps in all, or `max_steps` when it is
    positive. Points: step 0, every `track_every` steps, every epoch end and the last step, each step once with
    its reasons joined by "+" in that order. A partial last epoch (a fractional `num_epochs`, or `max_steps`
    inside an epoch) ends at the last step, where the Trainer calls `on_epoch_end`, so the last step is always
    an epoch end.

    Args:
        num_examples (`int`):
            Size of the training set.
        batch_size (`int`):
            Per-device training batch size.
        num_epochs (`int` or `float`):
            `num_train_epochs`; may be fractional, as in `TrainingArguments`. Ignored when `max_steps` is positive.
        track_every (`int`, *optional*, defaults to 100):
            Track every this many optimizer steps (0 = only step 0, epoch ends and the last step).
        gradient_accumulation_steps (`int`, *optional*, defaults to 1):
            Batches per optimizer step.
        world_size (`int`, *optional*, defaults to 1):
            Number of data-parallel processes.
        max_steps (`int`, *optional*):
            `TrainingArguments.max_steps`; when positive it overrides `num_epochs`, as in the Trainer.

    Returns:
        `List[Tuple[int, str]]`: the (step, reason) pairs in step order.

    Raises:
        ValueError: for `num_examples` or `batch_size` below 1, `num_epochs` not a positive finite number
            (when no positive `max_steps` is given), `gradient_accumulation_steps` or `world_size` below 1, or a
            negative `track_every`.

    Example:
        >>> tracking_schedule(50, 8, 3, track_every=4)[:4]
        [(0, 'step0'), (4, 'interval'), (7, 'epoch_end'), (8, 'interval')]

        Fractional epochs: 7 steps per epoch, 2.5 epochs make ``ceil(17.5) = 18`` steps.

        >>> tracking_schedule(50, 8, 2.5, track_every=0)
        [(0, 'step0'), (7, 'epoch_end'), (14, 'epoch_end'), (18, 'epoch_end+final')]
    """
    for name, value in (
        ("num_examples", num_examples),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("world_size", world_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"tracking_schedule: {name} must be an integer >= 1, got {value!r}")
    if not isinstance(track_every, int) or track_every < 0:
        raise ValueError(
            f"tracking_schedule: track_every must be an integer >= 0 (0 = no interval points), got {track_every!r}"
        )
    per_epoch = _steps_per_epoch(num_examples, batch_size, gradient_accumulation_steps, world_size)
    if max_steps is not None and max_steps > 0:
        last = int(max_steps)
    else:
        if num_epochs is None or not math.isfinite(num_epochs) or num_epochs <= 0:
            raise ValueError(
                f"tracking_schedule: num_epochs must be a positive number (or pass max_steps > 0), got {num_epochs!r}"
            )
        # The Trainer's expression, float rounding included (2.2 * 25 -> 55.00000000000001 -> 56 steps).
        last = math.ceil(num_epochs * per_epoch)
    points: Dict[int, List[str]] = {0: ["step0"]}
    for step in range(1, last + 1):
        reasons = []
        if track_every and step % track_every == 0:
            reasons.append("interval")
        if step % per_epoch == 0 or step == last:
            reasons.append("epoch_end")
        if step == last:
            reasons.append("final")
        if reasons:
            points[step] = reasons
    return [(s, "+".join(r)) for s, r in sorted(points.items())]
