"""Train-mode dynamics of the whole training set: the files, their loader, and Dataset Cartography from them.

`TrainDynamicsMixin` (`hf_entropy_callback.train_dynamics`) keeps, for every training example each
time the training loop sees it, what the training forward already computed, and writes one file per
epoch. This module owns that format (numpy, pandas and pyarrow only, so reading runs stays light):

    <output_dir>/train_dynamics/epoch-0001.parquet, epoch-0002.parquet, ...   one file per epoch

one row per training example seen in the epoch, columns:

    mode            "train" in every row: these records come from the training forward (dropout on,
                    the weights *before* that step's update), unlike the tracked points of
                    ``entropy_tracking/`` (eval mode, no dropout, weights after the update)
    epoch           1-based: epoch 1 is the first pass over the training data
    step            the optimizer step the example's micro-batch contributed to (1-based; the
                    Trainer's ``global_step`` once that update is done)
    example_index   the stable example index (``example_index`` column; see `add_example_index`)
    example_id      the example's id where the training set has one, else null
    label           the label the model was trained on (after any label noise)
    loss            the UNweighted cross-entropy of that label, ``-log p(label)``, whatever the training
                    objective was (class weights and soft labels are not applied)
    logprob_0..K-1  float32 log-probabilities of the K classes (log-softmax of the training logits)
    epoch_complete  whether the epoch ran to its end (False for a last epoch cut by ``max_steps`` or a stop)

and, in the parquet schema's metadata under ``hf_entropy_callback.train_dynamics``, a JSON object with
``format_version``, ``mode`` ("train"), ``epoch``, ``epoch_complete``, ``n_records``, ``n_examples``
(the training set's size; fewer records mean examples the epoch did not reach, e.g. with
``dataloader_drop_last``), ``duplicates_dropped``, ``label_names``, ``world_size``,
``history_complete`` and the loss definition.

One record per example per epoch: when an example is seen more than once in an epoch (the duplicates
that distributed samplers add to even out the last batch, or a sampler drawing with replacement), the
record of its first sighting (the lowest step; across processes, the lowest rank) is kept and the
others are counted in ``duplicates_dropped``.

The folder sits beside ``entropy_tracking/``, not inside it: the tracker replaces that folder as a
whole each time it saves. Each file is written under a hidden temporary name (``.<name>.tmp-<pid>-...``),
synced and renamed into place, so a reader sees a whole file or none. A checkpoint holds the records
of the epoch in progress (``checkpoint-N/train_dynamics/partial-epoch-EEEE.parquet``, same format), so a
resumed run loses and duplicates nothing.

`train_cartography` computes the Dataset Cartography statistics (Swayamdipta et al., 2020) of every
training example from these records, one record per epoch as in the original recipe, with
`hf_entropy_callback.dynamics.cartography`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from .dynamics import cartography
from .runs import TRACKING_DIRNAME, RunFormatError, _read_file, apply_umask, temp_name_prefix

TRAIN_DYNAMICS_DIRNAME = "train_dynamics"
TRAIN_DYNAMICS_FORMAT_VERSION = 1
#: The value of the ``mode`` column and metadata: records of the training forward.
TRAIN_MODE = "train"
METADATA_KEY = b"hf_entropy_callback.train_dynamics"
LOSS_DEFINITION = (
    "unweighted cross-entropy of the training label, -log p(label), from the logits of the training forward "
    "(train mode: dropout on; the weights before that step's update)"
)
#: The columns of a file before the K log-probability columns (``logprob_0`` ... ``logprob_{K-1}``).
COLUMNS = ("mode", "epoch", "step", "example_index", "example_id", "label", "loss", "epoch_complete")
_EPOCH_FILE_RE = re.compile(r"^epoch-(\d+)\.parquet$")

__all__ = [
    "TRAIN_DYNAMICS_DIRNAME",
    "TRAIN_MODE",
    "TrainDynamicsFormatError",
    "epoch_file_name",
    "find_train_dynamics",
    "load_train_dynamics",
    "logprob_columns",
    "plot_data_map",
    "summarize_cartography",
    "train_cartography",
    "write_records",
]


class TrainDynamicsFormatError(RunFormatError):
    """Train-mode dynamics that are missing, not in train mode, or unreadable; the message names the file."""


def epoch_file_name(epoch: int, partial: bool = False) -> str:
    """``epoch-0003.parquet`` (``partial-epoch-0003.parquet`` for a checkpoint's epoch in progress)."""
    return f"{'partial-' if partial else ''}epoch-{int(epoch):04d}.parquet"


def logprob_columns(num_labels: int) -> List[str]:
    return [f"logprob_{k}" for k in range(num_labels)]


def write_records(path: str, records: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> str:
    """Write one epoch's records to `path` (parquet), atomically.

    Args:
        path (`str`): the file, e.g. ``<output_dir>/train_dynamics/epoch-0001.parquet``; its folder is created.
        records (`Mapping[str, np.ndarray]`): ``example_index``, ``step``, ``label`` (ints), ``loss``
            (float), ``logprobs`` (float, (n, K)), and optionally ``example_id`` (strings; None where unknown).
        meta (`Mapping`): file metadata; ``epoch`` and ``epoch_complete`` are required, ``mode`` and
            ``format_version`` are set here.

    Returns:
        `str`: the path written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    lp = np.asarray(records["logprobs"], dtype=np.float32)
    n = len(lp)
    if lp.ndim != 2:
        raise ValueError(f"write_records: logprobs must be (examples, classes), got shape {lp.shape}")
    ids = records.get("example_id")
    epoch, complete = int(meta["epoch"]), bool(meta["epoch_complete"])
    columns = {
        "mode": pa.array([TRAIN_MODE] * n, pa.string()),
        "epoch": pa.array(np.full(n, epoch, np.int64)),
        "step": pa.array(np.asarray(records["step"], np.int64)),
        "example_index": pa.array(np.asarray(records["example_index"], np.int64)),
        "example_id": pa.array(
            [None] * n if ids is None else [None if v is None else str(v) for v in ids], pa.string()
        ),
        "label": pa.array(np.asarray(records["label"], np.int64)),
        "loss": pa.array(np.asarray(records["loss"], np.float32)),
        "epoch_complete": pa.array(np.full(n, complete, bool)),
    }
    for k, name in enumerate(logprob_columns(lp.shape[1])):
        columns[name] = pa.array(np.ascontiguousarray(lp[:, k]))
    table = pa.table(columns)
    info = {"format_version": TRAIN_DYNAMICS_FORMAT_VERSION, "mode": TRAIN_MODE, "loss": LOSS_DEFINITION, **meta}
    info.update(num_labels=int(lp.shape[1]), n_records=n)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(info).encode()})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_name_prefix(path, "tmp"))
    os.close(fd)
    try:
        # Page checksums let the reader catch a damaged page instead of returning other numbers.
        pq.write_table(table, tmp, write_page_checksum=True)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data reach the disk before the rename, so a crash leaves the old file or the new
        finally:
            os.close(fd)
        apply_umask(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _read_records_file(path: str):
    """One file as (DataFrame, metadata); raises `TrainDynamicsFormatError` naming the file."""
    import pyarrow.parquet as pq

    folder, name = os.path.split(os.path.abspath(path))

    def read(p):
        table = pq.read_table(p, page_checksum_verification=True)
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        return table.to_pandas(), (json.loads(raw.decode("utf-8")) if raw else None)

    try:
        frame, meta = _read_file(folder, name, read)
    except RunFormatError as err:
        raise TrainDynamicsFormatError(str(err)) from None
    if not isinstance(meta, dict) or meta.get("mode") != TRAIN_MODE:
        raise TrainDynamicsFormatError(
            f"{path}: not a train-mode dynamics file (its metadata {METADATA_KEY.decode()} should say "
            f"mode {TRAIN_MODE!r}, found {None if not isinstance(meta, dict) else meta.get('mode')!r})"
        )
    if meta.get("format_version") != TRAIN_DYNAMICS_FORMAT_VERSION:
        raise TrainDynamicsFormatError(
            f"{path}: train-dynamics format version {meta.get('format_version')!r} is not supported (this "
            f"library reads version {TRAIN_DYNAMICS_FORMAT_VERSION})"
        )
    k = meta.get("num_labels")
    missing = [c for c in COLUMNS + tuple(logprob_columns(k if isinstance(k, int) else 0)) if c not in frame]
    if missing or not isinstance(k, int):
        raise TrainDynamicsFormatError(f"{path}: lacks columns {missing or ['num_labels (metadata)']}")
    if not (frame["mode"] == TRAIN_MODE).all() or not (frame["epoch"] == meta.get("epoch")).all():
        raise TrainDynamicsFormatError(f"{path}: rows disagree with the file's mode or epoch {meta.get('epoch')!r}")
    return frame, meta


def find_train_dynamics(path: str) -> Optional[str]:
    """The folder of train-mode epoch files for `path`, or None when there is none.

    `path` may be the folder itself, a run's output folder (its ``train_dynamics`` subfolder) or a run's
    tracking folder (``<output_dir>/entropy_tracking``: the sibling folder).
    """
    path = os.path.abspath(path)
    candidates = [path, os.path.join(path, TRAIN_DYNAMICS_DIRNAME)]
    if os.path.basename(path) == TRACKING_DIRNAME:
        candidates.append(os.path.join(os.path.dirname(path), TRAIN_DYNAMICS_DIRNAME))
    for cand in candidates:
        if os.path.isdir(cand) and any(_EPOCH_FILE_RE.match(n) for n in os.listdir(cand)):
            return cand
    return None


def epoch_files(folder: str) -> Dict[int, str]:
    """``{epoch: path}`` of the epoch files in `folder` (hidden temporaries and partial files left out)."""
    out = {}
    for name in os.listdir(folder):
        m = _EPOCH_FILE_RE.match(name)
        if m:
            out[int(m.group(1))] = os.path.join(folder, name)
    return dict(sorted(out.items()))


def load_train_dynamics(path: str):
    """Read a run's train-mode dynamics into one tidy frame.

    Args:
        path (`str`): a run's output folder, its ``train_dynamics`` folder, its ``entropy_tracking`` folder,
            or one epoch file.

    Returns:
        `pandas.DataFrame`: one row per example and epoch, the columns of the files (see the module
        docstring), sorted by epoch and example index. ``frame.attrs["files"]`` lists each file's metadata.

    Raises:
        TrainDynamicsFormatError: no epoch file found, or a file that is not train mode, is of another
            format version, or is damaged (the message names the file).
    """
    import pandas as pd

    if os.path.isfile(path):
        files = {0: path}
    else:
        folder = find_train_dynamics(path)
        if folder is None:
            raise TrainDynamicsFormatError(
                f"{path}: no train-mode dynamics (no {TRAIN_DYNAMICS_DIRNAME}/epoch-*.parquet); train with "
                "record_train_dynamics=True (run_glue_entropy.py --record_train_dynamics)"
            )
        files = epoch_files(folder)
    frames, metas, num_labels = [], [], set()
    for file_epoch, fpath in files.items():
        frame, meta = _read_records_file(fpath)
        if file_epoch and meta.get("epoch") != file_epoch:
            raise TrainDynamicsFormatError(
                f"{fpath}: holds epoch {meta.get('epoch')!r}, not the {file_epoch} of its name"
            )
        frames.append(frame)
        metas.append(dict(meta, path=fpath))
        num_labels.add(meta["num_labels"])
    if len(num_labels) > 1:
        raise TrainDynamicsFormatError(f"{path}: epoch files disagree on the number of classes: {sorted(num_labels)}")
    out = pd.concat(frames, ignore_index=True).sort_values(["epoch", "example_index"], kind="stable")
    out = out.reset_index(drop=True)
    out.attrs["files"] = metas
    return out


def _check_frame(dynamics) -> "Any":
    if isinstance(dynamics, (str, os.PathLike)):
        return load_train_dynamics(os.fspath(dynamics))
    missing = [c for c in COLUMNS if c not in dynamics]
    if missing:
        raise ValueError(f"train_cartography: the frame lacks columns {missing} (expected load_train_dynamics' output)")
    modes = set(dynamics["mode"].unique())
    if modes != {TRAIN_MODE}:
        raise ValueError(
            f"train_cartography: records must all be mode {TRAIN_MODE!r} (from the training forward), found {sorted(modes)}"
        )
    return dynamics


def train_cartography(dynamics, *, epochs: Optional[Iterable[int]] = None):
    """Dataset Cartography (Swayamdipta et al., 2020) of every training example, from train-mode records.

    As in the original recipe, one record per epoch (the example's first sighting in that epoch, see the
    module docstring): confidence = mean over epochs of p(gold label), variability = its population
    standard deviation, correctness = the share of epochs in which the argmax was the gold label
    (`hf_entropy_callback.dynamics.cartography`). The gold label is the label the model was trained on.

    Args:
        dynamics (`pandas.DataFrame` or `str`): `load_train_dynamics`' frame, or a path it reads.
        epochs (`Iterable[int]`, *optional*): the epochs to use; default every epoch that ran to its end
            (all epochs when none did, e.g. a run shorter than one epoch).

    Returns:
        `pandas.DataFrame`, one row per example with a record in every chosen epoch, sorted by example
        index: ``example_index``, ``example_id``, ``label``, ``n_epochs``, ``confidence``, ``variability``,
        ``correctness``. Examples missing from a chosen epoch are left out with a warning that counts them.

    Example:
        >>> import pandas as pd
        >>> lp = np.log([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.8, 0.2]])
        >>> frame = pd.DataFrame({"mode": "train", "epoch": [1, 1, 2, 2], "step": [1, 1, 2, 2],
        ...     "example_index": [0, 1, 0, 1], "example_id": None, "label": [0, 0, 0, 0], "loss": -lp[:, 0],
        ...     "epoch_complete": True, "logprob_0": lp[:, 0], "logprob_1": lp[:, 1]})
        >>> train_cartography(frame)[["example_index", "confidence", "variability", "correctness"]].round(3)
           example_index  confidence  variability  correctness
        0              0         0.8          0.1          1.0
        1              1         0.6          0.2          0.5
    """
    import pandas as pd

    frame = _check_frame(dynamics)
    if frame.empty:
        raise ValueError("train_cartography: no records")
    k = sum(1 for c in frame.columns if re.fullmatch(r"logprob_\d+", str(c)))
    if epochs is None:
        done = sorted(frame.loc[frame["epoch_complete"].astype(bool), "epoch"].unique())
        chosen = done or sorted(frame["epoch"].unique())
    else:
        chosen = sorted({int(e) for e in epochs})
        absent = sorted(set(chosen) - set(frame["epoch"].unique()))
        if absent:
            raise ValueError(
                f"train_cartography: no records of epochs {absent} (the records hold {sorted(frame['epoch'].unique())})"
            )
    frame = frame[frame["epoch"].isin(chosen)]
    if frame.duplicated(["epoch", "example_index"]).any():
        raise ValueError("train_cartography: more than one record of an example in an epoch (not one file per epoch?)")
    counts = frame.groupby("example_index")["epoch"].transform("size")
    kept = frame[counts == len(chosen)]
    n_left_out = frame.loc[counts != len(chosen), "example_index"].nunique()
    if n_left_out:
        warnings.warn(
            f"train_cartography: {n_left_out} examples lack a record in some of epochs {chosen} (not reached, e.g. "
            "dataloader_drop_last) and are left out",
            RuntimeWarning,
            stacklevel=2,
        )
    kept = kept.sort_values(["epoch", "example_index"], kind="stable")
    index = kept.loc[kept["epoch"] == chosen[0], "example_index"].to_numpy()
    lp = kept[logprob_columns(k)].to_numpy(np.float64).reshape(len(chosen), len(index), k)
    labels = kept["label"].to_numpy().reshape(len(chosen), len(index))
    if (labels != labels[0]).any():
        raise ValueError("train_cartography: an example's label differs between epochs")
    first = kept[kept["epoch"] == chosen[0]]
    stats = cartography(lp, labels[0])
    out = pd.DataFrame(
        {
            "example_index": index,
            "example_id": first["example_id"].to_numpy(),
            "label": labels[0],
            "n_epochs": len(chosen),
        }
    )
    for col in stats.columns:
        out[col] = stats[col].to_numpy()
    return out


def summarize_cartography(carto, by: Union[str, Sequence[str]] = "group"):
    """Mean confidence, variability and correctness (and the count) per group of `train_cartography`'s rows.

    Returns:
        `pandas.DataFrame` with the `by` columns, ``n``, ``n_epochs``, ``confidence``, ``variability``,
        ``correctness``.
    """
    by = [by] if isinstance(by, str) else list(by)
    g = carto.groupby(by, sort=False, dropna=False)
    out = g.agg(
        n=("example_index", "size"),
        n_epochs=("n_epochs", "max"),
        confidence=("confidence", "mean"),
        variability=("variability", "mean"),
        correctness=("correctness", "mean"),
    )
    return out.reset_index()


def plot_data_map(
    carto, *, hue: Optional[str] = None, palette: Optional[Mapping[str, Any]] = None, ax=None, s: float = 6
):
    """Draw the data map (variability on x, confidence on y) into `ax` and return it.

    Args:
        carto (`pandas.DataFrame`): `train_cartography`'s output (plus any column named by `hue`).
        hue (`str`, *optional*): a column to colour by; numeric values get a colour scale, categorical ones
            a colour each. Default: ``correctness``, as in the original data maps.
        palette (`Mapping[str, colour]`, *optional*): colours of categorical `hue` values, drawn in its order
            (the first underneath), values it does not name after them in default colours.
        ax (`matplotlib.axes.Axes`, *optional*): where to draw; default a new figure's axes.

    Returns:
        `matplotlib.axes.Axes`
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4.5))
    hue = hue or "correctness"
    values = carto[hue]
    from pandas.api.types import is_numeric_dtype

    if is_numeric_dtype(values) and not values.dtype == bool:
        sc = ax.scatter(carto["variability"], carto["confidence"], c=values, cmap="viridis", s=s, alpha=0.6, lw=0)
        ax.figure.colorbar(sc, ax=ax, label=hue)
    else:
        palette = dict(palette or {})
        groups = [g for g in palette if (values == g).any()] + [g for g in dict.fromkeys(values) if g not in palette]
        for name in groups:
            m = (values == name).to_numpy()
            ax.scatter(
                carto["variability"][m],
                carto["confidence"][m],
                s=s,
                alpha=0.6,
                lw=0,
                color=palette.get(name),
                label=f"{name} ({m.sum()})",
            )
        ax.legend(title=hue, fontsize="small", markerscale=2)
    ax.set_xlabel("variability (sd of p(gold) over epochs)")
    ax.set_ylabel("confidence (mean p(gold) over epochs)")
    ax.set_ylim(-0.02, 1.02)
    return ax
