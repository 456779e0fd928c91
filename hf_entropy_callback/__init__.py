"""hf_entropy_callback: per-example learning dynamics vs annotation entropy for HuggingFace transformers."""

from typing import TYPE_CHECKING

from .cartography import load_train_dynamics, train_cartography
from .chaosnli import NLI_LABELS, ChaosNLIFormatError, category_table, load_chaosnli
from .entropy import (
    CATEGORIES,
    DEFAULT_THRESHOLDS,
    annotation_entropy,
    category_thresholds,
    entropy_category,
    quantile_bins,
    quartile_bins,
    tercile_bins,
)
from .labels import LabelSpaceError
from .run_config import RunConfig
from .runs import Run, RunFormatError, load_run

__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers and linters; at run time __getattr__ below imports them
    from .callback import AnnotationEntropyCallback
    from .tracker import EntropyTracker
    from .train_dynamics import TrainDynamicsMixin, add_example_index
    from .trainer import ClassWeightedTrainer

# The Trainer-side classes import torch and transformers; load them on first use so that reading
# runs and data (e.g. the analysis) stays light.
_LAZY = {
    "AnnotationEntropyCallback": ".callback",
    "ClassWeightedTrainer": ".trainer",
    "EntropyTracker": ".tracker",
    "TrainDynamicsMixin": ".train_dynamics",
    "add_example_index": ".train_dynamics",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnnotationEntropyCallback",
    "CATEGORIES",
    "ClassWeightedTrainer",
    "DEFAULT_THRESHOLDS",
    "EntropyTracker",
    "LabelSpaceError",
    "NLI_LABELS",
    "ChaosNLIFormatError",
    "Run",
    "RunConfig",
    "RunFormatError",
    "TrainDynamicsMixin",
    "add_example_index",
    "annotation_entropy",
    "category_thresholds",
    "category_table",
    "entropy_category",
    "load_chaosnli",
    "load_run",
    "load_train_dynamics",
    "quantile_bins",
    "quartile_bins",
    "tercile_bins",
    "train_cartography",
]
