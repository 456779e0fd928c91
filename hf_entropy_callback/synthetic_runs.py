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

With ``instruments=`` a run also carries the tracker's opt-in instruments (issue 12) in the run
format (``instruments.parquet``, ``instrument_examples.parquet``, config key ``"instruments"``), with
the structure the study describes: see `synthetic_instruments`. They are drawn from a random
stream of their own, so a run's log-probabilities are the same with or without them.

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
import tempfile
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from hf_entropy_callback.entropy import CATEGORIES, annotation_entropy, entropy_category
from hf_entropy_callback.runs import (
    INSTRUMENT_COLUMNS,
    INSTRUMENT_EXAMPLE_COLUMNS,
    TRACKING_DIRNAME,
    apply_umask,
    write_run,
)
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


#: The tracker's instruments (issue 12) and their default settings (the run config's ``"instruments"``).
INSTRUMENT_NAMES = ("grad_alignment", "grad_norms", "drift")
DEFAULT_INSTRUMENTS: Dict[str, Any] = {
    "names": list(INSTRUMENT_NAMES),
    "sample_per_category": 32,
    "seed": 0,
    "loss": "class_weighted_ce",
    "attention": "eager",
}
#: The pairs of entropy categories whose aggregated gradients the alignment instrument compares.
ALIGNMENT_PAIRS = ("clean~contested", "clean~ambiguous", "ambiguous~contested")


def instrument_settings(value: Union[bool, Mapping[str, Any], None]) -> Optional[Dict[str, Any]]:
    """The ``"instruments"`` entry of a run config: None (no instruments), True (`DEFAULT_INSTRUMENTS`) or
    a mapping whose missing keys come from `DEFAULT_INSTRUMENTS`.

    >>> instrument_settings({"names": ["drift"], "sample_per_category": None})["names"]
    ['drift']
    >>> instrument_settings(None) is None, instrument_settings(True)["loss"]
    (True, 'class_weighted_ce')
    """
    if value is None or value is False:
        return None
    settings = {**DEFAULT_INSTRUMENTS, **({} if value is True else dict(value))}
    unknown = sorted(set(settings["names"]) - set(INSTRUMENT_NAMES))
    if unknown:
        raise ValueError(f"instrument_settings: unknown instruments {unknown}; known: {list(INSTRUMENT_NAMES)}")
    settings["names"] = [n for n in INSTRUMENT_NAMES if n in settings["names"]]
    return settings


def _modules(config: Mapping[str, Any], num_layers: int) -> List[str]:
    """Names of the modules whose weights a run updates (their update norms): the LoRA targets or every
    linear layer of full fine-tuning, per layer, plus the classification head."""
    method = str(config.get("method") or "lora").lower()
    decoder = is_decoder(config)
    if method == "full":
        per_layer = (
            (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            )
            if decoder
            else (
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            )
        )
    elif method == "ia3":
        per_layer = ("attention.self.key", "attention.self.value", "output.dense")
    else:
        per_layer = (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
            if decoder
            else ("attention.self.query", "attention.self.value")
        )
    prefix = "model.layers" if decoder else "encoder.layer"
    head = "score" if decoder else "classifier"
    return [f"{prefix}.{layer}.{m}" for layer in range(num_layers) for m in per_layer] + [head]


def synthetic_instruments(
    examples: pd.DataFrame,
    train_logprobs: np.ndarray,
    points: pd.DataFrame,
    config: Mapping[str, Any],
    settings: Mapping[str, Any],
    rng: np.random.Generator,
    *,
    num_layers: Optional[int] = None,
) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Instrument values of a synthetic run at every tracking point, in the run format.

    Structure (x = training progress, step / last step; ``s`` = the run's `dynamics_for` entropy slope,
    larger for LoRA, higher ranks and decoders; ``f`` = sqrt(learning rate / 2e-4)):

    - grad_norms: per example of a sample of the train set (`settings` ``sample_per_category`` per
      category, drawn with its ``seed``; None: every example), the norm
      ``c_method * ||p - onehot(label)||_2 * exp(0.15 eps)``, so it follows the example's loss:
      contested examples, whose loss stays high (LoRA: rises), have larger norms than clean ones.
      ``grad_norm_mean`` / ``grad_norm_median`` per category are the mean / median of that sample.
    - grad_alignment: cosine of the aggregated gradients, clean~contested falling from about 0.55 by
      ``0.35 s`` over training (LoRA below zero at high ranks, full fine-tuning barely), the other pairs
      less; ``group_grad_norm`` per category: a share of the category's mean per-example norm.
    - drift: per layer, attention entropy (nats, lower in upper layers, falling a little over training)
      and linear CKA against the initial model (1 at step 0, falling most in upper layers); per module
      the weight update norm growing as ``x ** 0.6``, full fine-tuning far above LoRA, all scaled by
      ``f``; ``update_norm_total`` is the root of the modules' summed squares.

    Returns
    -------
    instruments, instrument_examples : DataFrame
        With `hf_entropy_callback.runs.INSTRUMENT_COLUMNS` and `INSTRUMENT_EXAMPLE_COLUMNS`.
    """
    names = list(settings["names"])
    steps = points["step"].to_numpy(np.int64)
    x = steps.astype(np.float64) / max(int(steps[-1]), 1)
    n_pts = len(steps)
    method = str(config.get("method") or "lora").lower()
    slope = dynamics_for(config).entropy_slope
    f_lr = math.sqrt(float(config.get("learning_rate") or 2e-4) / 2e-4)
    rank = float(config.get("rank") or 8)
    rows: List[pd.DataFrame] = []

    def add(instrument, quantity, values, group="", component=""):
        rows.append(
            pd.DataFrame(
                {
                    "point": np.arange(n_pts, dtype=np.int64),
                    "step": steps,
                    "instrument": instrument,
                    "quantity": quantity,
                    "group": group,
                    "component": component,
                    "value": np.asarray(values, dtype=np.float64),
                }
            )
        )

    train = examples[examples["set"] == "train"].sort_values("index").reset_index(drop=True)
    per_example = pd.DataFrame(
        {c: pd.Series(dtype="int64" if c in ("point", "step", "index") else object) for c in INSTRUMENT_EXAMPLE_COLUMNS}
    ).astype({"value": "float64"})
    cat_norm = {}
    if "grad_norms" in names or "grad_alignment" in names:
        sample_rng = np.random.default_rng(
            [int(settings.get("seed") or 0), zlib.crc32(str(config.get("dataset")).encode())]
        )
        k = settings.get("sample_per_category")
        chosen = []
        for cat in CATEGORIES:
            idx = np.flatnonzero(train["category"].to_numpy() == cat)
            if k is not None and len(idx) > int(k):
                idx = np.sort(sample_rng.choice(idx, int(k), replace=False))
            chosen.append(idx)
        chosen = np.sort(np.concatenate(chosen))
        probs = np.exp(np.asarray(train_logprobs, dtype=np.float64)[:, chosen, :])
        onehot = np.eye(probs.shape[2])[train["label"].to_numpy(np.int64)[chosen]]
        scale = {"full": 4.0, "ia3": 0.3}.get(method, 0.8 * math.sqrt(rank / 8.0))
        norms = (
            scale * np.linalg.norm(probs - onehot[None], axis=2) * np.exp(0.15 * rng.standard_normal(probs.shape[:2]))
        )
        cats = train["category"].to_numpy()[chosen]
        for cat in CATEGORIES:
            cat_norm[cat] = norms[:, cats == cat]
        if "grad_norms" in names:
            for cat in CATEGORIES:
                if cat_norm[cat].shape[1]:
                    add("grad_norms", "grad_norm_mean", cat_norm[cat].mean(axis=1), group=cat)
                    add("grad_norms", "grad_norm_median", np.median(cat_norm[cat], axis=1), group=cat)
            per_example = pd.DataFrame(
                {
                    "point": np.repeat(np.arange(n_pts, dtype=np.int64), len(chosen)),
                    "step": np.repeat(steps, len(chosen)),
                    "instrument": "grad_norms",
                    "quantity": "grad_norm",
                    "set": "train",
                    "index": np.tile(train["index"].to_numpy(np.int64)[chosen], n_pts),
                    "example_id": np.tile(train["example_id"].to_numpy()[chosen], n_pts),
                    "value": norms.ravel(),
                }
            )
    if "grad_alignment" in names:
        shape = (1.0 - np.exp(-x / 0.3)) / (1.0 - math.exp(-1.0 / 0.3))
        drop = 0.35 * slope
        start = {"clean~contested": 0.55, "clean~ambiguous": 0.8, "ambiguous~contested": 0.7}
        share = {"clean~contested": 1.0, "clean~ambiguous": 0.4, "ambiguous~contested": 0.6}
        offset = 0.02 * rng.standard_normal()
        for pair in ALIGNMENT_PAIRS:
            cos = start[pair] + offset - share[pair] * drop * shape + 0.02 * rng.standard_normal(n_pts)
            add("grad_alignment", "cosine", np.clip(cos, -1.0, 1.0), group=pair)
        for cat in CATEGORIES:
            if cat_norm.get(cat) is not None and cat_norm[cat].shape[1]:
                kept = {"clean": 0.6, "ambiguous": 0.45, "contested": 0.3}[cat]
                add("grad_alignment", "group_grad_norm", kept * cat_norm[cat].mean(axis=1), group=cat)
    if "drift" in names:
        layers = int(num_layers or config.get("num_hidden_layers") or (28 if is_decoder(config) else 12))
        depth = np.arange(layers) / max(layers - 1, 1)
        mfac = {"full": 1.0, "ia3": 0.15}.get(method, 0.3 * math.sqrt(rank / 8.0))
        shape = (1.0 - np.exp(-x / 0.4)) / (1.0 - math.exp(-1.0 / 0.4))
        for layer in range(layers):
            base = 2.2 - 0.8 * depth[layer] + 0.05 * rng.standard_normal()
            ent = (
                base - 0.15 * f_lr * mfac * (0.5 + depth[layer]) * shape + 0.005 * rng.standard_normal(n_pts) * (x > 0)
            )
            add("drift", "attention_entropy", ent, component=str(layer))
        run_cka = 1.0 + 0.05 * rng.standard_normal()
        for layer in range(layers):
            loss_cka = 0.35 * run_cka * f_lr * mfac * ((layer + 1) / layers) ** 2 * shape
            cka = 1.0 - np.clip(loss_cka + 0.003 * np.abs(rng.standard_normal(n_pts)) * (x > 0), 0.0, 1.0)
            add("drift", "cka", cka, component=str(layer))
        modules = _modules(config, layers)
        per_module = {"full": 3.0, "ia3": 0.05}.get(method, 0.4 * math.sqrt(rank / 8.0))
        total = np.zeros(n_pts)
        for name in modules:
            norm = per_module * f_lr * (1.0 + 0.05 * rng.standard_normal()) * x**0.6
            total += norm**2
            add("drift", "update_norm", norm, component=name)
        add("drift", "update_norm_total", np.sqrt(total))
    instruments = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=list(INSTRUMENT_COLUMNS))
    return instruments[list(INSTRUMENT_COLUMNS)], per_example[list(INSTRUMENT_EXAMPLE_COLUMNS)]


def _write_parquet_atomic(frame: pd.DataFrame, path: str) -> None:
    """A parquet file written beside `path` and renamed into place (with the user's umask)."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    os.close(fd)
    try:
        frame.reset_index(drop=True).to_parquet(tmp, index=False, write_page_checksum=True)
        apply_umask(tmp, directory=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    instruments: Union[bool, Mapping[str, Any], None] = None,
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
    instruments : bool or mapping, optional
        Also write instrument values (`synthetic_instruments`): True for `DEFAULT_INSTRUMENTS`, or
        settings (``names``, ``sample_per_category``, ``seed``, ``loss``, ``attention``; missing keys
        from the defaults); stored as the config's ``"instruments"``. Default: the config's own
        ``"instruments"`` entry, if any.

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
    settings = instrument_settings(cfg.get("instruments") if instruments is None else instruments)
    if settings is not None:
        cfg["instruments"] = settings
    tdir = write_run(os.path.join(path, TRACKING_DIRNAME), cfg, examples, points, logprobs)
    if settings is not None:
        # A stream of its own: the log-probabilities above do not depend on whether instruments are asked for.
        irng = np.random.default_rng([seed, example_seed, zlib.crc32(ident), 12])
        table, per_example = synthetic_instruments(examples, logprobs["train"], points, cfg, settings, irng)
        # Both files whenever instruments were on (the second empty without grad_norms), as the tracker writes them.
        _write_parquet_atomic(table, os.path.join(tdir, "instruments.parquet"))
        _write_parquet_atomic(per_example, os.path.join(tdir, "instrument_examples.parquet"))
    return tdir


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
