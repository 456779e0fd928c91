"""The training loss as the gradient instruments compute it, per example."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

#: Loss kinds: class-weighted cross-entropy, KL to the annotator distribution, plain cross-entropy.
LOSS_KINDS = ("class_weighted_ce", "soft_kl", "ce")


@dataclass(frozen=True)
class InstrumentLoss:
    """Which loss the gradients are taken of: the loss as trained, one value per example.

    - `"class_weighted_ce"`: ``w[y] * CE(logits, y)`` with the class weights of the training
      (`ClassWeightedTrainer`'s per-example term; its loss is the batch mean of these);
    - `"soft_kl"`: ``KL(q || softmax(logits))`` with q the example's annotator distribution
      (`label_counts`; one-hot of the label where the counts are all zero), as `soft_label_kl`;
    - `"ce"`: the unweighted cross-entropy of the training label.

    The label is the one the example is trained on (after any label noise).

    Args:
        kind (`str`): one of `LOSS_KINDS`.
        class_weights (`Tuple[float, ...]`, *optional*): per-class weights, in the model's class order;
            required by `"class_weighted_ce"` and refused by the others.
    """

    kind: str = "ce"
    class_weights: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"instrument loss must be one of {LOSS_KINDS}, got {self.kind!r}")
        if (self.kind == "class_weighted_ce") != (self.class_weights is not None):
            raise ValueError("instrument loss: class_weights are given with (and only with) kind='class_weighted_ce'")
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))

    @classmethod
    def coerce(cls, value) -> "InstrumentLoss":
        """An `InstrumentLoss` from itself, a kind name, or a dict with `kind` or `loss` (and `class_weights`)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict):  # {"kind": ...} or a run config's {"loss": ...} entry
            return cls(value.get("kind", value.get("loss", "ce")), value.get("class_weights"))
        raise TypeError(f"instrument_loss must be a kind name, a dict or an InstrumentLoss, got {type(value).__name__}")

    @classmethod
    def from_trainer(cls, trainer) -> "InstrumentLoss":
        """The loss a Trainer trains with: read from a `ClassWeightedTrainer` (loss type, class weights).

        A plain `transformers.Trainer` trains sequence classifiers with the model's own loss, the
        unweighted cross-entropy (`"ce"`). A Trainer whose `compute_loss` is overridden otherwise (or that
        has a `compute_loss_func`) cannot be read: `"ce"` is assumed and a warning says to pass
        `instrument_loss=`.
        """
        from transformers import Trainer

        from ..trainer import ClassWeightedTrainer

        if isinstance(trainer, ClassWeightedTrainer):
            if trainer.loss_type == "soft_kl":
                return cls("soft_kl")
            if trainer.class_weights is not None:
                return cls("class_weighted_ce", tuple(trainer.class_weights.tolist()))
            return cls("ce")
        custom = getattr(trainer, "compute_loss_func", None) is not None or (
            trainer is not None and type(trainer).compute_loss is not Trainer.compute_loss
        )
        if custom:
            logger.warning(
                "Instruments: %s computes its own loss, which the instruments cannot read; they take gradients of "
                "the unweighted cross-entropy. Pass instrument_loss= to the callback to say which loss it is.",
                type(trainer).__name__,
            )
        return cls("ce")

    def describe(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"loss": self.kind}
        if self.class_weights is not None:
            out["class_weights"] = list(self.class_weights)
        return out

    def per_example(self, logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Loss of each example, shape (batch,), in float32.

        Args:
            logits (`torch.Tensor`): (batch, classes).
            labels (`torch.Tensor`): (batch,) training labels.
            counts (`torch.Tensor`): (batch, classes) annotator counts (used by `"soft_kl"`).
        """
        # The Trainer's own per-example terms, so the instruments differentiate exactly what is trained.
        from ..trainer import soft_label_kl_terms, weighted_cross_entropy_terms

        labels = labels.to(logits.device)
        if self.kind == "soft_kl":
            return soft_label_kl_terms(logits, counts, labels)
        weights = None
        if self.kind == "class_weighted_ce":
            weights = torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        return weighted_cross_entropy_terms(logits, labels, weights)
