"""Finding run directories and grouping them into conditions.

A *condition* is model x method x rank x dataset x variant, where the variant names what differs
from the study's main setting (training-set composition, label noise, loss). Runs of one
condition that differ only in their seed are its replicates.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import pandas as pd

from hf_entropy_callback.peft_setup import DECODER_MODEL_TYPES
from hf_entropy_callback.runs import TRACKING_DIRNAME

#: Columns that identify a condition, in display order.
CONDITION_KEYS = ("model", "architecture", "method", "rank", "dataset", "variant")
#: Model types treated as decoder-only when a run's config has no ``architecture``.
DECODER_TYPES = DECODER_MODEL_TYPES
#: Settings that should be equal across the seeds of one condition.
REPLICATE_SETTINGS = (
    "model_name_or_path",
    "learning_rate",
    "lora_alpha",
    "num_train_epochs",
    "per_device_train_batch_size",
    "track_every",
)
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


class NoRunsFoundError(FileNotFoundError):
    """No run directory (``entropy_tracking/run_config.json``) below the given paths."""


def is_decoder(config: Mapping[str, Any]) -> bool:
    """Whether a run config describes a decoder-only model (its ``architecture``, else its ``model_type``)."""
    arch = config.get("architecture")
    if arch:
        return str(arch).lower() == "decoder"
    return str(config.get("model_type") or "").lower() in DECODER_TYPES


def discover_runs(paths: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Find the tracking directories of all runs below `paths`, recursively.

    A run is a folder ``entropy_tracking`` holding ``run_config.json`` (or a path given directly
    that holds ``run_config.json``). Tracking data saved inside Trainer checkpoints
    (``checkpoint-N/entropy_tracking``) are resume state of a run, not runs of their own, and are
    skipped; an output directory that has *only* such checkpoint data is reported as unfinished.

    Parameters
    ----------
    paths : sequence of str
        Folders to search (or run directories themselves).

    Returns
    -------
    runs : list of str
        Absolute tracking directories, sorted, without duplicates.
    notes : list of str
        Human-readable notes on what was skipped.

    Raises
    ------
    FileNotFoundError
        When a path does not exist.
    NoRunsFoundError
        When no run is found.
    """
    found, notes, unfinished = set(), [], set()
    for root in paths:
        if not os.path.exists(root):
            raise FileNotFoundError(f"{root}: no such directory")
        root = os.path.abspath(root)
        if os.path.isfile(os.path.join(root, "run_config.json")):
            found.add(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            # Hidden folders hold write_run's temporary and replaced copies: never a finished run.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if os.path.basename(dirpath) == TRACKING_DIRNAME and "run_config.json" in filenames:
                dirnames[:] = []
                parent = os.path.dirname(dirpath)
                if _CHECKPOINT.match(os.path.basename(parent)):
                    unfinished.add(os.path.dirname(parent))
                else:
                    found.add(dirpath)
    for out_dir in sorted(unfinished):
        if not os.path.isfile(os.path.join(out_dir, TRACKING_DIRNAME, "run_config.json")):
            notes.append(f"{out_dir}: only checkpoint tracking data (unfinished run?); skipped")
    if not found:
        raise NoRunsFoundError(
            f"no run directories found below {', '.join(map(str, paths))} "
            f"(looked for {TRACKING_DIRNAME}/run_config.json)"
        )
    return sorted(found), notes


def output_dir(tracking_dir: str) -> str:
    """The run's output directory: the parent of ``entropy_tracking``, else the directory itself."""
    tracking_dir = os.path.normpath(tracking_dir)
    if os.path.basename(tracking_dir) == TRACKING_DIRNAME:
        return os.path.dirname(tracking_dir)
    return tracking_dir


def run_ids(tracking_dirs: Sequence[str]) -> List[str]:
    """Short unique names of runs: their output directories relative to the deepest common folder."""
    outs = [output_dir(d) for d in tracking_dirs]
    if len(outs) == 1:
        return [os.path.basename(outs[0]) or outs[0]]
    base = os.path.commonpath([os.path.dirname(o) for o in outs])
    return [os.path.relpath(o, base) for o in outs]


def _float(value, default=math.nan) -> float:
    try:
        return default if value is None else float(value)
    except (TypeError, ValueError):
        return default


def method_label(method: str, rank: float) -> str:
    """"LoRA r=8", "IA3", "full FT" (or the method name as given)."""
    if method == "lora":
        return "LoRA" if math.isnan(rank) else f"LoRA r={int(rank)}"
    return {"ia3": "IA3", "full": "full FT"}.get(method, method)


def describe_run(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Normalise a run's config into the columns used for grouping, with defaults for missing keys.

    Defaults: ``method`` "lora" when a rank is given, else "unknown"; ``rank`` only for LoRA (NaN
    otherwise); ``architecture`` from ``model_type``; ``dataset`` "unknown"; ``composition``
    "all"; ``label_noise`` 0.0; ``loss`` "ce"; ``seed`` NaN.

    Examples
    --------
    >>> d = describe_run({"model_name_or_path": "Qwen/Qwen2.5-1.5B", "model_type": "qwen2",
    ...                   "method": "lora", "rank": 16, "dataset": "snli", "label_noise": 0.3})
    >>> d["model"], d["architecture"], d["rank"], d["variant"]
    ('Qwen2.5-1.5B', 'decoder', 16.0, 'noise=0.3')
    >>> d["condition"]
    'Qwen2.5-1.5B · LoRA r=16 · snli · noise=0.3'
    """
    name = config.get("model_name_or_path")
    model = os.path.basename(os.path.normpath(str(name))) if name else str(config.get("model_type") or "unknown")
    rank = _float(config.get("rank"))
    method = str(config.get("method") or ("lora" if not math.isnan(rank) else "unknown")).lower()
    if method != "lora":
        rank = math.nan
    composition = str(config.get("composition") or "all")
    noise = _float(config.get("label_noise"), 0.0)
    loss = str(config.get("loss") or "ce")
    parts = []
    if composition != "all":
        parts.append(f"composition={composition}")
    if noise:
        parts.append(f"noise={noise:g}")
    if loss != "ce":
        parts.append(f"loss={loss}")
    variant = ", ".join(parts) or "base"
    dataset = str(config.get("dataset") or "unknown").lower()
    desc = {
        "model": model,
        "architecture": "decoder" if is_decoder(config) else "encoder",
        "method": method,
        "rank": rank,
        "dataset": dataset,
        "variant": variant,
        "composition": composition,
        "label_noise": noise,
        "loss": loss,
        "seed": _float(config.get("seed")),
    }
    label = " · ".join([model, method_label(method, rank), dataset] + ([variant] if variant != "base" else []))
    desc["condition"] = label
    return desc


def order_conditions(frame: pd.DataFrame) -> pd.DataFrame:
    """Sort rows the report's way: dataset, architecture, model, method (LoRA, IA3, full), rank, variant.

    Only the key columns present in `frame` are used; the index is reset.
    """
    method_order = {"lora": 0, "ia3": 1, "full": 2}
    helpers = {}
    if "method" in frame:
        helpers["_m"] = frame["method"].map(method_order).fillna(len(method_order))
    if "rank" in frame:
        helpers["_r"] = frame["rank"].astype(float).fillna(math.inf)
    keys = [k for k in ("dataset", "architecture", "model") if k in frame] + list(helpers)
    keys += [k for k in ("variant", "condition") if k in frame]
    if not keys:
        return frame.reset_index(drop=True)
    out = frame.assign(**helpers).sort_values(keys, kind="stable")
    return out.drop(columns=list(helpers)).reset_index(drop=True)


def condition_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per condition with its keys, in the report's order (see `order_conditions`)."""
    cols = ["condition", *CONDITION_KEYS, "composition", "label_noise", "loss"]
    return order_conditions(runs[[c for c in cols if c in runs]].drop_duplicates("condition"))


def replicate_warnings(runs: pd.DataFrame, configs: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """Notes on conditions whose runs are not clean replicates: a repeated seed, or other settings differing.

    Parameters
    ----------
    runs : DataFrame
        One row per run with ``run_id``, ``condition`` and ``seed``.
    configs : mapping
        Each run's raw config, by ``run_id``.
    """
    notes = []
    for cond, grp in runs.groupby("condition", sort=True):
        seeds = grp["seed"].dropna()
        dup = sorted({int(s) for s in seeds[seeds.duplicated()]})
        if dup:
            notes.append(f"{cond}: seed(s) {dup} appear in more than one run; all are kept as replicates")
        for key in REPLICATE_SETTINGS:
            values = {repr(configs[r].get(key)) for r in grp["run_id"]}
            if len(values) > 1:
                notes.append(f"{cond}: runs differ in {key} ({', '.join(sorted(values))})")
    return notes


def iter_groups(frame: pd.DataFrame, keys: Iterable[str]):
    """`groupby` that keeps NaN keys (e.g. the rank of full fine-tuning) and sorts."""
    return frame.groupby(list(keys), dropna=False, sort=True)
