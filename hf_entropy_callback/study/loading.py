"""Loading many run directories into tidy tables (one pass per run; log-probabilities are not kept).

Per run, everything the report needs is derived right after loading, with
`hf_entropy_callback.dynamics`, so memory stays flat however many runs there are:

- ``runs``: one row per run (condition keys, seed, status, Spearman / Kendall of entropy vs
  AULC, validation accuracy, divergence);
- ``examples``: one row per (usable run, tracked example): `dynamics.example_dynamics`;
- ``curves``: per (run, tracking point, category) the mean, sd and n of the tracked loss;
- ``calibration``: per (run, set, category) `dynamics.calibration` at the final point;
- ``entropy``: per dataset, the union of the examples any of its runs tracked, every set, each
  example once (for the entropy histogram);
- ``agreement``: per (run, tracked set, tracking point, category) the mean agreement of the
  predicted with the human distribution (`hf_entropy_callback.agreement`);
- ``boot``: per run, the bootstrap replicates of its rho (`Options.n_boot`, seeded; examples
  sorted by id so the seeds of one condition, which track the same examples, share resamples; one
  `hf_entropy_callback.inference.BootstrapResampler` per study (per worker process) draws those
  resamples once per tracked set, the replicates the same as drawing them run by run);
- ``instruments``, ``instrument_examples``: the rows of runs with instruments (issue 12) and their
  per-example gradient norms at the last point (`hf_entropy_callback.study.instruments.run_instruments`).

Runs are loaded one at a time, in this process or (``workers``) in worker processes that each
summarise a run and send back its row and tables; the study is the same either way.

Conditions and duplicates: `hf_entropy_callback.study.conditions.assign_conditions`. A duplicate run (same
condition and seed as a run with a smaller id) has status "duplicate" and is excluded.

A run is *diverged* when any tracked loss of its train set is not finite, or when the mean tracked
loss over its train examples exceeds the sanity bound ``10 * ln K`` (K classes; `LOSS_BOUND_FACTOR`)
at any tracking point. ``ln K`` is the loss of a uniform prediction, where every run starts; a
mean ten times that is a blown-up run even when it stays finite (e.g. 3,566 nats). The bound is
on the mean, not on single examples: a confidently wrong example of a well-trained model can pass
10 ln K on its own.

A run has an *incomplete history* when its config says ``resumed_without_history: true`` (or
``history_complete: false``): it resumed from a checkpoint without the trajectory recorded before
it, so its AULC and Delta L miss the early points (`hf_entropy_callback.runs.history_complete`).

Diverged runs and runs with an incomplete history are *excluded*: listed (status "diverged" or
"incomplete history", the reason in ``exclusion``, rho over the finite examples) but kept out of
every aggregate, comparison and figure, with a note.

A run that did *not learn* (validation accuracy less than `hf_entropy_callback.dynamics.LEARNED_MARGIN` above
chance, `hf_entropy_callback.dynamics.near_chance`) has ``learned`` False and a note, and stays in the
aggregates: the protocol keeps every run that trained without diverging, and the matched-learning-rate
analysis reads such runs on purpose. ``learned`` is None when the run has no validation accuracy.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from hf_entropy_callback.agreement import agreement_table
from hf_entropy_callback.dynamics import (
    LEARNED_MARGIN,
    accuracy,
    calibration,
    correlation_table,
    example_dynamics,
    near_chance,
)
from hf_entropy_callback.entropy import CATEGORIES
from hf_entropy_callback.inference import BootstrapResampler, percentile_interval
from hf_entropy_callback.runs import RunFormatError, history_complete, load_run

from .conditions import assign_conditions, describe_run, discover_runs, is_main_matrix, run_ids
from .instruments import run_instruments

#: Defaults of the report's statistical options (flags of `hf-entropy-report` / `python -m analysis`).
DEFAULT_BOOTSTRAP = 1000
DEFAULT_BOOTSTRAP_SEED = 0
DEFAULT_ECE_BINS = 10
DEFAULT_CARTOGRAPHY_POINTS = "epoch_end"


@dataclass
class Options:
    """The statistical options of a report (see `hf-entropy-report --help`)."""

    n_boot: int = DEFAULT_BOOTSTRAP
    boot_seed: int = DEFAULT_BOOTSTRAP_SEED
    ece_bins: int = DEFAULT_ECE_BINS
    cartography_points: str = DEFAULT_CARTOGRAPHY_POINTS


def tracked_set_hash(example_ids) -> str:
    """A short hash (12 hex digits of SHA-256) of the sorted example ids: equal iff the sets are equal.

    >>> tracked_set_hash(["b", "a"]) == tracked_set_hash(["a", "b"]), len(tracked_set_hash(["a"]))
    (True, 12)
    """
    import hashlib

    h = hashlib.sha256("\n".join(sorted(map(str, example_ids))).encode("utf-8"))
    return h.hexdigest()[:12]


#: A run whose mean tracked loss exceeds LOSS_BOUND_FACTOR * ln K at a point counts as diverged.
LOSS_BOUND_FACTOR = 10.0


def loss_bound(num_classes: int) -> float:
    """The sanity bound ``LOSS_BOUND_FACTOR * ln K`` on a run's mean tracked loss (nats)."""
    return LOSS_BOUND_FACTOR * math.log(num_classes)


@dataclass
class Study:
    """Everything the report needs, from all runs (see the module docstring)."""

    runs: pd.DataFrame
    examples: pd.DataFrame
    curves: pd.DataFrame
    calibration: pd.DataFrame
    entropy: pd.DataFrame
    notes: List[str] = field(default_factory=list)
    configs: Dict[str, dict] = field(default_factory=dict, repr=False)
    agreement: pd.DataFrame = field(default_factory=pd.DataFrame)
    boot: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    options: Options = field(default_factory=Options)
    instruments: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    instrument_examples: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    @property
    def usable(self) -> pd.DataFrame:
        """The runs that enter aggregates (not excluded: not diverged, history complete)."""
        return self.runs[~self.runs["excluded"]]


def _curves(run_id: str, losses: np.ndarray, steps: np.ndarray, epochs: np.ndarray, cats: np.ndarray) -> pd.DataFrame:
    progress = steps / steps[-1]
    names = [c for c in CATEGORIES if (cats == c).any()] + ["all"]
    means, sds, ns = [], [], []
    for cat in names:
        sub = losses[:, cats == cat] if cat != "all" else losses
        ns.append(np.isfinite(sub).sum(axis=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN points of a diverged run
            means.append(np.nanmean(sub, axis=1))
            sds.append(np.nanstd(sub, axis=1, ddof=1))
    # One frame for all categories (category-major, points in order), built once.
    k, n_pts = len(names), len(steps)
    return pd.DataFrame(
        {
            "run_id": np.full(k * n_pts, run_id, dtype=object),
            "point": np.tile(np.arange(n_pts), k),
            "step": np.tile(steps, k),
            "progress": np.tile(progress, k),
            "epoch": np.tile(epochs, k),
            "category": np.repeat(np.array(names, dtype=object), n_pts),
            "mean": np.concatenate(means),
            "sd": np.concatenate(sds),
            "n": np.concatenate(ns),
        }
    )


def _agreement(run, run_id: str, sets: Sequence[str]) -> Optional[pd.DataFrame]:
    """Per set, point and category the mean agreement metrics (`hf_entropy_callback.agreement`)."""
    parts, names = [], []
    steps = run.steps.astype(np.float64)
    for name in sets:
        if name not in run.logprobs:
            continue
        ex = run.set_examples(name)
        parts.append(
            agreement_table(
                run.logprobs[name],
                np.array(ex["label_counts"].tolist(), dtype=np.float64),
                ex["category"].to_numpy(),
                majority=ex["original_label"].to_numpy(),
                steps=run.steps,
            )
        )
        names.append(name)
    if not parts:
        return None
    t = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    cols = {c: t[c].to_numpy() for c in t.columns}
    cols["progress"] = cols["step"] / steps[-1]
    cols["epoch"] = run.points["epoch"].to_numpy(np.float64)[cols["point"]]
    cols["run_id"] = np.full(len(t), run_id, dtype=object)
    cols["set"] = np.repeat(np.array(names, dtype=object), [len(p) for p in parts])
    return pd.DataFrame(cols)


def _calibration(
    run, run_id: str, sets: Sequence[str], options: Optional[Options] = None, resampler=None
) -> Optional[pd.DataFrame]:
    frames = []
    for name in sets:
        if name not in run.logprobs:
            continue
        final = run.logprobs[name][-1]
        if not np.isfinite(final).all():
            continue  # a diverged run has no meaningful final distribution
        ex = run.set_examples(name)
        o = options or Options()
        cal = calibration(
            final,
            ex["label"].to_numpy(),
            ex["category"].to_numpy(),
            o.ece_bins,
            n_boot=o.n_boot,
            seed=o.boot_seed,
            resampler=resampler,
        )
        frames.append(cal.assign(run_id=run_id, set=name))
    return pd.concat(frames, ignore_index=True) if frames else None


class _SummarizedRun:
    """A loaded `Run` whose per-set examples and losses are computed once while it is summarised
    (`summarize_run` and the `hf_entropy_callback.dynamics` functions it calls ask for them several
    times); everything else is the run's own. Each call returns a copy, as `Run`'s methods do."""

    def __init__(self, run):
        self._run = run
        self._examples: Dict[str, pd.DataFrame] = {}
        self._losses: Dict[str, np.ndarray] = {}

    def __getattr__(self, name):
        return getattr(self._run, name)

    def set_examples(self, name: str = "train") -> pd.DataFrame:
        if name not in self._examples:
            self._examples[name] = self._run.set_examples(name)
        return self._examples[name].copy()

    def losses(self, name: str = "train") -> np.ndarray:
        if name not in self._losses:
            self._losses[name] = self._run.losses(name)
        return self._losses[name].copy()


def summarize_run(
    run,
    run_id: str,
    train_set: str = "train",
    validation_set: Optional[str] = "validation",
    options: Optional[Options] = None,
    *,
    resampler: Optional[BootstrapResampler] = None,
):
    """Derive one run's row and tables (see the module docstring) from a loaded `Run`.

    Besides the two-sided Spearman p (``p_val``) the row has the one-sided ``p_greater``
    (alternative rho > 0, scipy) and, with ``options.n_boot`` > 0, ``rho_ci_low`` /
    ``rho_ci_high``: the 95% percentile bootstrap interval of rho over ``n_boot`` resamples of the
    examples (sorted by example id, so runs with the same tracked set and seed resample the same
    examples). The replicates come back in ``tables["boot"]``. A `resampler` (with ``options.n_boot``
    and ``options.boot_seed``) shared by the runs of a study draws those resamples once
    (`hf_entropy_callback.inference.BootstrapResampler`; the same numbers).

    Returns
    -------
    row : dict
        The run's entry of ``Study.runs`` (without the condition columns).
    tables : dict
        ``examples``, ``curves``, ``calibration`` DataFrames (``calibration`` may be None).
    """
    if train_set not in run.logprobs:
        raise RunFormatError(f"{run.path}: no tracked set {train_set!r} (it has {run.sets})")
    options = options or Options()
    run = run if isinstance(run, _SummarizedRun) else _SummarizedRun(run)
    if resampler is None:
        resampler = BootstrapResampler(n_boot=options.n_boot, seed=options.boot_seed, max_cells=0)
    ex = run.set_examples(train_set)
    losses = run.losses(train_set)
    steps = run.steps.astype(np.float64)
    finite = np.isfinite(losses)
    bad_points = np.flatnonzero(~finite.all(axis=1))
    dyn = example_dynamics(run, train_set, cartography_points_=options.cartography_points)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input; the NaN it returns is what we report
        corr = correlation_table(dyn["entropy"].to_numpy(), {"aulc": dyn["aulc"].to_numpy()}).set_index("method")
        from scipy import stats

        ok = np.isfinite(dyn["entropy"].to_numpy(float)) & np.isfinite(dyn["aulc"].to_numpy(float))
        p_greater = (
            float(stats.spearmanr(dyn["entropy"][ok], dyn["aulc"][ok], alternative="greater").pvalue)
            if ok.sum() >= 3
            else math.nan
        )
    by_id = dyn.sort_values("example_id", kind="stable")
    boot = resampler.spearman(by_id["entropy"].to_numpy(float), by_id["aulc"].to_numpy(float))
    rho_lo, rho_hi = percentile_interval(boot)
    num_labels = int(run.logprobs[train_set].shape[2])
    bound = loss_bound(num_labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # points where no loss is finite
        mean_loss = np.nanmean(np.where(finite, losses, np.nan), axis=1)
    above = np.flatnonzero(mean_loss > bound)
    complete = history_complete(run.config)
    reasons = []
    if len(bad_points):
        n_bad = int((~finite.all(axis=0)).sum())
        reasons.append(f"non-finite losses from step {int(steps[bad_points[0]])} on ({n_bad} of {len(ex)} examples)")
    if len(above):
        reasons.append(
            f"mean tracked loss {mean_loss[above].max():.4g} nats above the sanity bound 10 ln K = "
            f"{bound:.3f} from step {int(steps[above[0]])} on"
        )
    if not complete:
        reasons.append("incomplete history (resumed without the trajectory before the checkpoint)")
    val_acc = math.nan
    n_val = 0
    if validation_set and validation_set in run.logprobs:
        vex = run.set_examples(validation_set)
        n_val = len(vex)
        final = run.logprobs[validation_set][-1]
        if np.isfinite(final).all():
            val_acc = accuracy(final, vex["label"].to_numpy())
    row = {
        "path": run.path,
        "n_train": len(ex),
        "n_validation": n_val,
        "n_points": len(steps),
        "final_step": int(steps[-1]),
        "n": int(corr.loc["spearman", "n"]),
        "rho": corr.loc["spearman", "r"],
        "p_val": corr.loc["spearman", "p_val"],
        "p_greater": p_greater,
        "rho_ci_low": rho_lo,
        "rho_ci_high": rho_hi,
        "tracked_set": tracked_set_hash(ex["example_id"]),
        "n_noised": int(dyn["noised"].astype(bool).sum()),
        "n_label_changed": int(np.nansum(dyn["label_changed"].astype(float))) if run.original_label_known else None,
        "original_label_known": bool(run.original_label_known),
        "format_version": int(getattr(run, "format_version", 2)),
        "tau": corr.loc["kendall", "r"],
        "tau_p_val": corr.loc["kendall", "p_val"],
        "validation_accuracy": val_acc,
        "num_labels": num_labels,
        # None: no validation accuracy to judge by (no validation set, or non-finite final log-probs).
        "learned": None if not np.isfinite(val_acc) else not near_chance(val_acc, num_labels),
        "n_nonfinite": int((~finite.all(axis=0)).sum()),
        "first_nonfinite_step": int(steps[bad_points[0]]) if len(bad_points) else None,
        "max_mean_loss": float(np.nanmax(mean_loss)) if np.isfinite(mean_loss).any() else math.nan,
        "loss_bound": bound,
        "first_exploded_step": int(steps[above[0]]) if len(above) else None,
        "diverged": bool(len(bad_points) or len(above)),
        "history_complete": complete,
        "excluded": bool(reasons),
        "exclusion": "; ".join(reasons),
    }
    instrument_row, instrument_frames = run_instruments(run, run_id, train_set)
    row.update(instrument_row)
    tables = {
        **instrument_frames,
        "examples": dyn.assign(run_id=run_id),
        "curves": _curves(run_id, losses, steps, run.points["epoch"].to_numpy(np.float64), ex["category"].to_numpy()),
        "calibration": _calibration(
            run, run_id, [train_set] + ([validation_set] if validation_set else []), options, resampler
        ),
        "agreement": _agreement(run, run_id, [train_set] + ([validation_set] if validation_set else [])),
        "boot": boot,
    }
    return row, tables


#: Runs per worker process: `load_study` with ``workers=0`` starts no more workers than runs / this
#: (a worker's start, importing the analysis, costs about as much as loading 20 runs).
RUNS_PER_WORKER = 32
# A worker process's bootstrap resampler (set by `_start_worker`); always empty in the main process.
_WORKER: Dict[str, BootstrapResampler] = {}


def _start_worker(options: Options) -> None:
    _WORKER["resampler"] = BootstrapResampler(n_boot=options.n_boot, seed=options.boot_seed)


def _load_one(tdir: str, run_id: str, train_set, validation_set, options: Options, resampler=None):
    """Load and summarise one run: ``((row, tables, config, examples' entropy columns), None)`` or ``(None, error)``.

    Runs in the main process (with its `resampler`) or in a worker process (with the worker's own)."""
    try:
        run = load_run(tdir)
        row, tables = summarize_run(
            run, run_id, train_set, validation_set, options, resampler=resampler or _WORKER.get("resampler")
        )
    except (RunFormatError, ValueError, KeyError, OSError) as err:
        return None, err
    return (row, tables, run.run_config.to_dict(), run.examples[["example_id", "set", "entropy", "category"]]), None


def _add_run(run_id: str, loaded, rows, configs, boots, parts, entropy) -> None:
    """File one summarised run (`_load_one`) into `load_study`'s collections."""
    row, tables, config, examples = loaded
    desc = describe_run(config)
    rows.append({"run_id": run_id, **desc, **row})
    configs[run_id] = config
    boots[run_id] = tables.pop("boot")
    for key, frame in tables.items():
        if frame is not None:
            parts[key].append(frame)
    # The entropy histogram shows the union of the examples any run of the dataset tracked (each once).
    ds = desc["dataset"]
    frame = examples.assign(dataset=ds)
    entropy[ds] = (
        frame if ds not in entropy else pd.concat([entropy[ds], frame]).drop_duplicates(["dataset", "example_id"])
    )


def _worker_count(workers: Optional[int], n_runs: int) -> int:
    """Processes to load `n_runs` with: `workers` as asked (at most one per run), or with 0 / None one per
    CPU up to ``n_runs // RUNS_PER_WORKER``; 1 means this process alone."""
    if workers is None or workers < 1:
        workers = min(os.cpu_count() or 1, n_runs // RUNS_PER_WORKER)
    return max(1, min(int(workers), n_runs))


def _seed_text(seed) -> str:
    """A run's seed as the notes name it ("seed 42", or "no seed" when the run recorded none)."""
    return f"seed {seed:g}" if isinstance(seed, (int, float)) and not math.isnan(seed) else "no seed"


def load_study(
    paths: Sequence[str],
    train_set: str = "train",
    validation_set: Optional[str] = "validation",
    progress: Optional[bool] = None,
    skip_invalid: bool = False,
    options: Optional[Options] = None,
    main_ranks: Optional[Sequence[float]] = None,
    workers: Optional[int] = 1,
) -> Study:
    """Discover, load and summarise every run below `paths`.

    Parameters
    ----------
    paths : sequence of str
        Folders holding run directories (searched recursively).
    train_set : str
        The tracked set with per-example trajectories.
    validation_set : str or None
        The tracked set used for validation accuracy.
    progress : bool or None
        Show a tqdm progress bar (None: only on a terminal).
    skip_invalid : bool
        Skip (and note) runs that fail to load instead of raising.
    options : Options, optional
        Bootstrap count and seed, ECE bins, cartography points.
    main_ranks : sequence of float, optional
        LoRA ranks of the main matrix (`hf_entropy_callback.study.conditions.MAIN_RANKS` by default); sets the
        ``in_main_family`` column.
    workers : int or None
        Processes that load and summarise the runs: 1 (default) this process alone; 0 or None one per
        CPU, at most one per `RUNS_PER_WORKER` runs. Workers are started with "spawn", so a script that
        asks for them must guard its entry point (``if __name__ == "__main__":``). The numbers do not
        depend on it (each run is summarised on its own; see `summarize_run`).

    Conditions come from `hf_entropy_callback.study.conditions.assign_conditions`: a duplicate run (same
    condition and seed as an earlier run id) gets status "duplicate" and is excluded.

    Raises
    ------
    NoRunsFoundError
        When no run is found.
    RunFormatError
        When a run cannot be read (names its directory), unless `skip_invalid`.

    Examples
    --------
    >>> import tempfile
    >>> from hf_entropy_callback.synthetic_runs import write_synthetic_run
    >>> from hf_entropy_callback.study.loading import load_study
    >>> root = tempfile.mkdtemp()
    >>> for seed in (1, 2):
    ...     _ = write_synthetic_run(f"{root}/lora_s{seed}", {"seed": seed}, n_train=60, n_val=20,
    ...                             steps=[0, 50, 100])
    >>> study = load_study([root], progress=False, options=Options(n_boot=200))
    >>> study.runs[["run_id", "condition", "seed", "n", "status"]]
        run_id                       condition  seed   n status
    0  lora_s1  roberta-base · LoRA r=8 · snli   1.0  60     ok
    1  lora_s2  roberta-base · LoRA r=8 · snli   2.0  60     ok
    >>> bool((study.runs.rho_ci_low <= study.runs.rho).all() and (study.runs.rho <= study.runs.rho_ci_high).all())
    True
    >>> len(study.examples), sorted(study.curves["category"].unique())
    (120, ['all', 'ambiguous', 'clean', 'contested'])
    """
    from tqdm.auto import tqdm

    dirs, notes = discover_runs(paths)
    ids = run_ids(dirs)
    options = options or Options()
    # One resampler for every run: the runs of a tracked set share their bootstrap resamples.
    resampler = BootstrapResampler(n_boot=options.n_boot, seed=options.boot_seed)
    rows, configs = [], {}
    parts = {k: [] for k in ("examples", "curves", "calibration", "agreement", "instruments", "instrument_examples")}
    boots: Dict[str, np.ndarray] = {}
    entropy: Dict[str, pd.DataFrame] = {}
    disable = None if progress is None else not progress
    jobs = list(zip(dirs, ids))
    n_workers = _worker_count(workers, len(jobs))
    pool = None
    if n_workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(
            n_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(options,)
        )
        results = pool.map(
            _load_one,
            dirs,
            ids,
            *([x] * len(jobs) for x in (train_set, validation_set, options)),
            chunksize=max(1, min(8, len(jobs) // (4 * n_workers))),
        )
    else:
        results = (_load_one(tdir, run_id, train_set, validation_set, options, resampler) for tdir, run_id in jobs)
    try:
        for (tdir, run_id), (loaded, err) in tqdm(
            zip(jobs, results), total=len(jobs), desc="loading runs", unit="run", disable=disable
        ):
            if err is not None:
                if not skip_invalid:
                    if isinstance(err, RunFormatError):
                        raise err
                    raise RunFormatError(f"{tdir}: cannot be analysed: {err}") from err
                text = str(err)
                text = text[len(tdir) + 2 :] if text.startswith(f"{tdir}: ") else text
                notes.append(f"{tdir}: skipped, {text}")
                continue
            _add_run(run_id, loaded, rows, configs, boots, parts, entropy)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if not rows:
        from .conditions import NoRunsFoundError

        raise NoRunsFoundError(f"no loadable runs below {', '.join(map(str, paths))}")
    runs = pd.DataFrame(rows)
    runs, cond_notes = assign_conditions(runs)
    notes += cond_notes
    dup = runs["duplicate_of"].notna()
    runs["excluded"] = runs["excluded"] | dup
    runs["exclusion"] = [
        ("; ".join(x for x in (e, f"duplicate of {d} (same condition and seed)") if x) if pd.notna(d) else e)
        for e, d in zip(runs["exclusion"], runs["duplicate_of"])
    ]
    runs["status"] = np.select(
        [runs["diverged"], ~runs["history_complete"], dup], ["diverged", "incomplete history", "duplicate"], "ok"
    )
    runs["in_main_family"] = is_main_matrix(runs, main_ranks) if main_ranks is not None else is_main_matrix(runs)
    unknown = runs[~runs["original_label_known"]]
    for r in unknown.itertuples():
        notes.append(
            f"{r.run_id}: run format version {r.format_version} with {r.n_noised} noised examples: their "
            "label before the noise was not stored, so AULC against the original label is unknown for them"
        )
    val_bad = runs[~runs["excluded"] & (runs["n_validation"] > 0) & runs["validation_accuracy"].isna()]
    for r in val_bad.itertuples():
        notes.append(f"{r.run_id}: non-finite validation log-probabilities at the final point; no validation accuracy")
    for r in runs[~runs["excluded"] & runs["learned"].eq(False)].itertuples():
        notes.append(
            f"{r.run_id} ({r.condition}, {_seed_text(r.seed)}): NOT LEARNED: validation accuracy {r.validation_accuracy:.3f} is less "
            f"than {LEARNED_MARGIN * 100:g} points above chance ({1 / r.num_labels:.3f} with {r.num_labels} classes); "
            "kept in the aggregates like every run, but its rho and Delta L describe a model that did not learn the task"
        )
    for r in runs[runs["excluded"] & ~dup].itertuples():
        notes.append(
            f"{r.run_id} ({r.condition}, {_seed_text(r.seed)}): {r.status}: {r.exclusion}; excluded from aggregates"
        )

    keep = set(runs.loc[~runs["excluded"], "run_id"])

    def cat(key):
        frames = [f for f in parts[key] if len(f) and f["run_id"].iloc[0] in keep]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    return Study(
        runs=runs,
        examples=cat("examples"),
        curves=cat("curves"),
        calibration=cat("calibration"),
        entropy=pd.concat(list(entropy.values()), ignore_index=True),
        notes=notes,
        configs=configs,
        agreement=cat("agreement"),
        boot=boots,
        options=options,
        instruments=cat("instruments"),
        instrument_examples=cat("instrument_examples"),
    )
