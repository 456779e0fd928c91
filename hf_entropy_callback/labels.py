"""Label spaces: matching a tracked set's class names with a model's `id2label`.

Scripts order NLI labels differently: ChaosNLI and GLUE-MNLI use 0=entailment, 1=neutral,
2=contradiction, while transformers' `run_glue.py` sorts the names (contradiction=0,
entailment=1, neutral=2). Reading a model's predictions in the wrong order gives plausible but
wrong losses, so the tracker compares the names before it stores anything.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

_GENERIC = re.compile(r"^label_?\d+$")


class LabelSpaceError(ValueError):
    """The tracked labels and the model's labels cannot be matched."""


def normalize_label_name(name) -> str:
    """Compare label names case- and separator-insensitively (`"Entailment"` == `"entailment"`).

    Example:
        >>> normalize_label_name(" Not-Entailment ")
        'not_entailment'
    """
    return re.sub(r"[\s\-]+", "_", str(name).strip().casefold())


def is_generic(names: Optional[Sequence[str]]) -> bool:
    """Whether `names` are transformers' placeholders (`LABEL_0`, `LABEL_1`, ...) or absent."""
    return not names or all(_GENERIC.match(normalize_label_name(n)) for n in names)


def model_label_names(model) -> Optional[Tuple[str, ...]]:
    """The model's class names in id order, from `config.id2label`; None when it has no config."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if not id2label:
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in dict(id2label).items())
    except (TypeError, ValueError):
        return None
    if [k for k, _ in items] != list(range(len(items))):
        return None
    return tuple(v for _, v in items)


@dataclass(frozen=True)
class LabelSpace:
    """How tracked label ids map onto the model's class ids.

    Attributes:
        names (`Tuple[str, ...]`): class names in the model's id order (what the run stores).
        permutation (`np.ndarray` or `None`): ``model_id = permutation[tracked_id]``; None when identical.
        note (`str`): what was decided, for the log.
    """

    names: Tuple[str, ...]
    permutation: Optional[np.ndarray]
    note: str

    def to_model_ids(self, labels: np.ndarray) -> np.ndarray:
        return labels if self.permutation is None else self.permutation[labels]

    def counts_to_model_order(self, counts: np.ndarray) -> np.ndarray:
        """Reorder label counts (examples, K) from tracked order into the model's class order."""
        if self.permutation is None:
            return counts
        out = np.empty_like(counts)
        out[:, self.permutation] = counts
        return out


def resolve_label_space(
    tracked_names: Optional[Sequence[str]], model_names: Optional[Sequence[str]], num_labels: int, where: str = ""
) -> LabelSpace:
    """Decide how the tracked set's labels map onto the model's.

    Rules: when both sides have meaningful names, the same set in another order is remapped to the
    model's ids (and logged); any other difference is an error naming both lists. When the model's
    names are generic (`LABEL_k`) the tracked order is used and a warning says so. With no names on
    either side the ids are used as they are.

    Args:
        tracked_names (`Sequence[str]`, *optional*): class names of the tracked ids, in id order.
        model_names (`Sequence[str]`, *optional*): the model's `id2label` names, in id order.
        num_labels (`int`): the model's number of classes.
        where (`str`, *optional*): prefix for messages (e.g. the tracked set's name).

    Example:
        >>> space = resolve_label_space(["entailment", "neutral", "contradiction"],
        ...                             ["contradiction", "entailment", "neutral"], 3)
        >>> space.permutation.tolist()
        [1, 2, 0]
    """
    prefix = f"{where}: " if where else ""
    if tracked_names is not None and len(tracked_names) != num_labels:
        raise LabelSpaceError(
            f"{prefix}the tracked labels have {len(tracked_names)} classes {list(tracked_names)} but the model has "
            f"{num_labels} (id2label {list(model_names) if model_names else None})"
        )
    if model_names is not None and len(model_names) != num_labels:
        model_names = None  # a config whose id2label disagrees with num_labels says nothing reliable
    if tracked_names is None:
        names = (
            tuple(model_names)
            if model_names and not is_generic(model_names)
            else tuple(f"LABEL_{i}" for i in range(num_labels))
        )
        return LabelSpace(names, None, f"{prefix}no tracked label names: the tracked ids are read as the model's ids")
    tracked = tuple(str(n) for n in tracked_names)
    if model_names is None or is_generic(model_names):
        return LabelSpace(
            tracked,
            None,
            f"{prefix}the model's labels are generic ({list(model_names) if model_names else 'none'}): assuming the "
            f"model was trained with the tracked order {list(tracked)}; set model.config.id2label to be sure",
        )
    t_norm = [normalize_label_name(n) for n in tracked]
    m_norm = [normalize_label_name(n) for n in model_names]
    if len(set(t_norm)) != len(t_norm) or len(set(m_norm)) != len(m_norm):
        raise LabelSpaceError(f"{prefix}label names repeat: tracked {list(tracked)}, model {list(model_names)}")
    if t_norm == m_norm:
        return LabelSpace(tuple(model_names), None, f"{prefix}label names match the model's: {list(model_names)}")
    if sorted(t_norm) == sorted(m_norm):
        perm = np.asarray([m_norm.index(n) for n in t_norm], dtype=np.int64)
        return LabelSpace(
            tuple(model_names),
            perm,
            f"{prefix}the model orders the labels {list(model_names)}, the tracked set {list(tracked)}: tracked "
            f"labels and label counts are remapped to the model's ids",
        )
    raise LabelSpaceError(
        f"{prefix}the tracked labels {list(tracked)} are not the model's labels {list(model_names)} "
        "(config.id2label); pass label_names= matching the model, or fix the model's id2label"
    )
