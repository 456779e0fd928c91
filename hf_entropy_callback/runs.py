"""The run directory: what a tracked training run leaves for the analysis, written atomically.

Layout of ``<output_dir>/entropy_tracking/`` (format version 1)::

    run_config.json    {"format_version": 1, "config": {...}, "versions": {...}}
    examples.parquet   one row per tracked example: example_id, set, index (position in its set),
                       entropy, category, label, label_counts, token_length, noised
    points.parquet     one row per tracking point: point, step, epoch, reason ("step0", "interval",
                       "epoch_end", "final", joined with "+" when they coincide)
    logprobs.npz       per set name, float32 log-probabilities of shape (points, examples, classes)

The directory is built under a temporary name and renamed into place, so a reader never sees a
half-written run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np

RUN_FORMAT_VERSION = 1
TRACKING_DIRNAME = "entropy_tracking"
EXAMPLE_COLUMNS = ("example_id", "set", "index", "entropy", "category", "label", "label_counts", "token_length", "noised")
POINT_COLUMNS = ("point", "step", "epoch", "reason")


class RunFormatError(ValueError):
    """A run directory is missing, incomplete or from an unsupported format version."""


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


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to `path` through a temporary file in the same folder and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=_json_default, allow_nan=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_run(
    path: str,
    config: Mapping[str, Any],
    examples,
    points,
    logprobs: Mapping[str, np.ndarray],
) -> str:
    """Write a run's tracking data to `path` (the tracking directory itself), atomically.

    Args:
        path (`str`): target directory, e.g. ``<output_dir>/entropy_tracking``; replaced if present.
        config (`Mapping`): the run's configuration (JSON-serialisable values).
        examples (`pandas.DataFrame`): one row per tracked example with `EXAMPLE_COLUMNS`.
        points (`pandas.DataFrame`): one row per tracking point with `POINT_COLUMNS`.
        logprobs (`Mapping[str, np.ndarray]`): per set, an array (points, examples of the set, classes).

    Returns:
        `str`: the path written.
    """
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
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        write_json_atomic(
            os.path.join(tmp, "run_config.json"),
            {"format_version": RUN_FORMAT_VERSION, "config": dict(config), "versions": library_versions()},
        )
        examples.reset_index(drop=True).to_parquet(os.path.join(tmp, "examples.parquet"), index=False)
        points.reset_index(drop=True).to_parquet(os.path.join(tmp, "points.parquet"), index=False)
        np.savez(os.path.join(tmp, "logprobs.npz"), **{k: np.asarray(v, dtype=np.float32) for k, v in logprobs.items()})
        # Swap in: the old copy moves aside first so `path` is never a half-written directory.
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.old-")
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
        config (`dict`): the run's configuration.
        versions (`dict`): library versions of the run.
        examples (`pandas.DataFrame`): one row per tracked example (`EXAMPLE_COLUMNS`).
        points (`pandas.DataFrame`): the tracking points (`POINT_COLUMNS`), in order.
        logprobs (`Dict[str, np.ndarray]`): per set, float32 (points, examples, classes).
    """

    path: str
    config: Dict[str, Any]
    versions: Dict[str, str]
    examples: Any
    points: Any
    logprobs: Dict[str, np.ndarray] = field(repr=False)

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
        RunFormatError: when the directory is not a run, is incomplete, or has another format version.
    """
    import pandas as pd

    tdir = find_tracking_dir(path)
    with open(os.path.join(tdir, "run_config.json")) as fh:
        meta = json.load(fh)
    version = meta.get("format_version")
    if version != RUN_FORMAT_VERSION:
        raise RunFormatError(
            f"{tdir}: run format version {version!r} is not supported (this library reads version "
            f"{RUN_FORMAT_VERSION}); rerun it or load it with the library version that wrote it"
        )
    for name in ("examples.parquet", "points.parquet", "logprobs.npz"):
        if not os.path.isfile(os.path.join(tdir, name)):
            raise RunFormatError(f"{tdir}: incomplete run, {name} is missing")
    examples = pd.read_parquet(os.path.join(tdir, "examples.parquet"))
    points = pd.read_parquet(os.path.join(tdir, "points.parquet"))
    with np.load(os.path.join(tdir, "logprobs.npz")) as npz:
        logprobs = {k: npz[k] for k in npz.files}
    run = Run(tdir, meta.get("config", {}), meta.get("versions", {}), examples, points, logprobs)
    for name, arr in logprobs.items():
        n = int((examples["set"] == name).sum())
        if arr.shape[:2] != (len(points), n):
            raise RunFormatError(f"{tdir}: logprobs[{name!r}] has shape {arr.shape}, expected ({len(points)}, {n}, K)")
    return run


def save_summary(path: str, summary: Optional[Dict[str, Any]]) -> None:
    """Store a per-run summary (e.g. final accuracy, correlations) as ``summary.json`` beside the tracking data."""
    write_json_atomic(os.path.join(find_tracking_dir(path), "summary.json"), summary or {})
