"""The run directory: what a tracked training run leaves for the analysis, written atomically.

Layout of ``<output_dir>/entropy_tracking/`` (format version 2)::

    run_config.json    {"format_version": 2, "config": {...}, "versions": {...}}
    examples.parquet   one row per tracked example: example_id, set, index (position in its set),
                       entropy, category, label (the training label, after any label noise),
                       label_counts, token_length, noised (chosen for label noise), original_label
                       (the label before noise; equals ``label`` where there was none)
    points.parquet     one row per tracking point: point, step, epoch, reason ("step0", "interval",
                       "epoch_end", "final", joined with "+" when they coincide)
    logprobs.npz       per set name, float32 log-probabilities of shape (points, examples, classes)
    instruments.parquet          optional (runs with instruments): `INSTRUMENT_COLUMNS`
    instrument_examples.parquet  optional: per-example instrument values, `INSTRUMENT_EXAMPLE_COLUMNS`

Only when instruments were on (`hf_entropy_callback.instruments`; the run config's ``"instruments"`` key
says which), one tidy row per value per point::

    instruments.parquet          point (index into points.parquet), step, instrument ("grad_alignment",
                                 "grad_norms", "drift"), quantity, group ("" if n/a), component ("" if
                                 n/a), value (float64)
    instrument_examples.parquet  per-example values: point, step, instrument, quantity, set, index
                                 (position in its set), example_id, value
    instrument_reference.npz     the drift instrument's reference (initial hidden states of the sample,
                                 initial trainable non-LoRA weights), needed to resume; written into
                                 checkpoints, not into the final run directory

These files are optional additions to format version 2: older readers ignore them.

Version 1 (before ``original_label``) is still read: `load_run` sets ``original_label := label`` and
``Run.original_label_known`` False when a version-1 run has noised examples (their label before the
noise is unknown; a noise-free version-1 run loses nothing). `write_run` fills a missing
``original_label`` with ``label`` only when no example is noised, and refuses otherwise.

The parquet files carry page checksums and the npz its zip CRCs, so a damaged file is reported
(`RunFormatError`, naming the run and the file) rather than read as other numbers.

The directory is built under a temporary name (``.entropy_tracking.tmp-<pid>-<random>``) and renamed
into place, so a reader never sees a half-written run; a replaced run moves aside to
``.entropy_tracking.old-<pid>-<random>`` first. Such hidden folders left by a killed write are removed
by the next write to the same path (only names of that pattern for that target, and never one whose
writer process is still alive on this machine). Files and folders get the user's umask (as `open`
would give them), not the owner-only modes of `tempfile`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np

RUN_FORMAT_VERSION = 2
#: Older format versions `load_run` still reads (see the module docstring).
READABLE_FORMAT_VERSIONS = (1, 2)
TRACKING_DIRNAME = "entropy_tracking"
EXAMPLE_COLUMNS = (
    "example_id",
    "set",
    "index",
    "entropy",
    "category",
    "label",
    "label_counts",
    "token_length",
    "noised",
    "original_label",
)
#: The example columns of format version 1 (no ``original_label``).
EXAMPLE_COLUMNS_V1 = EXAMPLE_COLUMNS[:-1]
POINT_COLUMNS = ("point", "step", "epoch", "reason")
#: Columns of ``instruments.parquet`` (one row per value per tracking point).
INSTRUMENT_COLUMNS = ("point", "step", "instrument", "quantity", "group", "component", "value")
#: Columns of ``instrument_examples.parquet`` (one row per example per value per tracking point).
INSTRUMENT_EXAMPLE_COLUMNS = ("point", "step", "instrument", "quantity", "set", "index", "example_id", "value")
INSTRUMENTS_FILE = "instruments.parquet"
INSTRUMENT_EXAMPLES_FILE = "instrument_examples.parquet"
INSTRUMENT_REFERENCE_FILE = "instrument_reference.npz"
_INT_COLUMNS = ("point", "step", "index")
_FLOAT_COLUMNS = ("value",)


class RunFormatError(ValueError):
    """A run directory is missing, incomplete, corrupt or from an unsupported format version."""


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's /proc).

    `os.umask` can only be read by setting it, which races with other threads creating files;
    that fallback sets it back at once.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str, directory: bool) -> None:
    """Give `path` the mode a plain `open` / `os.makedirs` would: 0o666 (files) or 0o777 (folders) less the umask.

    `tempfile.mkstemp` / `mkdtemp` create 0600 / 0700, which would leave runs and reports readable
    by their owner only after the rename into place.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def temp_name_prefix(target: str, kind: str) -> str:
    """Prefix of the hidden temporary folders of `target`: ``.<name>.<kind>-<pid>-`` (kind "tmp" or "old")."""
    return f".{os.path.basename(target)}.{kind}-{os.getpid()}-"


def remove_stale_temporaries(target: str) -> list:
    """Remove the hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` folders a killed write to `target` left beside it.

    Only folders whose name matches that pattern for this target are touched (``-<pid>-<random>``, or
    ``-<random>`` as older versions named them), and one whose pid is a live process on this machine
    (a writer still at work) is kept.

    Args:
        target (`str`): the folder that is about to be written.

    Returns:
        `list` of the removed paths.
    """
    parent, base = os.path.split(os.path.abspath(target))
    pattern = re.compile(r"^\." + re.escape(base) + r"\.(?:tmp|old)-(?:(\d+)-)?[A-Za-z0-9_]+$")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        path = os.path.join(parent, name)
        if not m or os.path.islink(path) or not os.path.isdir(path):
            continue
        if m.group(1) is not None and _pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


def library_versions() -> Dict[str, str]:
    """Versions of the libraries that shape a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("hf_entropy_callback", "torch", "transformers", "peft", "accelerate", "datasets", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def write_json_atomic(path: str, data: Any, *, sort_keys: bool = False) -> None:
    """Write JSON to `path` through a temporary file in the same folder and an atomic rename.

    The data reach the disk (fsync) before the rename, so a kill or a power cut leaves the old file
    or the new one; the file gets the user's umask (mkstemp would leave it 0600).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=_json_default, allow_nan=True, sort_keys=sort_keys)
            fh.flush()
            os.fsync(fh.fileno())
        apply_umask(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def instrument_frame(data, columns=INSTRUMENT_COLUMNS):
    """A table of instrument values with `columns` in their fixed dtypes (int64 / str / float64).

    Args:
        data: `None` (an empty table), a `pandas.DataFrame`, or a list of row tuples in `columns` order.
        columns (`Sequence[str]`): `INSTRUMENT_COLUMNS` or `INSTRUMENT_EXAMPLE_COLUMNS`.

    Returns:
        `pandas.DataFrame` with exactly `columns`.
    """
    import pandas as pd

    if data is None:
        frame = pd.DataFrame({c: [] for c in columns})
    elif isinstance(data, pd.DataFrame):
        missing = [c for c in columns if c not in data.columns]
        if missing:
            raise RunFormatError(f"instrument table lacks columns {missing}")
        frame = data.loc[:, list(columns)].reset_index(drop=True)
    else:
        frame = pd.DataFrame.from_records(list(data), columns=list(columns))
    out = {}
    for c in columns:
        if c in _INT_COLUMNS:
            out[c] = frame[c].astype(np.int64)
        elif c in _FLOAT_COLUMNS:
            out[c] = frame[c].astype(np.float64)
        else:
            out[c] = frame[c].astype(str).astype(object)
    return pd.DataFrame(out, columns=list(columns))


def _check_instrument_points(frame, points, name: str) -> None:
    """Every row's point exists and carries that point's step."""
    if not len(frame):
        return
    point = frame["point"].to_numpy()
    bad = (point < 0) | (point >= len(points))
    if bad.any():
        raise RunFormatError(f"{name}: point {int(point[bad][0])} is not one of the run's {len(points)} points")
    steps = points["step"].to_numpy()[point]
    off = steps != frame["step"].to_numpy()
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise RunFormatError(
            f"{name}: row {i} has step {int(frame['step'].iloc[i])} but point {int(point[i])} is step {int(steps[i])}"
        )


def write_run(
    path: str,
    config: Mapping[str, Any],
    examples,
    points,
    logprobs: Mapping[str, np.ndarray],
    *,
    instruments=None,
    instrument_examples=None,
    instrument_reference: Optional[Mapping[str, np.ndarray]] = None,
) -> str:
    """Write a run's tracking data to `path` (the tracking directory itself), atomically.

    Args:
        path (`str`): target directory, e.g. ``<output_dir>/entropy_tracking``; replaced if present. Hidden
            temporaries of an earlier, killed write to it are removed (see the module docstring).
        config (`Mapping`): the run's configuration (JSON-serialisable values).
        examples (`pandas.DataFrame`): one row per tracked example with `EXAMPLE_COLUMNS`.
        points (`pandas.DataFrame`): one row per tracking point with `POINT_COLUMNS`.
        logprobs (`Mapping[str, np.ndarray]`): per set, an array (points, examples of the set, classes).
        instruments (`pandas.DataFrame`, *optional*): `INSTRUMENT_COLUMNS` rows; with `instrument_examples`
            (`INSTRUMENT_EXAMPLE_COLUMNS`), written only when either is given (instruments were on).
        instrument_reference (`Mapping[str, np.ndarray]`, *optional*): arrays written to
            ``instrument_reference.npz`` (what resuming the drift instrument needs).

    Returns:
        `str`: the path written.
    """
    if "original_label" not in examples.columns and "noised" in examples.columns:
        if examples["noised"].astype(bool).any():
            raise RunFormatError(
                "write_run: examples table lacks original_label (the label before noise), which "
                "is required when some examples are noised"
            )
        examples = examples.assign(original_label=examples["label"])  # no noise: the label is the original
    missing = [c for c in EXAMPLE_COLUMNS if c not in examples.columns]
    if missing:
        raise RunFormatError(f"write_run: examples table lacks columns {missing}")
    unmatched = sorted(set(examples["set"]) - set(logprobs))
    if unmatched:
        raise RunFormatError(f"write_run: examples of sets {unmatched} have no logprobs")
    for name, arr in logprobs.items():
        n_set = int((examples["set"] == name).sum())
        if arr.ndim != 3 or arr.shape[0] != len(points) or arr.shape[1] != n_set:
            raise RunFormatError(
                f"write_run: logprobs[{name!r}] has shape {arr.shape}, expected ({len(points)}, {n_set}, classes)"
            )
    with_instruments = instruments is not None or instrument_examples is not None
    if with_instruments:
        instruments = instrument_frame(instruments, INSTRUMENT_COLUMNS)
        instrument_examples = instrument_frame(instrument_examples, INSTRUMENT_EXAMPLE_COLUMNS)
        _check_instrument_points(instruments, points, f"write_run: {INSTRUMENTS_FILE}")
        _check_instrument_points(instrument_examples, points, f"write_run: {INSTRUMENT_EXAMPLES_FILE}")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = tempfile.mkdtemp(dir=parent, prefix=temp_name_prefix(path, "tmp"))
    try:
        apply_umask(tmp, directory=True)
        write_json_atomic(
            os.path.join(tmp, "run_config.json"),
            {"format_version": RUN_FORMAT_VERSION, "config": dict(config), "versions": library_versions()},
        )
        # Page checksums (CRC32, part of the parquet format) let `load_run` catch a damaged page that
        # would otherwise read back as silently changed values.
        examples.reset_index(drop=True).to_parquet(
            os.path.join(tmp, "examples.parquet"), index=False, write_page_checksum=True
        )
        points.reset_index(drop=True).to_parquet(
            os.path.join(tmp, "points.parquet"), index=False, write_page_checksum=True
        )
        np.savez(os.path.join(tmp, "logprobs.npz"), **{k: np.asarray(v, dtype=np.float32) for k, v in logprobs.items()})
        if with_instruments:
            for name, frame in ((INSTRUMENTS_FILE, instruments), (INSTRUMENT_EXAMPLES_FILE, instrument_examples)):
                frame.to_parquet(os.path.join(tmp, name), index=False, write_page_checksum=True)
        if instrument_reference is not None:
            np.savez(
                os.path.join(tmp, INSTRUMENT_REFERENCE_FILE),
                **{k: np.asarray(v) for k, v in instrument_reference.items()},
            )
        # Swap in: the old copy moves aside first so `path` is never a half-written directory.
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=temp_name_prefix(path, "old"))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@dataclass
class Run:
    """A loaded run directory.

    Attributes:
        path (`str`): the tracking directory.
        config (`dict`): the run's configuration as stored (`run_config` reads it into a `RunConfig`).
        versions (`dict`): library versions of the run.
        examples (`pandas.DataFrame`): one row per tracked example (`EXAMPLE_COLUMNS`).
        points (`pandas.DataFrame`): the tracking points (`POINT_COLUMNS`), in order.
        logprobs (`Dict[str, np.ndarray]`): per set, float32 (points, examples, classes).
        format_version (`int`): the format version the run was written in.
        instruments (`pandas.DataFrame`): instrument values (`INSTRUMENT_COLUMNS`); empty when none were on.
        instrument_examples (`pandas.DataFrame`): per-example instrument values (`INSTRUMENT_EXAMPLE_COLUMNS`);
            empty when none were on.
    """

    path: str
    config: Dict[str, Any]
    versions: Dict[str, str]
    examples: Any
    points: Any
    logprobs: Dict[str, np.ndarray] = field(repr=False)
    format_version: int = RUN_FORMAT_VERSION
    instruments: Any = field(default=None, repr=False)
    instrument_examples: Any = field(default=None, repr=False)

    def __post_init__(self):
        self.instruments = instrument_frame(self.instruments, INSTRUMENT_COLUMNS)
        self.instrument_examples = instrument_frame(self.instrument_examples, INSTRUMENT_EXAMPLE_COLUMNS)

    @property
    def run_config(self):
        """The configuration as a `hf_entropy_callback.run_config.RunConfig` (older configs upgraded)."""
        from .run_config import RunConfig

        return RunConfig.from_dict(self.config)

    @property
    def original_label_known(self) -> bool:
        """False for a version-1 run with noised examples: their label before the noise was not stored."""
        if self.format_version >= 2 or "noised" not in self.examples:
            return True
        return not bool(self.examples["noised"].astype(bool).any())

    @property
    def sets(self):
        return list(self.logprobs)

    @property
    def steps(self) -> np.ndarray:
        return self.points["step"].to_numpy()

    @property
    def progress(self) -> np.ndarray:
        """Training progress of each point, step / last step, in [0, 1]."""
        from .dynamics import progress

        return progress(self.steps)

    def set_examples(self, name: str = "train"):
        """The examples of one tracked set, in the order of its logprobs' second axis."""
        if name not in self.logprobs:
            raise KeyError(f"run {self.path} has no tracked set {name!r}; it has {self.sets}")
        return self.examples[self.examples["set"] == name].sort_values("index").reset_index(drop=True)

    def losses(self, name: str = "train") -> np.ndarray:
        """Unweighted cross-entropy of the gold label, -log p(gold), shape (points, examples)."""
        from .dynamics import gold_loss

        return gold_loss(self.logprobs[name], self.set_examples(name)["label"].to_numpy())


def _empty_frame(columns):
    import pandas as pd

    dtypes = {"point": "int64", "step": "int64", "index": "int64", "value": "float64"}
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, object)) for c in columns})


def find_tracking_dir(path: str) -> str:
    """`path` itself if it is a tracking directory, else its `entropy_tracking` subfolder."""
    if os.path.isfile(os.path.join(path, "run_config.json")):
        return path
    sub = os.path.join(path, TRACKING_DIRNAME)
    if os.path.isfile(os.path.join(sub, "run_config.json")):
        return sub
    raise RunFormatError(f"{path}: not a run directory (no {TRACKING_DIRNAME}/run_config.json)")


def load_run(path: str) -> Run:
    """Read a run directory (its output dir, a checkpoint dir, or the tracking dir itself).

    Args:
        path (`str`): the directory.

    Returns:
        `Run`

    Raises:
        RunFormatError: when the directory is not a run, is incomplete, has another format version, or
            one of its files is corrupt (truncated, damaged or not in its format); the message names the
            run directory and the file.
    """
    tdir = find_tracking_dir(path)
    meta = _read_file(tdir, "run_config.json", _load_json)
    if not isinstance(meta, dict):
        raise RunFormatError(f"{tdir}: run_config.json is corrupt (expected a JSON object, got {type(meta).__name__})")
    version = meta.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
        raise RunFormatError(
            f"{tdir}: run format version {version!r} is not supported (this library reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}); rerun it or load it with the library version "
            "that wrote it"
        )
    config = meta.get("config", {})
    try:
        from .run_config import RunConfig

        RunConfig.from_dict(config if isinstance(config, dict) else {})
    except (TypeError, ValueError) as err:
        raise RunFormatError(f"{tdir}: run_config.json: {err}") from None
    for name in ("examples.parquet", "points.parquet", "logprobs.npz"):
        if not os.path.isfile(os.path.join(tdir, name)):
            raise RunFormatError(f"{tdir}: incomplete run, {name} is missing")
    examples = _read_file(tdir, "examples.parquet", _load_parquet)
    points = _read_file(tdir, "points.parquet", _load_parquet)
    ex_cols = EXAMPLE_COLUMNS if version >= 2 else EXAMPLE_COLUMNS_V1
    for name, frame, cols in (("examples.parquet", examples, ex_cols), ("points.parquet", points, POINT_COLUMNS)):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise RunFormatError(f"{tdir}: {name} lacks columns {missing} (format version {version})")
    if "original_label" not in examples.columns:
        # Version 1: exact where nothing was noised; `Run.original_label_known` flags the rest.
        examples = examples.assign(original_label=examples["label"])
    logprobs = _read_file(tdir, "logprobs.npz", _load_npz)
    config = meta.get("config", {})
    tables = _load_instrument_tables(tdir, config, points)
    run = Run(tdir, config, meta.get("versions", {}), examples, points, logprobs, int(version), *tables)
    for name, arr in logprobs.items():
        n = int((examples["set"] == name).sum())
        if arr.shape[:2] != (len(points), n):
            raise RunFormatError(
                f"{tdir}: logprobs.npz: logprobs[{name!r}] has shape {arr.shape}, expected ({len(points)}, {n}, K)"
            )
    return run


def _load_instrument_tables(tdir: str, config: Mapping[str, Any], points) -> tuple:
    """(instruments, instrument_examples) of a run; (None, None) for a run without instruments."""
    described = config.get("instruments") if isinstance(config, Mapping) else None
    names = described.get("names") if isinstance(described, Mapping) else None
    present = [os.path.isfile(os.path.join(tdir, n)) for n in (INSTRUMENTS_FILE, INSTRUMENT_EXAMPLES_FILE)]
    if not any(present) and not names:
        return None, None
    tables = []
    for name, columns, here in (
        (INSTRUMENTS_FILE, INSTRUMENT_COLUMNS, present[0]),
        (INSTRUMENT_EXAMPLES_FILE, INSTRUMENT_EXAMPLE_COLUMNS, present[1]),
    ):
        if not here:
            raise RunFormatError(f"{tdir}: incomplete run, {name} is missing (the run config lists instruments)")
        frame = _read_file(tdir, name, _load_parquet)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise RunFormatError(f"{tdir}: {name} lacks columns {missing}")
        try:
            frame = instrument_frame(frame, columns)
        except (TypeError, ValueError) as err:
            raise RunFormatError(f"{tdir}: {name} is corrupt ({type(err).__name__}: {str(err)[:200]})") from None
        _check_instrument_points(frame, points, f"{tdir}: {name}")
        tables.append(frame)
    return tuple(tables)


def load_instrument_reference(path: str) -> Optional[Dict[str, np.ndarray]]:
    """The arrays of a run's ``instrument_reference.npz``, or None when it has none.

    Args:
        path (`str`): a run directory (see `find_tracking_dir`).

    Raises:
        RunFormatError: when the file is damaged (the message names the run and the file).
    """
    tdir = find_tracking_dir(path)
    if not os.path.isfile(os.path.join(tdir, INSTRUMENT_REFERENCE_FILE)):
        return None
    return _read_file(tdir, INSTRUMENT_REFERENCE_FILE, _load_reference_npz)


def _load_reference_npz(path: str) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _load_json(path: str):
    with open(path, "rb") as fh:
        return json.loads(fh.read().decode("utf-8"))


def _load_parquet(path: str):
    import pandas as pd

    # Files written without page checksums (older runs) read as before.
    return pd.read_parquet(path, page_checksum_verification=True)


def _load_npz(path: str) -> Dict[str, np.ndarray]:
    """Every array of an npz, read in full (so zip CRCs are checked) and never unpickled."""
    out = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            arr = npz[key]
            if not np.issubdtype(arr.dtype, np.floating) or arr.ndim != 3:
                raise ValueError(
                    f"array {key!r} is {arr.dtype} of shape {arr.shape}, expected float (points, examples, classes)"
                )
            out[key] = arr
    return out


def _read_file(tdir: str, name: str, reader):
    """Read one file of a run; any failure of the format's reader becomes a `RunFormatError` naming run and file."""
    path = os.path.join(tdir, name)
    try:
        return reader(path)
    except RunFormatError:
        raise
    except (
        OSError,
        ValueError,
        EOFError,
        KeyError,
        IndexError,
        TypeError,
        SyntaxError,
        zipfile.BadZipFile,
        zlib.error,
        UnicodeDecodeError,
        MemoryError,
    ) as err:
        # numpy's message for a damaged header ("contains pickled (object) data ... allow_pickle=") would
        # invite loading untrusted bytes unsafely; a run never holds object arrays, so say what it is.
        detail = f"{type(err).__name__}: {err}"
        if "pickle" in detail:
            detail = "the array header is damaged (it declares object data, which runs never hold)"
        raise RunFormatError(
            f"{tdir}: {name} is corrupt or unreadable ({detail[:300]}); rerun this run or restore the file"
        ) from None
    except Exception as err:  # pyarrow's errors (ArrowInvalid is a ValueError, others are not)
        if type(err).__module__.split(".")[0] != "pyarrow":
            raise
        raise RunFormatError(
            f"{tdir}: {name} is corrupt or unreadable ({type(err).__name__}: {str(err)[:300]}); rerun this run or "
            "restore the file"
        ) from None


def history_complete(config) -> bool:
    """Whether a run's trajectory covers its whole training.

    False when the callback resumed from a checkpoint without the trajectory recorded before it
    (config ``resumed_without_history: true``, or ``history_complete: false`` as later versions
    may write it): such a run lacks its early tracking points, so its AULC and Delta L are not
    comparable with complete runs.
    """
    if not isinstance(config, Mapping):  # a RunConfig
        config = config.to_dict()
    if config.get("history_complete") is False:
        return False
    return not bool(config.get("resumed_without_history", False))


def save_summary(path: str, summary: Optional[Dict[str, Any]]) -> None:
    """Store a per-run summary (e.g. final accuracy, correlations) as ``summary.json`` beside the tracking data."""
    write_json_atomic(os.path.join(find_tracking_dir(path), "summary.json"), summary or {})
