"""`ClassWeightedTrainer`: class-weighted cross-entropy (or soft-label KL) that is exact under gradient accumulation."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from .train_dynamics import EXAMPLE_INDEX_COLUMN, TrainDynamicsMixin

LOSS_TYPES = ("ce", "soft_kl")
#: Dataset column holding each example's annotator label counts (used by `loss_type="soft_kl"`).
SOFT_LABEL_COLUMN = "label_counts"


def inverse_frequency_weights(labels: Sequence[int], num_labels: int) -> np.ndarray:
    """Class weights ``w_c = N / (K * n_c)`` from training labels.

    Args:
        labels (`Sequence[int]`): the training labels (ids in `0..num_labels-1`).
        num_labels (`int`): K, the number of classes.

    Returns:
        `np.ndarray` of shape `(K,)`; the weights average to 1 over the training examples.

    Example:
        >>> inverse_frequency_weights([0, 0, 0, 1], 2)
        array([0.66666667, 2.        ])
    """
    y = np.asarray(labels, dtype=np.int64)
    if y.size == 0:
        raise ValueError("inverse_frequency_weights: no training labels")
    if y.min() < 0 or y.max() >= num_labels:
        raise ValueError(f"training labels must be in 0..{num_labels - 1}, got values {y.min()}..{y.max()}")
    counts = np.bincount(y, minlength=num_labels)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        raise ValueError(f"classes {empty} have no training examples; pass class_weights explicitly")
    return y.size / (num_labels * counts.astype(np.float64))


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of ``w[y_i] * CE_i``.

    Unlike `torch.nn.CrossEntropyLoss(weight=...)`, which divides by the sum of the batch's target weights,
    this divides by the number of examples, so the mean of micro-batch losses equals the loss of the whole
    batch and gradient accumulation is exact.

    Example:
        Both examples have cross-entropy ``ln(1 + e^-2) = 0.1269``; weights 1 and 3 average to 2 over the batch:

        >>> logits, labels = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
        >>> round(float(weighted_cross_entropy(logits, labels, None)), 4)
        0.1269
        >>> round(float(weighted_cross_entropy(logits, labels, torch.tensor([1.0, 3.0]))), 4)
        0.2539
    """
    return weighted_cross_entropy_terms(logits, labels, weights).mean()


def weighted_cross_entropy_terms(
    logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor]
) -> torch.Tensor:
    """Per-example ``w[y_i] * CE_i``, shape (batch,): the terms `weighted_cross_entropy` averages."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    if weights is not None:
        ce = ce * weights.to(ce.device)[labels]
    return ce


def soft_label_kl(logits: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(q_i || p_i), q_i = the annotator distribution of example i.

    Examples whose counts are all zero (no annotator distribution, e.g. bulk examples) use the one-hot
    distribution of their label, for which the KL equals the cross-entropy.
    """
    return soft_label_kl_terms(logits, counts, labels).mean()


def soft_label_kl_terms(logits: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example KL(q_i || p_i), shape (batch,): the terms `soft_label_kl` averages."""
    logp = F.log_softmax(logits.float(), dim=-1)
    counts = counts.to(logp.device, torch.float32)
    total = counts.sum(dim=-1, keepdim=True)
    onehot = F.one_hot(labels, logp.shape[-1]).float()
    q = torch.where(total > 0, counts / total.clamp_min(1e-12), onehot)
    # q log q with 0 log 0 = 0
    qlogq = torch.where(q > 0, q * torch.log(q.clamp_min(1e-30)), torch.zeros_like(q))
    return (qlogq - q * logp).sum(dim=-1)


class _ClassWeightedLoss(Trainer):
    """The loss of `ClassWeightedTrainer`, in a base class of its own so that `TrainDynamicsMixin`, which comes
    before it in `ClassWeightedTrainer`'s bases, wraps it (see `hf_entropy_callback.train_dynamics`)."""

    # The loss is a per-micro-batch mean: let the Trainer divide by the accumulation steps (5.x).
    loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Weighted CE (or soft KL) of the model's logits; `num_items_in_batch` is not used: the loss
        is a per-micro-batch mean that the Trainer divides by the accumulation steps."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs.pop("label", None)
        counts = inputs.pop(SOFT_LABEL_COLUMN, None)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if labels is None:
            raise ValueError("ClassWeightedTrainer.compute_loss: the batch has no labels")
        labels = labels.to(logits.device).long()
        if self.loss_type == "soft_kl":
            if counts is None:
                raise ValueError(f"loss_type='soft_kl' needs a '{SOFT_LABEL_COLUMN}' column in the training data")
            loss = soft_label_kl(logits, counts, labels)
        else:
            loss = weighted_cross_entropy(logits, labels, self.class_weights)
        return (loss, outputs) if return_outputs else loss


class ClassWeightedTrainer(TrainDynamicsMixin, _ClassWeightedLoss):
    """A `transformers.Trainer` that trains sequence classifiers with class-weighted cross-entropy.

    The loss is the batch mean of ``w[y] * CE`` with inverse-frequency weights ``w_c = N / (K n_c)``
    computed from the training labels (or given), or, with `loss_type="soft_kl"`, the KL divergence to
    each example's annotator distribution (column `label_counts`; one-hot where it is all zeros).
    The per-micro-batch mean is divided by the gradient-accumulation steps exactly once by the Trainer,
    on transformers 4.46+ and 5.x alike, so batch 32 and batch 16 x 2 accumulation give the same
    gradients. Works with any model whose output has `logits`, PEFT-wrapped ones included.

    Args:
        class_weights (`Sequence[float]`, *optional*):
            Per-class weights; by default inverse class frequency of `train_dataset`'s labels.
        use_class_weights (`bool`, *optional*, defaults to `True`):
            Whether the cross-entropy is weighted.
        loss_type (`str`, *optional*, defaults to `"ce"`):
            `"ce"` (class-weighted cross-entropy to the gold label) or `"soft_kl"` (unweighted KL to the
            annotator distribution).
        record_train_dynamics (`bool`, *optional*, defaults to `False`):
            Keep every training example's loss and log-probabilities from the training forward, each time it
            is seen, and write them per epoch to ``<output_dir>/train_dynamics/`` (train mode; see
            `hf_entropy_callback.train_dynamics`). The stored loss is the unweighted cross-entropy of the
            label, whatever `use_class_weights` and `loss_type` say. Off: no files and no change to training.
        train_dynamics_dir, example_index_column, example_ids:
            as in `hf_entropy_callback.train_dynamics.TrainDynamicsMixin`.
        *args, **kwargs: passed to `transformers.Trainer`.
    """

    def __init__(
        self,
        *args,
        class_weights: Optional[Sequence[float]] = None,
        use_class_weights: bool = True,
        loss_type: str = "ce",
        record_train_dynamics: bool = False,
        train_dynamics_dir: Optional[str] = None,
        example_index_column: str = EXAMPLE_INDEX_COLUMN,
        example_ids: Union[str, Sequence[str], None] = None,
        **kwargs,
    ):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        super().__init__(
            *args,
            record_train_dynamics=record_train_dynamics,
            train_dynamics_dir=train_dynamics_dir,
            example_index_column=example_index_column,
            example_ids=example_ids,
            **kwargs,
        )
        self.loss_type = loss_type
        # 4.46-4.57 decide the GA division from this flag: False means "divide by GA steps", and it also
        # stops the Trainer from counting num_items_in_batch for a loss it does not compute.
        self.model_accepts_loss_kwargs = False
        num_labels = self._num_labels()
        if not use_class_weights:
            weights = None
        elif class_weights is not None:
            weights = np.asarray(class_weights, dtype=np.float64)
            if weights.shape != (num_labels,):
                raise ValueError(f"class_weights has {weights.shape} entries, the model has {num_labels} labels")
        else:
            if self.train_dataset is None:
                raise ValueError("ClassWeightedTrainer needs train_dataset (or class_weights) to compute class weights")
            weights = inverse_frequency_weights(self._train_labels(), num_labels)
        self.class_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        # Trainer drops dataset columns the model's forward does not take; keep the soft targets.
        self._extra_columns = [SOFT_LABEL_COLUMN] if loss_type == "soft_kl" else []

    def _num_labels(self) -> int:
        model = self.model
        config = getattr(model, "config", None)
        if config is None and hasattr(model, "get_base_model"):
            config = model.get_base_model().config
        n = getattr(config, "num_labels", None)
        if not n:
            raise ValueError("ClassWeightedTrainer: the model config has no num_labels")
        return int(n)

    def _train_labels(self):
        ds = self.train_dataset
        for col in ("labels", "label"):
            if hasattr(ds, "column_names") and col in ds.column_names:
                return ds[col]
        raise ValueError("ClassWeightedTrainer: train_dataset has no 'label' or 'labels' column")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for col in self._extra_columns:
            if col not in self._signature_columns:
                self._signature_columns.append(col)
