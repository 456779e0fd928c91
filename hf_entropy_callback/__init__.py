"""hf_entropy_callback: per-example learning dynamics vs annotation entropy for HuggingFace transformers."""

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

__version__ = "0.1.0"

__all__ = [
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
