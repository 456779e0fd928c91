"""Synthetic run directories with known structure, for tests and benchmarks.

A synthetic run looks exactly like one written by the training script (it is written with
`hf_entropy_callback.runs.write_run`), but its loss trajectories follow a simple model whose
dependence on annotation entropy is set by the caller. For example ``i`` at training progress
``x`` in [0, 1]::

    target_i = softplus(final_loss + entropy_slope * H_i + length_slope * z(len_i)
                        + noised_penalty * noised_i + noise_sd * eps_i)
    loss_i(x) = L0_i + (target_i - L0_i) * (1 - exp(-x / tau)) / (1 - exp(-1 / tau)) + jitter

with ``L0_i`` close to ``ln K`` (an untrained head is near uniform). A positive `entropy_slope`
makes entropy and AULC correlate positively; when ``final_loss + entropy_slope * H`` exceeds
``ln K`` the high-entropy examples' loss rises over training ("un-learning", as the study claims
for LoRA), otherwise every group's loss falls (as for full fine-tuning). The gold label gets
probability ``exp(-loss)``; the rest of the mass is split between the other classes.

Examples depend only on the dataset name and `example_seed`, so runs of the same dataset share
their tracked examples (as real runs share the ChaosNLI split); trajectories depend on the run's
seed.

Examples
--------
>>> import tempfile
>>> from hf_entropy_callback.runs import load_run
>>> from hf_entropy_callback.synthetic_runs import write_synthetic_run
>>> root = tempfile.mkdtemp()
>>> path = write_synthetic_run(root + "/run", {"method": "lora", "rank": 8, "seed": 1},
...                            n_train=30, n_val=10, steps=[0, 10, 20])
>>> run = load_run(path)
>>> run.logprobs["train"].shape
(3, 30, 3)
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from hf_entropy_callback.entropy import annotation_entropy, entropy_category
from hf_entropy_callback.runs import TRACKING_DIRNAME, write_run
from hf_entropy_callback.schedule import tracking_schedule

from .study.conditions import is_decoder

#: Shares of clean / ambiguous / contested examples in the two ChaosNLI subsets (from the real files).
CATEGORY_SHARES = {"snli": (0.250, 0.506, 0.244), "mnli": (0.049, 0.326, 0.625)}
#: The study's sizes: ChaosNLI-SNLI's 1,514 examples split 80/20, plus 20,000 bulk training examples.
STUDY_TRACKED_TRAIN = 1211
STUDY_TRACKED_VALIDATION = 303
STUDY_TRAIN_SIZE = 21211


def tracking_points(
    num_train_examples: int = STUDY_TRAIN_SIZE,
    *,
    batch_size: int = 32,
    num_epochs: float = 5,
    track_every: int = 100,
) -> pd.DataFrame:
    """The tracking schedule of a run: step 0, every `track_every` steps, every epoch end, the final step.

    Parameters
    ----------
    num_train_examples : int
        Size of the training set (tracked and bulk examples together).
    batch_size : int
        Examples per optimizer step (the last batch of an epoch may be smaller).
    num_epochs : float
        Number of epochs; may be fractional, as ``num_train_epochs`` in the Trainer (the last,
        partial epoch ends at the final step).
    track_every : int
        Interval, in optimizer steps, of the regular tracking points.

    Returns
    -------
    points : :py:class:`pandas.DataFrame`
        One row per point with ``point``, ``step``, ``epoch`` and ``reason`` (the reasons of
        coinciding points joined with "+"), as in the run directory format.

    Examples
    --------
    >>> pts = tracking_points(21211, batch_size=32, num_epochs=5, track_every=100)
    >>> len(pts), int(pts.step.iloc[-1]), pts.reason.iloc[-1]
    (39, 3315, 'epoch_end+final')
    >>> pts.step.iloc[:9].tolist()
    [0, 100, 200, 300, 400, 500, 600, 663, 700]
    >>> last = tracking_points(21211, batch_size=32, num_epochs=2.5).iloc[-1]  # ceil(2.5 * 663) steps
    >>> int(last.step), round(float(last.epoch), 4), last.reason
    (1658, 2.5008, 'epoch_end+final')
    """
    if min(num_train_examples, batch_size, track_every) < 1 or not num_epochs > 0:
        raise ValueError(
            "tracking_points: num_train_examples, batch_size and track_every must be positive "
            f"integers and num_epochs a positive number, got {num_train_examples}, {batch_size}, "
            f"{track_every} and {num_epochs}"
        )
    # The schedule is the callback's own, so synthetic runs have the points a real run records.
    schedule = tracking_schedule(num_train_examples, batch_size, num_epochs, track_every=track_every)
    per_epoch = math.ceil(num_train_examples / batch_size)
    steps = np.asarray([s for s, _ in schedule], dtype=np.int64)
    return pd.DataFrame(
        {
            "point": np.arange(len(steps)),
            "step": steps,
            "epoch": steps.astype(np.float64) / per_epoch,
            "reason": [r for _, r in schedule],
        }
    )


@dataclass(frozen=True)
class Dynamics:
    """Parameters of the synthetic loss model (see the module docstring); losses in nats.

    Attributes
    ----------
    final_loss : float
        Final loss of an entropy-0 example before the example-level noise.
    entropy_slope : float
        Nats of final loss per nat of annotation entropy.
    length_slope : float
        Nats of final loss per standard deviation of token length.
    noise_sd : float
        Standard deviation of the example-level noise of the final loss.
    noised_penalty : float
        Extra final loss of an example whose label was replaced by label noise.
    tau : float
        Time constant of the approach to the final loss, as a share of training.
    jitter_sd : float
        Standard deviation of the point-to-point noise (zero at the first point).
    diverge_at : float or None
        Training progress from which every log-probability is NaN (a diverged run).
    """

    final_loss: float = 0.2
    entropy_slope: float = 1.2
    length_slope: float = 0.0
    noise_sd: float = 0.6
    noised_penalty: float = 1.0
    tau: float = 0.25
    jitter_sd: float = 0.05
    diverge_at: Optional[float] = None


def dynamics_for(config: Mapping[str, Any]) -> Dynamics:
    """Study-like dynamics for a run configuration, following the paper's claims.

    LoRA: entropy slope growing with log2(rank), stronger for decoders, so contested examples'
    loss rises; IA3 and full fine-tuning: a small slope and a low final loss, so every group's
    loss falls; soft-label training halves the slope; label noise adds nothing here (the noised
    examples get `Dynamics.noised_penalty`).

    Examples
    --------
    >>> dynamics_for({"method": "lora", "rank": 8}).entropy_slope
    1.2
    >>> dynamics_for({"method": "full"}).entropy_slope
    0.25
    """
    method = str(config.get("method") or "lora").lower()
    if method == "lora":
        rank = config.get("rank") or 8
        slope = 1.2 + 0.25 * math.log2(float(rank) / 8.0)
        if is_decoder(config):
            slope *= 1.25
        dyn = Dynamics(final_loss=0.2, entropy_slope=slope, length_slope=0.05, noise_sd=0.9)
    elif method == "ia3":
        dyn = Dynamics(final_loss=0.3, entropy_slope=0.35, length_slope=0.05)
    else:
        dyn = Dynamics(final_loss=0.05, entropy_slope=0.25, length_slope=0.05, noise_sd=0.3)
    if config.get("loss") == "soft_kl":
        dyn = replace(dyn, entropy_slope=dyn.entropy_slope * 0.5)
    return dyn


def make_examples(
    dataset: str = "snli",
    *,
    n_train: int = STUDY_TRACKED_TRAIN,
    n_val: int = STUDY_TRACKED_VALIDATION,
    num_classes: int = 3,
    example_seed: int = 0,
    shares: Optional[Sequence[float]] = None,
) -> pd.DataFrame:
    """Tracked examples with 100-annotator label counts, in the run directory's examples format.

    Label counts are drawn from Dirichlet-multinomial distributions and kept so that the shares
    of clean / ambiguous / contested examples match `shares` (default: the real ChaosNLI subset's
    shares for "snli" and "mnli", equal shares otherwise). The gold label is the majority vote.

    Returns
    -------
    examples : :py:class:`pandas.DataFrame`
        ``example_id, set, index, entropy, category, label, label_counts, token_length, noised,
        original_label``; the "train" rows first, then "validation".
    """
    seed = [example_seed, sum(dataset.encode())]
    rng = np.random.default_rng(seed)
    shares = np.asarray(shares if shares is not None else CATEGORY_SHARES.get(dataset, (1 / 3, 1 / 3, 1 / 3)), float)
    n = n_train + n_val
    # Draw a broad pool of annotator distributions, then take each category's quota from it.
    pool = 30 * n + 300
    # Dirichlet draws with a log-uniform concentration per row (via gammas, vectorised) span
    # near one-hot to near uniform annotator distributions.
    alpha = np.exp(rng.uniform(np.log(0.05), np.log(8.0), size=(pool, 1))) * np.ones((1, num_classes))
    gammas = rng.gamma(alpha) + 1e-12
    counts = rng.multinomial(100, gammas / gammas.sum(axis=1, keepdims=True))
    h = annotation_entropy(counts)
    cats = entropy_category(h)
    quota = np.floor(shares / shares.sum() * n).astype(int)
    quota[np.argmax(shares)] += n - quota.sum()
    chosen = []
    for k, cat in enumerate(("clean", "ambiguous", "contested")):
        idx = np.flatnonzero(cats == cat)
        if len(idx) < quota[k]:
            raise RuntimeError(f"make_examples: could not draw {quota[k]} {cat} examples; lower n or change shares")
        chosen.append(idx[: quota[k]])
    chosen = rng.permutation(np.concatenate(chosen))
    counts, h, cats = counts[chosen], h[chosen], cats[chosen]
    sets = np.array(["train"] * n_train + ["validation"] * n_val)
    index = np.concatenate([np.arange(n_train), np.arange(n_val)])
    return pd.DataFrame(
        {
            "example_id": [f"chaosnli:{dataset}-{i}" for i in range(n)],
            "set": sets,
            "index": index.astype(np.int64),
            "entropy": h.astype(np.float64),
            "category": cats.astype(str),
            "label": counts.argmax(axis=1).astype(np.int64),
            "label_counts": [list(map(int, c)) for c in counts],
            "token_length": np.clip(np.round(rng.lognormal(np.log(28), 0.35, size=n)), 6, 200).astype(np.int64),
            "noised": np.zeros(n, dtype=bool),
            "original_label": counts.argmax(axis=1).astype(np.int64),
        }
    )


def apply_variant(
    examples: pd.DataFrame,
    *,
    composition: str = "all",
    label_noise: float = 0.0,
    seed: int = 42,
    exclude_original: bool = False,
):
    """Restrict the train examples to a composition and inject label noise, with the library's own data code.

    Uses `hf_entropy_callback.data.select_composition` and `inject_label_noise` (with
    `exclude_original`) so the synthetic variants are chosen exactly as the training script chooses
    them; ``original_label`` keeps the label before the noise. Validation rows are unchanged.
    """
    if composition == "all" and not label_noise:
        return examples
    import datasets

    from hf_entropy_callback.data import inject_label_noise, select_composition

    train = examples[examples["set"] == "train"].reset_index(drop=True)
    drop = [c for c in ("noised", "original_label") if c in train.columns]
    ds = datasets.Dataset.from_pandas(train.drop(columns=drop), preserve_index=False)
    ds = select_composition(ds, composition, seed=seed)
    if label_noise:
        ds = inject_label_noise(ds, label_noise, seed=seed, exclude_original=exclude_original)
    new = ds.to_pandas()
    if "noised" not in new.columns:
        new["noised"] = False
    if "original_label" not in new.columns:
        new["original_label"] = new["label"]
    new["index"] = np.arange(len(new), dtype=np.int64)
    new["label_counts"] = [list(map(int, c)) for c in new["label_counts"]]
    new = new[list(examples.columns)]
    return pd.concat([new, examples[examples["set"] != "train"]], ignore_index=True)


def synthetic_logprobs(
    examples: pd.DataFrame,
    progress: Sequence[float],
    dynamics: Dynamics,
    rng: np.random.Generator,
    *,
    num_classes: int = 3,
) -> np.ndarray:
    """Log-probabilities, shape (points, examples, classes), following the module's loss model."""
    x = np.asarray(progress, dtype=np.float64)[:, None]
    n = len(examples)
    h = examples["entropy"].to_numpy(np.float64)
    length = examples["token_length"].to_numpy(np.float64)
    z_len = (length - length.mean()) / (length.std() or 1.0)
    noised = examples["noised"].to_numpy(bool)
    raw = (
        dynamics.final_loss
        + dynamics.entropy_slope * h
        + dynamics.length_slope * z_len
        + dynamics.noised_penalty * noised
        + dynamics.noise_sd * rng.standard_normal(n)
    )
    # A smooth floor (softplus with sharpness 4) keeps targets positive without a pile-up at a clip value.
    target = np.logaddexp(0.0, 4.0 * raw) / 4.0
    start = math.log(num_classes) + 0.05 * rng.standard_normal(n)
    shape = (1.0 - np.exp(-x / dynamics.tau)) / (1.0 - math.exp(-1.0 / dynamics.tau))
    loss = start[None, :] + (target - start)[None, :] * shape
    loss = loss + dynamics.jitter_sd * rng.standard_normal(loss.shape) * np.sqrt(x)
    loss = np.clip(loss, 1e-4, 30.0)
    # Gold class gets exp(-loss); the others share the rest in a fixed, example-specific split.
    p_gold = np.exp(-loss)
    split = rng.dirichlet(np.full(num_classes - 1, 2.0), size=n)
    labels = examples["label"].to_numpy(np.int64)
    others = np.array([[k for k in range(num_classes) if k != y] for y in range(num_classes)])[labels]
    rows = np.arange(n)
    probs = np.empty(loss.shape + (num_classes,))
    probs[:, rows, labels] = p_gold
    probs[:, rows[:, None], others] = (1.0 - p_gold)[:, :, None] * split[None, :, :]
    logp = np.log(np.maximum(probs, 1e-30))
    if dynamics.diverge_at is not None:
        logp[x[:, 0] >= dynamics.diverge_at] = np.nan
    return logp.astype(np.float32)


DEFAULT_CONFIG: Dict[str, Any] = {
    "model_name_or_path": "roberta-base",
    "model_type": "roberta",
    "architecture": "encoder",
    "method": "lora",
    "rank": 8,
    "lora_alpha": 16,
    "learning_rate": 2e-4,
    "seed": 42,
    "num_train_epochs": 5,
    "per_device_train_batch_size": 32,
    "track_every": 100,
    "dataset": "snli",
    "composition": "all",
    "label_noise": 0.0,
    "loss": "ce",
}


def write_synthetic_run(
    path: str,
    config: Optional[Mapping[str, Any]] = None,
    *,
    n_train: int = STUDY_TRACKED_TRAIN,
    n_val: int = STUDY_TRACKED_VALIDATION,
    steps: Optional[Sequence[int]] = None,
    dynamics: Optional[Dynamics] = None,
    example_seed: int = 0,
    num_classes: int = 3,
) -> str:
    """Write one synthetic run into ``<path>/entropy_tracking`` and return that directory.

    Parameters
    ----------
    path : str
        The run's output directory.
    config : mapping, optional
        Run configuration; missing keys come from `DEFAULT_CONFIG`. ``seed`` drives the
        trajectories, ``dataset`` the examples, ``composition`` and ``label_noise`` the tracked
        train set (via the library's data code).
    n_train, n_val : int
        Tracked train and validation examples before the composition is applied.
    steps : sequence of int, optional
        Tracking steps; default: the study's schedule from `tracking_points`, derived from the
        config's epochs, batch size and ``track_every``.
    dynamics : Dynamics, optional
        The loss model; default `dynamics_for(config)`.
    example_seed : int
        Seed of the examples (shared by every run of a dataset).
    num_classes : int
        Number of classes.

    Returns
    -------
    path : str
        The tracking directory written.
    """
    cfg = {**DEFAULT_CONFIG, **dict(config or {})}
    cfg.setdefault("run_name", os.path.basename(os.path.normpath(path)))
    seed = int(cfg.get("seed") or 0)
    if steps is None:
        points = tracking_points(
            STUDY_TRAIN_SIZE,
            batch_size=int(cfg.get("per_device_train_batch_size") or 32),
            # float, not int: the Trainer accepts a fractional number of epochs (2.5 -> 2.5 epochs, not 2).
            num_epochs=float(cfg.get("num_train_epochs") or 5),
            track_every=int(cfg.get("track_every") or 100),
        )
    else:
        steps = np.asarray(steps, dtype=np.int64)
        points = pd.DataFrame(
            {
                "point": np.arange(len(steps)),
                "step": steps,
                "epoch": steps / max(int(steps[-1]), 1) * float(cfg.get("num_train_epochs") or 1),
                "reason": ["step0" if s == 0 else "interval" for s in steps[:-1]] + ["final"],
            }
        )
    examples = make_examples(
        str(cfg.get("dataset") or "snli"),
        n_train=n_train,
        n_val=n_val,
        num_classes=num_classes,
        example_seed=example_seed,
    )
    examples = apply_variant(
        examples,
        composition=cfg.get("composition") or "all",
        label_noise=float(cfg.get("label_noise") or 0.0),
        seed=seed,
        exclude_original=bool(cfg.get("label_noise_exclude_original", False)),
    )
    dyn = dynamics or dynamics_for(cfg)
    progress = points["step"].to_numpy(np.float64) / points["step"].iloc[-1]
    # Trajectories differ by model, method and rank but not by variant: a noisy run and its
    # noise-free twin of the same seed share their random draws, as paired runs should.
    ident = f"{cfg.get('model_name_or_path')}|{cfg.get('method')}|{cfg.get('rank')}".encode()
    rng = np.random.default_rng([seed, example_seed, zlib.crc32(ident)])
    logprobs = {}
    for name in ("train", "validation"):
        ex = examples[examples["set"] == name].sort_values("index")
        if len(ex):
            logprobs[name] = synthetic_logprobs(ex, progress, dyn, rng, num_classes=num_classes)
    cfg.setdefault("synthetic_dynamics", asdict(dyn))
    return write_run(os.path.join(path, TRACKING_DIRNAME), cfg, examples, points, logprobs)


def study_configs(replicas: int = 1) -> List[Dict[str, Any]]:
    """A 54-run matrix shaped like the study's, for the benchmark and end-to-end checks.

    RoBERTa and BERT on SNLI and MNLI with LoRA r=8, r=64 and full fine-tuning (3 seeds: 36 runs);
    Qwen2.5-1.5B on SNLI with LoRA r=8, r=64 (6); IA3 on RoBERTa/SNLI (3); RoBERTa/SNLI at
    r = 16 and 32 (seed 42: 2), which with r = 8 and 64 makes a four-rank sweep; label noise
    30% / 60% (seeds 42, 123: 4); soft-label training (seed 42: 1); and the low / high
    compositions (seed 42: 2).

    Parameters
    ----------
    replicas : int
        Copies of the 54-run matrix, for a study ``replicas`` times the size: copy ``j`` (0-based)
        uses seed ``s + 1000 * j`` wherever the matrix uses seed ``s``, so every condition keeps
        its shape (same conditions, ``replicas`` times the seeds; noisy and soft-label runs keep
        their noise-free twin of the same seed) and run names stay unique.

    Examples
    --------
    >>> len(study_configs()), len(study_configs(10))
    (54, 540)
    >>> sorted({c["seed"] for c in study_configs(2)})
    [42, 123, 456, 1042, 1123, 1456]
    """
    if replicas < 1:
        raise ValueError(f"study_configs: replicas must be at least 1, got {replicas}")
    if replicas > 1:
        return [c for j in range(replicas) for c in _study_matrix(tuple(s + 1000 * j for s in (42, 123, 456)))]
    return _study_matrix((42, 123, 456))


def _study_matrix(seeds) -> List[Dict[str, Any]]:
    """`study_configs`'s matrix with the three main seeds `seeds` (the single-seed parts use the first)."""
    models = {
        "roberta-base": ("roberta", "encoder"),
        "bert-base-uncased": ("bert", "encoder"),
        "Qwen/Qwen2.5-1.5B": ("qwen2", "decoder"),
    }

    def cfg(model, method="lora", rank=8, dataset="snli", seed=42, **extra):
        mtype, arch = models[model]
        c = {
            "model_name_or_path": model,
            "model_type": mtype,
            "architecture": arch,
            "method": method,
            "rank": rank if method == "lora" else None,
            "lora_alpha": 2 * rank if method == "lora" else None,
            "dataset": dataset,
            "seed": seed,
            **extra,
        }
        variant = "-".join(f"{k}{v}" for k, v in extra.items())
        rank_part = f"r{rank}" if method == "lora" else method
        c["run_name"] = "_".join(
            p for p in (model.split("/")[-1], dataset, method, rank_part, variant, f"s{seed}") if p
        )
        return c

    out = []
    for model in ("roberta-base", "bert-base-uncased"):
        for dataset in ("snli", "mnli"):
            for method, rank in (("lora", 8), ("lora", 64), ("full", 0)):
                out += [cfg(model, method, rank, dataset, s) for s in seeds]
    out += [cfg("Qwen/Qwen2.5-1.5B", "lora", r, "snli", s) for r in (8, 64) for s in seeds]
    out += [cfg("roberta-base", "ia3", 0, "snli", s) for s in seeds]
    out += [cfg("roberta-base", "lora", r, "snli", seeds[0]) for r in (16, 32)]
    out += [cfg("roberta-base", "lora", 8, "snli", s, label_noise=q) for q in (0.3, 0.6) for s in seeds[:2]]
    out += [cfg("roberta-base", "lora", 8, "snli", seeds[0], loss="soft_kl")]
    out += [cfg("roberta-base", "lora", 8, "snli", seeds[0], composition=c) for c in ("low", "high")]
    return out


def write_runs(root: str, configs: Iterable[Mapping[str, Any]], **kwargs) -> List[str]:
    """Write one synthetic run per configuration under `root` (folder = the config's ``run_name``)."""
    paths = []
    for i, cfg in enumerate(configs):
        name = cfg.get("run_name") or f"run{i:03d}"
        paths.append(write_synthetic_run(os.path.join(root, name), cfg, **kwargs))
    return paths
