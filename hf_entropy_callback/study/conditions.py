"""Finding run directories and grouping them into conditions.

A *condition* is defined by every recorded setting that changes a run's numbers (`SETTINGS`:
model, method, rank, LoRA alpha and dropout, learning rate and schedule, epochs / max_steps, batch
size x gradient accumulation x world size, bulk size (the bulk examples trained on, ``n_bulk``, where the
run recorded it: fewer than ``--bulk_size`` when the file holds fewer), track_every, max length, data files, split
seed, the tracked example set, composition, label noise and its drawing rule, loss, class weights,
label names, ...); only the seed varies within one. Its label is model · method · dataset ·
variant (what differs from the study's main setting: composition, label noise, loss), followed by
the settings in which it differs from other conditions of the same label (e.g. "lr=0.0001").

Rules (see `assign_conditions`):

- A setting missing from a run's config counts as "not recorded", a value of its own, except for
  the defaults stated in `SETTINGS` (gradient accumulation and world size 1, max_steps <= 0 none,
  ``label_noise_exclude_original`` False, and the noise rule is ignored when there is no noise).
- Data files are compared by file name (not folder), so runs copied between machines still match.
- The tracked set is a hash of the sorted ids of the tracked train examples (``tracked_set``,
  added by `hf_entropy_callback.study.loading`): runs tracking different examples are never one condition.
- A *duplicate* is a second run of the same condition and seed; it is listed, marked excluded
  and counted once (the first by run id stays).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import pandas as pd

from hf_entropy_callback.peft_setup import DECODER_MODEL_TYPES
from hf_entropy_callback.run_config import RunConfig
from hf_entropy_callback.runs import TRACKING_DIRNAME

#: Columns that identify a condition, in display order.
CONDITION_KEYS = ("model", "architecture", "method", "rank", "dataset", "variant")
#: Model types treated as decoder-only when a run's config has no ``architecture``.
DECODER_TYPES = DECODER_MODEL_TYPES
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


def _num(value):
    """A number as float (None when missing or not a number)."""
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _basename(value):
    return None if not value else os.path.basename(os.path.normpath(str(value)))


def _listish(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple, set)):
        return ",".join(map(str, value))
    return str(value)


def _max_steps(config):
    v = _num(config.max_steps)
    return None if v is None or v <= 0 else v


def _batch(config):
    per = _num(config.per_device_train_batch_size)
    if per is None:
        return None
    acc = _num(config.gradient_accumulation_steps) or 1.0
    world = _num(config.world_size) or 1.0
    return f"{per:g}x{acc:g}x{world:g}"


def _noise_rule(config):
    if not (_num(config.label_noise) or 0.0):
        return None  # no noise: the drawing rule does not apply
    return "other classes" if config.label_noise_exclude_original else "all classes"


#: The settings that define a condition besides model, method, rank, dataset, composition, label
#: noise and loss (which `describe_run` normalises): (column, short name in labels, reader of the
#: run's `RunConfig`).
SETTINGS = (
    ("model_name_or_path", "model path", lambda c: None if not c.model_name_or_path else str(c.model_name_or_path)),
    ("lora_alpha", "alpha", lambda c: _num(c.lora_alpha)),
    ("lora_dropout", "dropout", lambda c: _num(c.lora_dropout)),
    ("target_modules", "targets", lambda c: _listish(c.target_modules)),
    ("learning_rate", "lr", lambda c: _num(c.learning_rate)),
    ("lr_scheduler_type", "scheduler", lambda c: c.lr_scheduler_type),
    ("warmup_steps", "warmup steps", lambda c: _num(c.warmup_steps)),
    ("warmup_ratio", "warmup ratio", lambda c: _num(c.warmup_ratio)),
    ("weight_decay", "weight decay", lambda c: _num(c.weight_decay)),
    ("max_grad_norm", "max grad norm", lambda c: _num(c.max_grad_norm)),
    ("num_train_epochs", "epochs", lambda c: _num(c.num_train_epochs)),
    ("max_steps", "max_steps", _max_steps),
    ("batch", "batch", _batch),
    ("bulk_size", "bulk", lambda c: _num(c.n_bulk if c.n_bulk is not None else c.bulk_size)),
    ("track_every", "track_every", lambda c: _num(c.track_every)),
    ("max_length", "max length", lambda c: _num(c.max_length)),
    ("chaosnli_file", "chaosnli file", lambda c: _basename(c.chaosnli_file)),
    ("train_file", "train file", lambda c: _basename(c.train_file)),
    ("split_seed", "split seed", lambda c: _num(c.split_seed)),
    ("noise_rule", "noise labels from", _noise_rule),
    (
        "use_class_weights",
        "class weights",
        lambda c: None if c.use_class_weights is None else bool(c.use_class_weights),
    ),
    ("label_names", "labels", lambda c: _listish(c.label_names)),
)
#: Every column of the condition key, in order (``tracked_set`` is added by `hf_entropy_callback.study.loading`).
KEY_COLUMNS = (
    "model",
    "architecture",
    "method",
    "rank",
    "dataset",
    "composition",
    "label_noise",
    "loss",
    *(name for name, _, _ in SETTINGS),
    "tracked_set",
)
#: Short names of the key columns in condition labels and notes.
SHORT_NAMES = {name: short for name, short, _ in SETTINGS}
SHORT_NAMES.update(tracked_set="tracked set", label_noise="noise", composition="composition", loss="loss")
#: Settings shown in the conditions table whether or not they vary.
MAIN_SETTINGS = (
    "model",
    "method",
    "rank",
    "lora_alpha",
    "learning_rate",
    "num_train_epochs",
    "batch",
    "dataset",
    "composition",
    "label_noise",
    "noise_rule",
    "loss",
    "tracked_set",
)
#: LoRA ranks of the study's main matrix (sweeps/main_matrix.sh LOW_RANK, HIGH_RANK).
MAIN_RANKS = (8, 64)
#: What a comparison across methods and LoRA ranks varies (rank sweep, trajectory grid, matched learning
#: rates): the method and rank, and the settings that come with them: LoRA alpha (the script scales it with
#: the rank), LoRA dropout and the adapted modules (full fine-tuning has none of them).
METHOD_SETTINGS = ("method", "rank", "lora_alpha", "lora_dropout", "target_modules")
#: What a comparison across models varies (decoders vs encoders): the model, its path and architecture, and
#: the adapted modules (each architecture has its own default).
MODEL_SETTINGS = ("model", "model_name_or_path", "architecture", "target_modules")
#: What a comparison across variants varies: composition (which selects other tracked examples), label noise
#: (with its drawing rule) and loss.
VARIANT_SETTINGS = ("composition", "tracked_set", "label_noise", "noise_rule", "loss")


class NoRunsFoundError(FileNotFoundError):
    """No run directory (``entropy_tracking/run_config.json``) below the given paths."""


def is_decoder(config) -> bool:
    """Whether a run config (`RunConfig` or mapping) describes a decoder-only model (its ``architecture``,
    else, for configs written before it was recorded, its ``model_type``)."""
    config = RunConfig.from_dict(config)
    if config.architecture:
        return str(config.architecture).lower() == "decoder"
    return str(config.model_type or "").lower() in DECODER_TYPES


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
    """ "LoRA r=8", "IA3", "full FT" (or the method name as given)."""
    if method == "lora":
        return "LoRA" if math.isnan(rank) else f"LoRA r={int(rank)}"
    return {"ia3": "IA3", "full": "full FT"}.get(method, method)


def describe_run(config) -> Dict[str, Any]:
    """A run's configuration (`RunConfig` or its stored mapping) as the columns used for grouping.

    Missing settings take `RunConfig`'s defaults (composition "all", no label noise, loss "ce"); what
    it cannot default shows as such: ``method`` "unknown" (only in configs written neither by the
    callback nor the script, which always record it), ``rank`` NaN except for LoRA, ``dataset``
    "unknown", ``seed`` NaN.

    Examples
    --------
    >>> d = describe_run({"model_name_or_path": "Qwen/Qwen2.5-1.5B", "model_type": "qwen2",
    ...                   "method": "lora", "rank": 16, "dataset": "snli", "label_noise": 0.3})
    >>> d["model"], d["architecture"], d["rank"], d["variant"]
    ('Qwen2.5-1.5B', 'decoder', 16.0, 'noise=0.3')
    >>> d["condition"]
    'Qwen2.5-1.5B · LoRA r=16 · snli · noise=0.3'
    """
    config = RunConfig.from_dict(config)
    name = config.model_name_or_path
    model = os.path.basename(os.path.normpath(str(name))) if name else str(config.model_type or "unknown")
    rank = _float(config.rank)
    method = str(config.method or "unknown").lower()
    if method != "lora":
        rank = math.nan
    composition = str(config.composition or "all")
    noise = _float(config.label_noise, 0.0)
    loss = str(config.loss or "ce")
    parts = []
    if composition != "all":
        parts.append(f"composition={composition}")
    if noise:
        parts.append(f"noise={noise:g}")
    if loss != "ce":
        parts.append(f"loss={loss}")
    variant = ", ".join(parts) or "base"
    dataset = str(config.dataset or "unknown").lower()
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
        "seed": _float(config.seed),
    }
    for name, _, read in SETTINGS:
        desc[name] = read(config)
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


def _plain(v):
    """A JSON-able, NaN-free value of a key column (NaN and None both become None)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (np.floating,)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def _fmt_setting(v) -> str:
    v = _plain(v)
    if v is None:
        return "not recorded"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def condition_key(row: Mapping[str, Any], columns: Sequence[str] = KEY_COLUMNS) -> str:
    """The condition of a run as a string: every key column's value (missing: None), JSON-encoded."""
    return json.dumps([_plain(row.get(c)) for c in columns], default=str)


def differing_settings(frame: pd.DataFrame, columns: Sequence[str]) -> List[str]:
    """The `columns` of `frame` whose value is not the same in every row (NaN and None alike: not recorded).

    >>> import pandas as pd
    >>> differing_settings(pd.DataFrame({"bulk_size": [2000.0, 20000.0], "learning_rate": 1e-4}),
    ...                    ["bulk_size", "learning_rate", "max_length"])
    ['bulk_size']
    """
    return [c for c in columns if c in frame and frame[c].map(_plain).astype(str).nunique() > 1]


def setting_text(row: Mapping[str, Any], columns: Sequence[str]) -> str:
    """The values of `columns` in `row` as condition labels name them, e.g. "bulk=2000, lr=0.0001".

    >>> setting_text({"bulk_size": 2000.0, "learning_rate": 1e-4}, ["bulk_size", "learning_rate"])
    'bulk=2000, lr=0.0001'
    """
    return ", ".join(f"{SHORT_NAMES.get(c, c)}={_fmt_setting(row.get(c))}" for c in columns)


def settings_detail(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """Each of `columns` with the values it takes in `frame`, as the notes on shared labels give them.

    >>> import pandas as pd
    >>> settings_detail(pd.DataFrame({"bulk_size": [20000.0, 2000.0], "learning_rate": [1e-4, 2e-4]}),
    ...                 ["bulk_size", "learning_rate"])
    'bulk: 2000, 20000; lr: 0.0001, 0.0002'
    """
    return "; ".join(
        f"{SHORT_NAMES.get(c, c)}: " + ", ".join(sorted({_fmt_setting(v) for v in frame[c]})) for c in columns
    )


def _keys(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """`condition_key` of each row over `columns` (NaN and None alike)."""
    cols = list(columns)
    return pd.Series(
        [json.dumps([_plain(v) for v in row], default=str) for row in frame[cols].itertuples(index=False)],
        index=frame.index,
        dtype=object,
    )


#: A setting compared in proportion to another when it splits a family: LoRA alpha as alpha / rank, the
#: scaling LoRA applies and the one the script's rule (alpha = 2 r) keeps constant across ranks.
_PER = {"lora_alpha": ("rank", "alpha/r")}


def _follow_values(frame: pd.DataFrame, column: str) -> Tuple[str, pd.Series]:
    """(label name, plain values) of a setting that comes with the compared ones (see `_PER`)."""
    if column in _PER and _PER[column][0] in frame:
        base, name = _PER[column]
        num, den = pd.to_numeric(frame[column], errors="coerce"), pd.to_numeric(frame[base], errors="coerce")
        return name, (num / den).map(_plain)
    return column, frame[column].map(_plain)


def setting_families(
    frame: pd.DataFrame, vary: Sequence[str], *, within: Sequence[str] = (), point: Sequence[str] = ()
) -> pd.DataFrame:
    """Split the rows of `frame` into the *setting families* of a comparison across the settings `vary`.

    A comparison across method and rank (or model, learning rate, variant) may only combine conditions that
    agree on every other setting of the condition key: a family is the rows that agree on every key
    column (`KEY_COLUMNS` present in `frame`) except `vary`. Rows of different families are never averaged
    together; each family is a line, row or panel of its own.

    `point` (part of `vary`) places a row in the comparison (a rank sweep: method and rank); the other
    settings of `vary` come with it (LoRA alpha with the rank, dropout with LoRA). Should a family hold
    several values of such a setting at one point (e.g. two LoRA alphas at rank 8), it is split by that
    setting (LoRA alpha as alpha / rank, so the usual alpha = 2 r keeps one family across ranks), and rows
    at other points to which the setting does not apply (None: full fine-tuning has no alpha) join every
    part.

    Parameters
    ----------
    frame : DataFrame
        Rows with key columns (runs, or a table of them).
    vary : sequence of str
        The settings the comparison varies (e.g. `METHOD_SETTINGS`).
    within : sequence of str
        The groups whose families are labelled against each other (e.g. model x dataset).
    point : sequence of str
        The settings of `vary` that place a row in the comparison.

    Returns
    -------
    frame : DataFrame
        A copy in the order of `frame` (index reset; a row that joins several parts repeated in its
        place) with ``family`` (a key) and
        ``settings``: the settings that tell the family apart from the other families of its `within`
        group, as condition labels name them ("bulk=2000"); "" where the group has one family.

    Examples
    --------
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"model": "m", "method": ["lora", "lora", "full", "lora", "lora", "full"],
    ...                      "rank": [8, 64, None, 8, 64, None], "lora_alpha": [16, 128, None] * 2,
    ...                      "bulk_size": [20000.0] * 3 + [2000.0] * 3})
    >>> fam = setting_families(runs, METHOD_SETTINGS, within=["model"], point=["method", "rank"])
    >>> fam[["method", "rank", "settings"]]
      method  rank    settings
    0   lora   8.0  bulk=20000
    1   lora  64.0  bulk=20000
    2   full   NaN  bulk=20000
    3   lora   8.0   bulk=2000
    4   lora  64.0   bulk=2000
    5   full   NaN   bulk=2000
    >>> ablation = pd.concat([runs[:3], runs[:1].assign(lora_alpha=8)], ignore_index=True)
    >>> setting_families(ablation, METHOD_SETTINGS, within=["model"], point=["method", "rank"])[
    ...     ["method", "rank", "lora_alpha", "settings"]]
      method  rank  lora_alpha   settings
    0   lora   8.0        16.0  alpha/r=2
    1   lora  64.0       128.0  alpha/r=2
    2   full   NaN         NaN  alpha/r=2
    3   full   NaN         NaN  alpha/r=1
    4   lora   8.0         8.0  alpha/r=1
    """
    out = frame.reset_index(drop=True)
    shared = [c for c in KEY_COLUMNS if c in out and c not in vary]
    follow = [c for c in vary if c in out and c not in point]
    point = [c for c in point if c in out]
    out = out.assign(family=_keys(out, shared))
    values: Dict[str, Dict[str, Any]] = {}  # per family: the settings that may tell it apart
    parts = []
    for fam, g in out.groupby("family", sort=False):
        shared_values = {c: _plain(g[c].iloc[0]) for c in shared}
        follow_values = dict(_follow_values(g, c) for c in follow)
        if not point or not follow_values:
            values[fam] = shared_values
            parts.append(g)
            continue
        at = _keys(g, point)
        split = [
            name for name, v in follow_values.items() if (v.astype(str).groupby(at, sort=False).nunique() > 1).any()
        ]
        if not split:
            values[fam] = shared_values
            parts.append(g)
            continue
        # Several values of a following setting at one point: split by it, so no point pools them.
        fv = pd.DataFrame({name: follow_values[name] for name in split}, index=g.index)
        sub = _keys(fv, split)
        colliding = set(at[sub.groupby(at, sort=False).transform("nunique") > 1])
        joins_all = (sub == json.dumps([None] * len(split))) & ~at.isin(colliding)
        for k in dict.fromkeys(sub[~joins_all]):
            own = g[(sub == k) & ~joins_all]
            key = f"{fam}|{k}"
            values[key] = {**shared_values, **dict(zip(split, json.loads(k)))}
            parts.append(pd.concat([own, g[joins_all]]).assign(family=key))
    out = pd.concat(parts) if parts else out
    # The rows in their order (a row that joins several parts repeated in its place), so a caller may
    # align the result with `frame` when no row joins several parts.
    out = out.iloc[np.argsort(out.index.to_numpy(), kind="stable")].reset_index(drop=True)
    settings = pd.Series("", index=out.index, dtype=object)
    groups = [g.index for _, g in out.groupby(list(within), dropna=False, sort=False)] if within else [out.index]
    for idx in groups:
        fams = list(dict.fromkeys(out.loc[idx, "family"]))
        if len(fams) < 2:
            continue
        table = pd.DataFrame([values[f] for f in fams])
        differ = differing_settings(table, list(table.columns))
        text = {f: setting_text(row, differ) for f, row in zip(fams, table.to_dict("records"))}
        settings.loc[idx] = out.loc[idx, "family"].map(text).to_numpy()
    return out.assign(settings=settings)


def assign_conditions(runs: pd.DataFrame) -> Tuple[pd.DataFrame, List[str]]:
    """Group runs into conditions by every key column (see the module docstring); mark duplicates.

    Parameters
    ----------
    runs : DataFrame
        One row per run with ``run_id``, ``seed``, ``condition`` (the base label from
        `describe_run`) and the `KEY_COLUMNS` (a missing column counts as not recorded).

    Returns
    -------
    runs : DataFrame
        A copy with ``condition_key``, ``condition`` (the base label, extended by the settings that
        tell apart conditions sharing it), ``distinct_by`` (those settings) and ``duplicate_of``
        (the run id of the first run of the same condition and seed, else None).
    notes : list of str
        One note per duplicate, and per label shared by several conditions (what differs).

    Examples
    --------
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "seed": [1, 2, 1, 1], "condition": "m · LoRA r=8",
    ...                      "learning_rate": [1e-4, 1e-4, 1e-4, 2e-4]})
    >>> out, notes = assign_conditions(runs)
    >>> out[["run_id", "condition", "duplicate_of"]]
      run_id                 condition duplicate_of
    0      a  m · LoRA r=8 · lr=0.0001         None
    1      b  m · LoRA r=8 · lr=0.0001         None
    2      c  m · LoRA r=8 · lr=0.0001            a
    3      d  m · LoRA r=8 · lr=0.0002         None
    >>> print(notes[0])
    m · LoRA r=8: 2 conditions that differ in lr: 0.0001, 0.0002; their runs are not pooled
    >>> print(notes[1])
    c: duplicate of a (same condition m · LoRA r=8 · lr=0.0001 and seed 1); counted once, c left out of every aggregate
    """
    out = runs.copy().reset_index(drop=True)
    out["condition_key"] = [condition_key(r) for r in out.to_dict("records")]
    notes: List[str] = []
    present = [c for c in KEY_COLUMNS if c in out]
    labels, distinct = out["condition"].astype(str).copy(), pd.Series("", index=out.index)
    for base, grp in out.groupby("condition", sort=True):
        keys = grp.drop_duplicates("condition_key")
        if len(keys) < 2:
            continue
        differ = differing_settings(keys, present)
        for idx in grp.index:
            labels.at[idx] = f"{base} · {setting_text(out.loc[idx], differ)}"
            distinct.at[idx] = ", ".join(differ)
        detail = settings_detail(keys, differ)
        notes.append(f"{base}: {len(keys)} conditions that differ in {detail}; their runs are not pooled")
    out["condition"] = labels
    out["distinct_by"] = distinct
    out["duplicate_of"] = None
    seed_key = (
        out["seed"].map(lambda v: None if pd.isna(v) else float(v))
        if "seed" in out
        else pd.Series(None, index=out.index)
    )
    order = out.assign(_s=seed_key.astype(str)).sort_values(["condition_key", "_s", "run_id"], kind="stable")
    first: Dict[Tuple[str, str], str] = {}
    for idx, r in order.iterrows():
        if seed_key.at[idx] is None:
            continue  # without a seed, a second run cannot be told from a replicate
        k = (r["condition_key"], r["_s"])
        if k in first:
            out.at[idx, "duplicate_of"] = first[k]
            notes.append(
                f"{r['run_id']}: duplicate of {first[k]} (same condition {out.at[idx, 'condition']} and seed "
                f"{seed_key.at[idx]:g}); counted once, {r['run_id']} left out of every aggregate"
            )
        else:
            first[k] = r["run_id"]
    return out, notes


def is_main_matrix(runs: pd.DataFrame, main_ranks: Sequence[float] = MAIN_RANKS) -> pd.Series:
    """Which runs belong to the study's main matrix: base variant (composition "all", no label noise,
    loss "ce") and, for LoRA, a rank in `main_ranks` (the sweep's other ranks are not in it).

    Examples
    --------
    >>> import pandas as pd
    >>> runs = pd.DataFrame({"variant": ["base", "base", "noise=0.3", "base"], "method": ["lora", "lora", "lora", "full"],
    ...                      "rank": [8, 16, 8, float("nan")]})
    >>> is_main_matrix(runs).tolist()
    [True, False, False, True]
    """
    base = runs["variant"] == "base" if "variant" in runs else pd.Series(True, index=runs.index)
    lora = runs["method"] == "lora" if "method" in runs else pd.Series(False, index=runs.index)
    ranks = runs["rank"].astype(float) if "rank" in runs else pd.Series(np.nan, index=runs.index)
    return base & (~lora | ranks.isin([float(r) for r in main_ranks]))


def condition_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: its label, seeds, run count, and its defining settings.

    The settings shown are `MAIN_SETTINGS` plus every key column whose value varies across
    `runs`; ``in_main_family`` says whether it is a main-matrix condition (`is_main_matrix`)
    when `runs` has that column. Excluded runs (duplicates, diverged, incomplete) are counted in
    ``n_excluded``, not in ``n_runs``.
    """
    present = [c for c in KEY_COLUMNS if c in runs]
    varying = [c for c in present if runs[c].map(_plain).astype(str).nunique() > 1]
    shown = [c for c in present if c in MAIN_SETTINGS or c in varying]
    excluded = runs["excluded"].astype(bool) if "excluded" in runs else pd.Series(False, index=runs.index)
    rows = []
    for cond, grp in runs.groupby("condition", sort=False):
        ok = grp[~excluded.loc[grp.index]]
        seeds = sorted(int(v) for v in ok["seed"].dropna()) if "seed" in ok else []
        row = {
            "condition": cond,
            "n_runs": len(ok),
            "n_excluded": int(excluded.loc[grp.index].sum()),
            "seeds": ", ".join(map(str, seeds)) or "—",
        }
        if "in_main_family" in grp:
            row["in_main_family"] = bool(grp["in_main_family"].iloc[0])
        for c in shown:
            row[c] = _plain(grp[c].iloc[0])
        for c in ("variant", "architecture"):
            if c in grp and c not in row:
                row[c] = grp[c].iloc[0]
        rows.append(row)
    return order_conditions(pd.DataFrame(rows))


def iter_groups(frame: pd.DataFrame, keys: Iterable[str]):
    """`groupby` that keeps NaN keys (e.g. the rank of full fine-tuning) and sorts."""
    return frame.groupby(list(keys), dropna=False, sort=True)
