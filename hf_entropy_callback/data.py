"""Building the study's training data: ChaosNLI split, bulk corpus, composition and label noise."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from .chaosnli import NLI_LABELS, read_text_lines
from .entropy import CATEGORIES

#: Field names accepted for the two sentences and the label of a bulk corpus, in order of preference.
PREMISE_FIELDS = ("premise", "sentence1", "text_a")
HYPOTHESIS_FIELDS = ("hypothesis", "sentence2", "text_b")
LABEL_FIELDS = ("label", "gold_label", "label_id")
#: Values meaning "no gold label" (SNLI's "-" and the hub's -1).
NO_GOLD = ("-", "", "none", "-1")
COMPOSITIONS = ("all", "low", "high", "balanced")


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message names the file and line or field."""


def _np_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def split_chaosnli(ds, val_fraction: float = 0.2, seed: int = 42, stratify_by: str = "category"):
    """Split ChaosNLI into train / validation, stratified by entropy category, reproducibly.

    Within each stratum `round(val_fraction * n)` examples (chosen with `seed`) go to validation.
    Both parts keep the input's row order.

    Args:
        ds (`datasets.Dataset`): output of `load_chaosnli`.
        val_fraction (`float`, *optional*, defaults to 0.2): share held out for validation, in (0, 1).
        seed (`int`, *optional*, defaults to 42): seed of the split.
        stratify_by (`str`, *optional*, defaults to `"category"`): column to stratify on.

    Returns:
        `datasets.DatasetDict` with `"train"` and `"validation"`.
    """
    import datasets

    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float, np.integer, np.floating)):
        raise ValueError(f"split_chaosnli: val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if not 0.0 < val_fraction < 1.0:  # NaN fails this too
        raise ValueError(f"split_chaosnli: val_fraction must be in (0, 1) (exclusive), got {val_fraction}")
    if len(ds) == 0:
        raise ValueError("split_chaosnli: the dataset is empty")
    strata = np.asarray(ds[stratify_by])
    rng = _np_rng(seed)
    val_idx: List[int] = []
    for value in sorted(set(strata.tolist())):
        members = np.flatnonzero(strata == value)
        n_val = int(round(val_fraction * len(members)))
        val_idx.extend(rng.permutation(members)[:n_val].tolist())
    is_val = np.zeros(len(ds), dtype=bool)
    is_val[val_idx] = True
    return datasets.DatasetDict(train=ds.select(np.flatnonzero(~is_val)), validation=ds.select(np.flatnonzero(is_val)))


def _label_id(value, where: str, label_names: Sequence[str]) -> int:
    """Label name or id -> id; -1 for "no gold label"; errors name `where`."""
    if value is None:
        return -1
    if isinstance(value, bool):
        raise DataFormatError(f"{where}: label must be a name or an integer id, got {value!r}")
    if isinstance(value, (int, np.integer)):
        v = int(value)
    elif isinstance(value, float) and value.is_integer():
        v = int(value)
    else:
        text = str(value).strip()
        if text.lower() in NO_GOLD:
            return -1
        lowered = [n.lower() for n in label_names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
        try:
            v = int(text)
        except ValueError:
            raise DataFormatError(
                f"{where}: unknown label {value!r}; expected one of {list(label_names)} or an id"
            ) from None
    if v == -1:
        return -1
    if not 0 <= v < len(label_names):
        raise DataFormatError(f"{where}: label id {v} outside 0..{len(label_names) - 1}")
    return v


def _pick(record: dict, fields: Sequence[str], where: str, what: str):
    for f in fields:
        if f in record:
            return record[f]
    raise DataFormatError(f"{where}: missing {what} field (one of {list(fields)})")


def _text(record: dict, fields: Sequence[str], where: str, what: str) -> str:
    """The premise / hypothesis of a record: a non-empty string (never `None` read as the text "None")."""
    value = _pick(record, fields, where, what)
    name = next(f for f in fields if f in record)
    field_name = repr(name) if name == what else f"{name!r} ({what})"
    if value is None:
        raise DataFormatError(f"{where}: field {field_name} is null; expected a non-empty string")
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field {field_name} must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise DataFormatError(f"{where}: field {field_name} is empty; expected a non-empty string")
    return value


#: Suffixes of the bulk formats `load_bulk` reads, each optionally followed by ".gz".
BULK_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def _format_suffix(path: str) -> str:
    """The format suffix of `path`, looking through a trailing ".gz" (``x.csv.gz`` -> ``.csv``)."""
    stem = path[:-3] if path.lower().endswith(".gz") else path
    return os.path.splitext(stem)[1].lower()


def _check_header(path: str, header: Optional[Sequence[str]], delimiter: str) -> None:
    """A csv / tsv header must name a premise, a hypothesis and a label column.

    The delimiter is not guessed: a ``.csv`` is comma-separated and a ``.tsv`` tab-separated. A
    file written with another one (";" from a German-locale spreadsheet, tabs in a ``.csv``) is
    refused with the header as read and what was expected, rather than read as one wide column.
    """
    header = [h.strip() for h in (header or [])]
    expected = [PREMISE_FIELDS, HYPOTHESIS_FIELDS, LABEL_FIELDS]
    missing = [fields for fields in expected if not any(f in header for f in fields)]
    if not missing:
        return
    shown = "tab" if delimiter == "\t" else repr(delimiter)
    hint = ""
    joined = delimiter.join(header)
    for other in (";", "\t", ",", "|"):
        if other != delimiter and other in joined:
            cols = [c.strip().strip('"') for c in joined.split(other)]
            if all(any(f in cols for f in fields) for fields in expected):
                name = "tab" if other == "\t" else repr(other)
                want = {"\t": "a .tsv", ",": "a .csv"}.get(other, "comma-separated (.csv) or tab-separated (.tsv)")
                hint = f"; the file looks {name}-separated: save it as {want}"
                break
    lacking = ", ".join(fields[0] for fields in missing)
    raise DataFormatError(
        f"{path}, line 1: header {header} has no {lacking} column{'s' if len(missing) > 1 else ''}; expected columns premise (or sentence1, "
        f"text_a), hypothesis (or sentence2, text_b) and label (or gold_label, label_id), separated by {shown}{hint}"
    )


def _read_records(path: str):
    """Yield (where, record) from a .jsonl, .json (list of objects) or .csv/.tsv file, each optionally gzipped."""
    ext = _format_suffix(path)
    lines = read_text_lines(path, DataFormatError)
    if ext in (".csv", ".tsv"):
        delimiter = "\t" if ext == ".tsv" else ","
        reader = csv.DictReader(lines, delimiter=delimiter)
        _check_header(path, reader.fieldnames, delimiter)
        for row in reader:
            # line_num counts physical lines read, so a quoted field spanning lines is named by its last line.
            yield f"{path}, line {reader.line_num}", row
    elif ext == ".json":
        text = "".join(lines)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a JSON list of records (or jsonl lines)")
        for i, row in enumerate(data):
            yield f"{path}, record {i}", row
    else:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}, line {lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None


def looks_like_path(source: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else that does not exist is a missing file."""
    suffixes = BULK_SUFFIXES + tuple(s + ".gz" for s in BULK_SUFFIXES) + (".gz",)
    return source.lower().endswith(suffixes) or source.startswith((".", "/", "~")) or source.count("/") > 1


def load_bulk(
    source: str,
    split: str = "train",
    config: Optional[str] = None,
    label_names: Sequence[str] = NLI_LABELS,
    id_prefix: Optional[str] = None,
):
    """Load a bulk NLI corpus with premise / hypothesis / label, dropping examples without a gold label.

    Args:
        source (`str`):
            A local `.jsonl`, `.json` (a list of objects) or `.csv` / `.tsv` file with columns premise /
            hypothesis (or sentence1 / sentence2, text_a / text_b) and label (a name such as
            "entailment" or an id 0..2; "-" or -1 mean no gold label), or a hub dataset id such as
            `"stanfordnlp/snli"` or `"nyu-mll/glue"` with `config="mnli"` (needs the internet).
            Files are UTF-8 (a byte-order mark is fine) and may be gzip-compressed (`bulk.csv.gz`; a
            gzip file is also recognised by its magic bytes without the suffix). A `.csv` must be
            comma-separated and a `.tsv` tab-separated: the delimiter is not guessed, a header that
            lacks the columns is an error naming the header read.
        split (`str`, *optional*, defaults to `"train"`): split of a hub dataset.
        config (`str`, *optional*): configuration of a hub dataset.
        label_names (`Sequence[str]`, *optional*): label names in id order.
        id_prefix (`str`, *optional*): prefix of generated ids (default: the file's stem).

    Returns:
        `datasets.Dataset` with columns `id`, `premise`, `hypothesis`, `label` (int).

    Raises:
        DataFormatError: for a record without premise / hypothesis / label, a null or empty premise or
            hypothesis of a kept row, an unknown label, text that is not UTF-8, a damaged gzip stream or a
            csv / tsv header without the expected columns; the message names the file, the line (or
            record) and the field.
    """
    import datasets

    rows: Dict[str, list] = {"id": [], "premise": [], "hypothesis": [], "label": []}
    dropped = 0
    if os.path.exists(source):
        base = os.path.basename(source)
        prefix = id_prefix or os.path.splitext(base[:-3] if base.lower().endswith(".gz") else base)[0]
        for i, (where, rec) in enumerate(_read_records(source)):
            if not isinstance(rec, dict):
                raise DataFormatError(f"{where}: expected an object with premise, hypothesis and label")
            label = _label_id(_pick(rec, LABEL_FIELDS, where, "label"), where, label_names)
            _pick(rec, PREMISE_FIELDS, where, "premise")
            _pick(rec, HYPOTHESIS_FIELDS, where, "hypothesis")
            if label < 0:
                dropped += 1
                continue
            # Only kept rows must have text: a row without a gold label is dropped whatever it holds.
            premise = _text(rec, PREMISE_FIELDS, where, "premise")
            hypothesis = _text(rec, HYPOTHESIS_FIELDS, where, "hypothesis")
            rows["id"].append(str(rec.get("id", rec.get("idx", rec.get("pairID", f"{prefix}-{i}")))))
            rows["premise"].append(premise)
            rows["hypothesis"].append(hypothesis)
            rows["label"].append(label)
    elif looks_like_path(source):
        raise FileNotFoundError(f"Bulk training file not found: {source}")
    else:
        from .offline import require_hub

        hint = "Pass a local jsonl/json/csv file with premise, hypothesis and label instead."
        require_hub(f"Bulk corpus {source!r}", hint)
        try:
            hub = datasets.load_dataset(source, config, split=split)
        except Exception as err:
            raise ConnectionError(
                f"Could not load hub dataset {source!r} ({type(err).__name__}: {err}). Offline, pass a local "
                "jsonl/json/csv file with premise, hypothesis and label instead."
            ) from err
        prefix = id_prefix or source.replace("/", "_")
        names = getattr(hub.features.get("label"), "names", None) or list(label_names)
        for i, rec in enumerate(hub):
            where = f"{source} ({split}), row {i}"
            value = rec["label"]
            if isinstance(value, int) and value >= 0 and names is not None:
                value = names[value]
            label = _label_id(value, where, label_names)
            if label < 0:
                dropped += 1
                continue
            rows["id"].append(str(rec.get("idx", rec.get("id", f"{prefix}-{i}"))))
            rows["premise"].append(rec[next(f for f in PREMISE_FIELDS if f in rec)])
            rows["hypothesis"].append(rec[next(f for f in HYPOTHESIS_FIELDS if f in rec)])
            rows["label"].append(label)
    if not rows["id"]:
        raise DataFormatError(f"{source}: no examples with a gold label")
    if len(set(rows["id"])) != len(rows["id"]):
        raise DataFormatError(f"{source}: example ids are not unique")
    ds = datasets.Dataset.from_dict(rows)
    ds.info.description = f"{source}: {len(ds)} examples, {dropped} without a gold label dropped"
    return ds


def sample_bulk(ds, n: int = 20000, seed: int = 42):
    """Seeded random sample of `n` examples; all of them (with a warning) when fewer exist.

    Raises:
        ValueError: when `n` is not an integer >= 0 (e.g. the script's `--bulk_size -1`).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"sample_bulk: n (the bulk sample size) must be an integer >= 0, got {n!r}")
    if n < 0:
        raise ValueError(f"sample_bulk: n (the bulk sample size) must be >= 0, got {n}; pass 0 for no bulk data")
    if n >= len(ds):
        if n > len(ds):
            warnings.warn(f"Asked for {n} bulk examples but only {len(ds)} exist; using all {len(ds)}.", stacklevel=2)
        return ds
    idx = np.sort(_np_rng(seed).permutation(len(ds))[:n])
    return ds.select(idx)


def select_composition(ds, composition: str = "all", seed: int = 42):
    """Restrict the ChaosNLI training part to a composition variant of the study.

    `"all"`: every example; `"low"`: clean only (H < 0.4); `"high"`: contested only (H > 0.7);
    `"balanced"`: the same number from each of clean, ambiguous and contested (each category
    sampled down, with `seed`, to the smallest one). Row order is kept.
    """
    if composition not in COMPOSITIONS:
        raise ValueError(f"Unknown composition {composition!r}; expected one of {COMPOSITIONS}")
    cats = np.asarray(ds["category"])
    if composition == "all":
        keep = np.arange(len(ds))
    elif composition == "low":
        keep = np.flatnonzero(cats == CATEGORIES[0])
    elif composition == "high":
        keep = np.flatnonzero(cats == CATEGORIES[2])
    else:
        groups = [np.flatnonzero(cats == c) for c in CATEGORIES]
        m = min(len(g) for g in groups)
        rng = _np_rng(seed)
        keep = np.sort(np.concatenate([rng.permutation(g)[:m] for g in groups]))
    if len(keep) == 0:
        raise ValueError(f"Composition {composition!r} leaves no ChaosNLI training examples")
    return ds.select(keep)


def inject_label_noise(
    ds,
    share: float,
    seed: int = 42,
    num_labels: int = 3,
    category: Optional[str] = "clean",
    exclude_original: bool = False,
):
    """Replace the labels of a share of (clean) examples with uniformly random labels.

    Exactly `round(share * n)` of the `n` examples in `category` are chosen with `seed`; each gets a
    label drawn uniformly from all `num_labels` classes (so it may keep its label, as in the study's
    "uniformly random labels"; `exclude_original=True` draws from the other classes only).

    Returns:
        The dataset with `label` replaced, plus `noised` (bool: chosen for noise) and `original_label`.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"label noise share must be in [0, 1], got {share}")
    labels = np.asarray(ds["label"], dtype=np.int64)
    pool = np.arange(len(ds)) if category is None else np.flatnonzero(np.asarray(ds["category"]) == category)
    rng = _np_rng(seed)
    chosen = np.sort(rng.permutation(pool)[: int(round(share * len(pool)))])
    new = labels.copy()
    if exclude_original:
        offset = rng.integers(1, num_labels, size=len(chosen))
        new[chosen] = (labels[chosen] + offset) % num_labels
    else:
        new[chosen] = rng.integers(0, num_labels, size=len(chosen))
    noised = np.zeros(len(ds), dtype=bool)
    noised[chosen] = True
    out = ds.remove_columns([c for c in ("noised", "original_label") if c in ds.column_names])
    out = out.rename_column("label", "original_label").add_column("label", new.tolist())
    return out.add_column("noised", noised.tolist())


def build_training_set(chaosnli_train, bulk=None):
    """Combine the ChaosNLI training part (tracked) with bulk examples (untracked).

    Returns:
        `datasets.Dataset` with `example_id` (stable: `"chaosnli:<uid>"` / `"bulk:<id>"`), `premise`,
        `hypothesis`, `label`, `tracked`, `entropy` (NaN for bulk), `category` (`"bulk"` for bulk),
        `label_counts` (zeros for bulk: no annotator distribution), `noised` and `original_label` (the
        label before label noise; the label itself where there was none).
    """
    import datasets

    def part(ds, tracked: bool):
        n = len(ds)
        cols = ds.column_names
        prefix, key = ("chaosnli:", "uid") if tracked else ("bulk:", "id")
        return {
            "example_id": [prefix + str(v) for v in ds[key]],
            "premise": list(ds["premise"]),
            "hypothesis": list(ds["hypothesis"]),
            "label": [int(v) for v in ds["label"]],
            "tracked": [tracked] * n,
            "entropy": list(ds["entropy"]) if tracked else [math.nan] * n,
            "category": list(ds["category"]) if tracked else ["bulk"] * n,
            "label_counts": [list(v) for v in ds["label_counts"]] if tracked else [[0, 0, 0]] * n,
            "noised": [bool(v) for v in ds["noised"]] if "noised" in cols else [False] * n,
            "original_label": [int(v) for v in ds["original_label" if "original_label" in cols else "label"]],
        }

    parts = [part(chaosnli_train, True)] + ([part(bulk, False)] if bulk is not None else [])
    merged = {k: sum((p[k] for p in parts), []) for k in parts[0]}
    if len(set(merged["example_id"])) != len(merged["example_id"]):
        raise DataFormatError("build_training_set: example ids are not unique across the ChaosNLI and bulk parts")
    return datasets.Dataset.from_dict(merged)
