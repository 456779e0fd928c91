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
        pred, ref = np.asarray(predictions), np.asarray(references)
        f1s = []
        for c in np.union1d(pred, ref):
            tp = np.sum((pred == c) & (ref == c))
            denom = np.sum(pred == c) + np.sum(ref == c)
            f1s.append(2 * tp / denom if denom else 0.0)
        return {"accuracy": float((pred == ref).mean()), "macro_f1": float(np.mean(f1s))}
