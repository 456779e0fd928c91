"""Reading ChaosNLI v1.0 (100 annotator labels per NLI example) into a `datasets.Dataset`."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import urllib.request
import zipfile
import zlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Type

import numpy as np

from .entropy import DEFAULT_THRESHOLDS, annotation_entropy, entropy_category
from .models import cache_root

#: Label names in the SNLI / GLUE-MNLI id order (0, 1, 2).
NLI_LABELS: Tuple[str, str, str] = ("entailment", "neutral", "contradiction")
#: ChaosNLI's label letters, in the same order.
CHAOSNLI_LETTERS: Tuple[str, str, str] = ("e", "n", "c")
#: The official ChaosNLI v1.0 archive (from the ChaosNLI repository's README).
CHAOSNLI_URL = "https://www.dropbox.com/s/h4j7dqszmpt2679/chaosNLI_v1.0.zip?dl=1"
#: Member names of the NLI subsets inside the official archive.
CHAOSNLI_MEMBERS: Dict[str, str] = {"snli": "chaosNLI_snli.jsonl", "mnli": "chaosNLI_mnli_m.jsonl"}

COLUMNS = ("uid", "premise", "hypothesis", "label", "label_counts", "entropy", "category", "subset")


class ChaosNLIFormatError(ValueError):
    """A ChaosNLI file does not have the expected format; the message names file and line."""


#: The first two bytes of every gzip stream (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str) -> bool:
    """Whether `path` is a gzip file, by its magic bytes (whatever its suffix)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def _decode_lines(raw: Iterable[bytes], name: str, error: Type[Exception]) -> Iterator[str]:
    for lineno, line in enumerate(raw, start=1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte-order mark (utf-8-sig), as some editors and Excel write
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise error(
                f"{name}, line {lineno}: the file's encoding is not UTF-8 (byte 0x{line[err.start]:02x} at column "
                f"{err.start + 1} is not valid UTF-8); convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`"
            ) from None


def read_text_lines(path: str, error: Type[Exception] = ValueError) -> Iterator[str]:
    """Yield the lines (with their line ends) of a UTF-8 text file, plain or gzip-compressed.

    Gzip is recognised by its magic bytes, so `data.jsonl.gz` and a gzip file without the `.gz`
    suffix both work. A UTF-8 byte-order mark at the start is dropped. Lines are split at
    ``\\n`` only (a ``\\r\\n`` stays in the line), as `open(..., newline="")` does, so the
    `csv` module can read the result.

    Args:
        path (`str`): the file.
        error (`Type[Exception]`, *optional*, defaults to `ValueError`): the exception raised for
            undecodable bytes or a damaged gzip stream; its message names the file and the line.

    Yields:
        `str`: one line at a time.
    """
    if is_gzip(path):
        fh = gzip.open(path, "rb")
        lineno = 0
        try:
            with fh:
                for line in _decode_lines(fh, path, error):
                    lineno += 1
                    yield line
        except (OSError, EOFError, zlib.error) as err:
            raise error(f"{path}, line {lineno + 1}: damaged gzip file ({err})") from None
    else:
        with open(path, "rb") as fh:
            yield from _decode_lines(fh, path, error)


def _subset_alias(subset: Optional[str]) -> Optional[str]:
    if subset is None:
        return None
    s = subset.lower()
    if s in ("mnli_m", "mnli-m", "mnli_matched"):
        s = "mnli"
    if s not in CHAOSNLI_MEMBERS:
        raise ValueError(f"Unknown ChaosNLI subset {subset!r}; expected one of {sorted(CHAOSNLI_MEMBERS)}")
    return s


def _download(url: str, cache_dir: Optional[str]) -> str:
    """Download `url` once into the cache; the file appears only when complete."""
    cache_dir = cache_dir or cache_root()
    os.makedirs(cache_dir, exist_ok=True)
    name = os.path.basename(url.split("?")[0]) or "chaosnli_download"
    target = os.path.join(cache_dir, name)
    if os.path.exists(target):
        return target
    from .offline import require_url

    require_url(url, "Pass the path of a local ChaosNLI jsonl file or of the chaosNLI_v1.0.zip archive instead.")
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
        os.replace(tmp, target)
    except Exception as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ConnectionError(
            f"Could not download ChaosNLI from {url} ({err}). Without internet access, pass the path of a local "
            "ChaosNLI jsonl file or of the chaosNLI_v1.0.zip archive instead."
        ) from err
    return target


def _parse_counts(record: dict, where: str, expected_total: Optional[int]) -> List[int]:
    counter = record.get("label_counter")
    count_list = record.get("label_count")
    if counter is None and count_list is None:
        raise ChaosNLIFormatError(f"{where}: missing field 'label_counter' (annotator label counts)")
    counts: Optional[List[int]] = None
    if counter is not None:
        if not isinstance(counter, dict) or not counter:
            raise ChaosNLIFormatError(f"{where}: field 'label_counter' must be a non-empty object, got {counter!r}")
        counts = [0, 0, 0]
        for letter, value in counter.items():
            if letter not in CHAOSNLI_LETTERS:
                raise ChaosNLIFormatError(
                    f"{where}: unknown label letter {letter!r} in 'label_counter'; expected one of e, n, c"
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ChaosNLIFormatError(
                    f"{where}: count for {letter!r} must be a non-negative integer, got {value!r}"
                )
            counts[CHAOSNLI_LETTERS.index(letter)] = value
    if count_list is not None:
        if (
            not isinstance(count_list, list)
            or len(count_list) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in count_list)
        ):
            raise ChaosNLIFormatError(
                f"{where}: field 'label_count' must be 3 non-negative integers (e, n, c), got {count_list!r}"
            )
        if counts is not None and list(count_list) != counts:
            raise ChaosNLIFormatError(
                f"{where}: 'label_count' {count_list} does not match 'label_counter' {counter} in e/n/c order"
            )
        counts = list(count_list)
    total = sum(counts)
    if total == 0:
        raise ChaosNLIFormatError(f"{where}: label counts are empty (they sum to 0)")
    if expected_total is not None and total != expected_total:
        raise ChaosNLIFormatError(f"{where}: label counts sum to {total}, expected {expected_total}")
    return counts


def _majority(record: dict, counts: List[int], where: str) -> int:
    top = max(counts)
    winners = [k for k, c in enumerate(counts) if c == top]
    letter = record.get("majority_label")
    if letter is None:
        return winners[0]
    if letter not in CHAOSNLI_LETTERS:
        raise ChaosNLIFormatError(f"{where}: unknown label letter {letter!r} in 'majority_label'")
    label = CHAOSNLI_LETTERS.index(letter)
    if label not in winners:
        raise ChaosNLIFormatError(f"{where}: 'majority_label' {letter!r} is not a most frequent label of {counts}")
    # On a tie ChaosNLI's own majority_label decides, so the gold label matches the release.
    return label


def parse_chaosnli_lines(
    lines: Iterable[str],
    name: str,
    subset: Optional[str] = None,
    expected_total: Optional[int] = 100,
    thresholds: Tuple[float, float] = DEFAULT_THRESHOLDS,
) -> Dict[str, list]:
    """Parse ChaosNLI jsonl lines into columns (see `load_chaosnli`); errors name `name` and the line."""
    cols: Dict[str, list] = {c: [] for c in COLUMNS}
    seen: Dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}, line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ChaosNLIFormatError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ChaosNLIFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        uid = record.get("uid")
        if not isinstance(uid, str) or not uid:
            raise ChaosNLIFormatError(f"{where}: missing field 'uid'")
        if uid in seen:
            raise ChaosNLIFormatError(f"{where}: uid {uid!r} already used on line {seen[uid]}")
        seen[uid] = lineno
        example = record.get("example")
        if not isinstance(example, dict):
            raise ChaosNLIFormatError(f"{where}: missing field 'example' (with premise and hypothesis)")
        for key in ("premise", "hypothesis"):
            text = example.get(key)
            if key not in example:
                raise ChaosNLIFormatError(f"{where}: missing field 'example.{key}'")
            if text is None:
                raise ChaosNLIFormatError(f"{where}: field 'example.{key}' is null; expected a non-empty string")
            if not isinstance(text, str):
                raise ChaosNLIFormatError(
                    f"{where}: field 'example.{key}' must be a string, got {type(text).__name__} {text!r}"
                )
            if not text.strip():
                raise ChaosNLIFormatError(f"{where}: field 'example.{key}' is empty; expected a non-empty string")
        counts = _parse_counts(record, where, expected_total)
        label = _majority(record, counts, where)
        row_subset = subset
        if row_subset is None:
            src = str(example.get("source", ""))
            row_subset = "mnli" if src.startswith("mnli") else "snli" if src.startswith("snli") else src or "unknown"
        cols["uid"].append(uid)
        cols["premise"].append(example["premise"])
        cols["hypothesis"].append(example["hypothesis"])
        cols["label"].append(label)
        cols["label_counts"].append(counts)
        cols["subset"].append(row_subset)
    if not cols["uid"]:
        raise ChaosNLIFormatError(f"{name}: no ChaosNLI examples found (empty file)")
    h = annotation_entropy(np.asarray(cols["label_counts"], dtype=np.float64))
    cols["entropy"] = [float(x) for x in np.atleast_1d(h)]
    cols["category"] = [str(c) for c in np.atleast_1d(entropy_category(h, thresholds))]
    return cols


def _zip_lines(path: str, subset: Optional[str]) -> Tuple[Iterator[str], str, str]:
    zf = zipfile.ZipFile(path)
    found = {}
    for member in zf.namelist():
        for key, base in CHAOSNLI_MEMBERS.items():
            if os.path.basename(member) == base:
                found[key] = member
    if not found:
        raise ChaosNLIFormatError(
            f"{path}: no ChaosNLI NLI file ({', '.join(CHAOSNLI_MEMBERS.values())}) in the archive"
        )
    if subset is None:
        if len(found) > 1:
            raise ValueError(f"{path} holds several ChaosNLI subsets {sorted(found)}; pass subset='snli' or 'mnli'")
        subset = next(iter(found))
    if subset not in found:
        raise ChaosNLIFormatError(f"{path}: the archive has no {CHAOSNLI_MEMBERS[subset]}")
    member = found[subset]
    name = f"{path}:{member}"
    data = zf.read(member)
    return _decode_lines(data.splitlines(keepends=True), name, ChaosNLIFormatError), name, subset


def load_chaosnli(
    source: str,
    subset: Optional[str] = None,
    expected_total: Optional[int] = 100,
    thresholds: Tuple[float, float] = DEFAULT_THRESHOLDS,
    cache_dir: Optional[str] = None,
):
    """Load a ChaosNLI v1.0 NLI subset as a `datasets.Dataset`, one row per example.

    Args:
        source (`str`):
            A local ChaosNLI jsonl file (`chaosNLI_snli.jsonl`, `chaosNLI_mnli_m.jsonl`; UTF-8, optionally
            gzip-compressed, recognised by its magic bytes, and with or without a byte-order mark), the official
            `chaosNLI_v1.0.zip` archive, an http(s) URL of either (downloaded once into `cache_dir`),
            or the word `"official"` for the official archive's URL.
        subset (`str`, *optional*):
            `"snli"` or `"mnli"`: which subset to read from an archive (required when it holds both),
            and the value of the `subset` column. Inferred from the file when not given.
        expected_total (`int`, *optional*, defaults to 100):
            Number of annotator labels each example must have; `None` accepts any positive total.
        thresholds (`Tuple[float, float]`, *optional*, defaults to `(0.4, 0.7)`):
            Entropy category boundaries in nats, see `entropy_category`.
        cache_dir (`str`, *optional*):
            Where downloads are kept (default `$HF_ENTROPY_CACHE` or `~/.cache/hf_entropy_callback`).

    Returns:
        `datasets.Dataset` with columns `uid`, `premise`, `hypothesis`, `label` (majority vote as an id,
        0=entailment, 1=neutral, 2=contradiction; ties resolved by ChaosNLI's `majority_label`),
        `label_counts` (3 ints in that order), `entropy` (nats), `category` and `subset`.

    Raises:
        ChaosNLIFormatError: for a malformed line, a missing field, counts that are empty, do not sum to
            `expected_total` or disagree between `label_counter` and `label_count`, or an unknown label
            letter, a null or empty premise / hypothesis, text that is not UTF-8, or a damaged gzip stream;
            the message names the file and the line.
    """
    import datasets

    subset = _subset_alias(subset)
    if source == "official":
        source = CHAOSNLI_URL
    if source.startswith(("http://", "https://")):
        source = _download(source, cache_dir)
    if not os.path.exists(source):
        raise FileNotFoundError(f"ChaosNLI file not found: {source}")
    if zipfile.is_zipfile(source):
        lines, name, subset = _zip_lines(source, subset)
        cols = parse_chaosnli_lines(lines, name, subset, expected_total, thresholds)
    else:
        lines = read_text_lines(source, ChaosNLIFormatError)
        cols = parse_chaosnli_lines(lines, source, subset, expected_total, thresholds)
    features = datasets.Features(
        {
            "uid": datasets.Value("string"),
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(NLI_LABELS)),
            "label_counts": datasets.Sequence(datasets.Value("int64"), length=3),
            "entropy": datasets.Value("float64"),
            "category": datasets.Value("string"),
            "subset": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(cols, features=features)


def category_table(ds, by: str = "subset"):
    """Counts and shares of each entropy category, per value of column `by` (a tidy DataFrame)."""
    import pandas as pd

    from .entropy import CATEGORIES

    df = ds.select_columns([by, "category", "entropy"]).to_pandas()
    rows = []
    for key, grp in df.groupby(by, sort=True):
        for cat in CATEGORIES:
            n = int((grp["category"] == cat).sum())
            rows.append({by: key, "category": cat, "n": n, "share": n / len(grp)})
        rows.append({by: key, "category": "all", "n": len(grp), "share": 1.0})
    return pd.DataFrame(rows)
