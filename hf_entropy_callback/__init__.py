"""hf_entropy_callback: per-example learning dynamics vs annotation entropy for HuggingFace transformers."""

from .callback import AnnotationEntropyCallback
from .chaosnli import NLI_LABELS, ChaosNLIFormatError, category_table, load_chaosnli
from .entropy import (
    CATEGORIES,
    DEFAULT_THRESHOLDS,
    annotation_entropy,
    entropy_category,
    quantile_bins,
    quartile_bins,
    tercile_bins,
)
from .runs import Run, RunFormatError, load_run
from .trainer import ClassWeightedTrainer

__version__ = "0.1.0"

__all__ = [
    "AnnotationEntropyCallback",
    "ClassWeightedTrainer",
    "Run",
    "RunFormatError",
    "load_run",
    "CATEGORIES",
    "DEFAULT_THRESHOLDS",
    "NLI_LABELS",
    "ChaosNLIFormatError",
    "annotation_entropy",
    "category_table",
    "entropy_category",
    "load_chaosnli",
    "quantile_bins",
    "quartile_bins",
    "tercile_bins",
]
