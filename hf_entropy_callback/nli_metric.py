"""An `evaluate` metric for NLI classifiers (accuracy and macro-F1), loadable offline.

`evaluate.load("accuracy")` fetches its code from the hub; this file is the metric's own code,
so `evaluate.load(hf_entropy_callback.nli_metric.__file__)` works without the network.
"""

import datasets
import evaluate
import numpy as np


class NliMetric(evaluate.Metric):
    """Accuracy and macro-averaged F1 over the classes present in predictions or references."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy and macro-F1 of class-id predictions.",
            citation="",
            inputs_description="predictions and references: class ids (int).",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return accuracy_and_f1(predictions, references)


def accuracy_and_f1(predictions, references) -> dict:
    """Accuracy and macro-F1 of class-id predictions (what `NliMetric` computes), as plain floats."""
    pred, ref = np.asarray(predictions), np.asarray(references)
    f1s = []
    for c in np.union1d(pred, ref):
        tp = np.sum((pred == c) & (ref == c))
        denom = np.sum(pred == c) + np.sum(ref == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float((pred == ref).mean()), "macro_f1": float(np.mean(f1s))}


def metrics_from_logits(logits, references) -> dict:
    """Accuracy and macro-F1 from logits, honest about a diverged model.

    `numpy.argmax` of a row holding NaN returns the NaN's index (0 for an all-NaN row), so a
    diverged model would score the share of class 0. Any row with a non-finite logit makes both
    metrics NaN instead, and the result says how many rows there were.

    Args:
        logits (`np.ndarray`): (examples, classes) scores.
        references (`np.ndarray`): (examples,) gold class ids.

    Returns:
        `dict`: `accuracy`, `macro_f1` (NaN when diverged), `non_finite_logits` (rows with a NaN or
        infinite logit) and `diverged` (`bool`).
    """
    logits = np.asarray(logits, dtype=np.float64)
    bad = int((~np.isfinite(logits)).any(axis=-1).sum())
    if bad:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "non_finite_logits": bad, "diverged": True}
    out = accuracy_and_f1(np.argmax(logits, axis=-1), references)
    return dict(out, non_finite_logits=0, diverged=False)
