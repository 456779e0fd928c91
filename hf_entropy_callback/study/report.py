"""Building the report folder: every table (markdown + CSV) and figure (PNG), linked from index.md / index.html.

Layout of the folder::

    index.md, index.html   the report, in the order of the study's analyses
    tables/NAME.csv        the full tidy table (raw numbers)
    tables/NAME.md         the same table formatted for reading
    figures/NAME.png       the figures

    .hf_entropy_report     marker: this folder was written by `build_report` (format tag inside)

The folder is built under a temporary name beside the target (``.<name>.tmp-<pid>-<random>``) and
renamed into place, so a reader never sees a half-written report. Rules for the target folder:

- it may be missing or empty;
- a folder holding the marker is a report of ours and is replaced as a whole (unless it has come
  to hold a run directory);
- a folder from before the marker existed is replaced only when it holds nothing but a report's
  own files (index.md, index.html, tables/*.md|csv, figures/*.png);
- any other non-empty folder, a file, a symbolic link, a run folder given as input, a folder inside
  one or a folder holding one is refused (`ReportFolderError`) and left untouched.

Hidden temporaries of a killed earlier build of the same target are removed before a new build
(`hf_entropy_callback.runs.remove_stale_temporaries`); files and folders get the user's umask.
"""

from __future__ import annotations

import datetime
import errno
import html
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from hf_entropy_callback.chaosnli import NLI_LABELS
from hf_entropy_callback.dynamics import LEARNED_MARGIN
from hf_entropy_callback.runs import TRACKING_DIRNAME, apply_umask, remove_stale_temporaries, temp_name_prefix

from . import figures as F
from . import instruments as I
from . import tables as T
from .conditions import (
    CONDITION_KEYS,
    KEY_COLUMNS,
    MAIN_RANKS,
    METHOD_SETTINGS,
    condition_table,
    differing_settings,
    discover_runs,
    setting_families,
    settings_detail,
)
from .loading import Options, Study, load_study
from .matched_lr import UNDERFIT_MARGIN, matched_lr_table

#: Marker file written into every report folder; only a folder holding it is ever replaced.
REPORT_MARKER = ".hf_entropy_report"
#: First line of the marker (the tag that identifies our reports) and the report layout version.
REPORT_TAG = "hf_entropy_callback analysis report"
REPORT_FORMAT_VERSION = 1
#: What a report written before the marker existed may hold (relative paths; see the module docstring).
_LEGACY_FILES = {"index.md", "index.html"}
_LEGACY_DIRS = {"tables": (".md", ".csv"), "figures": (".png",)}
#: Tables longer than this are linked from the index, not shown inline.
INLINE_ROWS = 60
#: Tables of at most this many rows are always shown inline.
ALWAYS_INLINE_ROWS = 12


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


_SETTING_COLUMNS = {
    "label_noise",
    "learning_rate",
    "lora_alpha",
    "lora_dropout",
    "num_train_epochs",
    "max_steps",
    "bulk_size",
    "track_every",
    "max_length",
    "split_seed",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
}


def _fmt_number(col: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if col in _SETTING_COLUMNS:
            return f"{v:g}"  # settings as given (a learning rate of 2e-4 is not "0.000")
        if col.startswith("p_") or col.endswith("_p_val") or col in ("p_val", "p_max"):
            return f"{v:.3g}"
        if "share" in col or col == "sign_concordance":
            return f"{100 * v:.1f}%"
        if v.is_integer() and (
            col in ("rank", "seed", "n", "n_examples", "final_step", "first_nonfinite_step", "W")
            or col.startswith("n_")
        ):
            return str(int(v))
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3f}"
    return str(v)


def _column_formatter(col: str):
    """``lambda v: _fmt_number(col, v)`` with the column's rule chosen once: Python floats, ints and
    strings (what a column yields) take a short path to the same text; anything else goes to `_fmt_number`."""
    if col in _SETTING_COLUMNS:

        def number(v):
            return f"{v:g}"

    elif col.startswith("p_") or col.endswith("_p_val") or col in ("p_val", "p_max"):

        def number(v):
            return f"{v:.3g}"

    elif "share" in col or col == "sign_concordance":

        def number(v):
            return f"{100 * v:.1f}%"

    else:
        integral = col in (
            "rank",
            "seed",
            "n",
            "n_examples",
            "final_step",
            "first_nonfinite_step",
            "W",
        ) or col.startswith("n_")

        def number(v):
            if integral and v.is_integer():
                return str(int(v))
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3f}"

    def fmt(v) -> str:
        kind = type(v)
        if kind is float:
            if v != v:
                return "—"
            if v == math.inf or v == -math.inf:
                return "∞" if v > 0 else "−∞"
            return number(v)
        if kind is int:
            return str(v)
        if kind is str:
            return v
        return _fmt_number(col, v)

    return fmt


def format_table(frame: pd.DataFrame, drop_keys: bool = True) -> pd.DataFrame:
    """A display copy of a tidy table: ``X_mean``/``X_sd`` pairs merged into "X (mean ± sd)", numbers as text.

    Missing values become "—" (so a single-run condition reads "0.250 ± —"); p-values get three
    significant digits, shares a percent sign, other floats three decimals. When `drop_keys` and
    the table has a ``condition`` column, the condition key columns are dropped (the condition's
    label names them).

    Examples
    --------
    >>> import pandas as pd
    >>> from hf_entropy_callback.study.report import format_table
    >>> df = pd.DataFrame({"condition": ["A", "B"], "rho_mean": [0.2, 0.25], "rho_sd": [0.1, float("nan")],
    ...                    "p_max": [0.0123456, 0.04]})
    >>> format_table(df)
      condition rho (mean ± sd)   p_max
    0         A   0.200 ± 0.100  0.0123
    1         B     0.250 ± —     0.04
    """
    df = frame.copy()
    if drop_keys and "condition" in df:
        df = df.drop(columns=[k for k in CONDITION_KEYS if k in df])
    out = {}
    for col in df.columns:
        if col.endswith("_sd") and f"{col[:-3]}_mean" in df:
            continue
        if col.endswith("_mean") and f"{col[:-5]}_sd" in df:
            base = col[:-5]
            fmt = _column_formatter(base)
            out[f"{base} (mean ± sd)"] = [f"{fmt(m)} ± {fmt(s)}" for m, s in zip(df[col], df[f"{base}_sd"])]
        else:
            fmt = _column_formatter(col)
            out[col] = [fmt(v) for v in df[col]]
    return pd.DataFrame(out, index=range(len(df)))


def markdown_table(display: pd.DataFrame) -> str:
    """Render a (formatted) DataFrame as a GitHub-flavoured markdown table."""

    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    def column(values) -> list:
        # Formatted tables hold strings: escape only the cells that need it (the same text as `cell`).
        if all(type(v) is str for v in values):
            return [v.replace("|", "\\|").replace("\n", " ") if "|" in v or "\n" in v else v for v in values]
        return [cell(v) for v in values]

    header = "| " + " | ".join(cell(c) for c in display.columns) + " |"
    rule = "|" + "|".join("---" for _ in display.columns) + "|"
    if len(display.columns):
        columns = [column(display.iloc[:, k].tolist()) for k in range(display.shape[1])]
        rows = ["| " + " | ".join(row) + " |" for row in zip(*columns)]
    else:
        rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in display.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


# --------------------------------------------------------------------------------------------
# The document: sections of blocks rendered to markdown and HTML
# --------------------------------------------------------------------------------------------


@dataclass
class TableItem:
    """A table of the report: the tidy frame (CSV) and how it is displayed."""

    name: str
    title: str
    frame: pd.DataFrame
    caption: str = ""
    display: Optional[pd.DataFrame] = None
    inline: bool = True

    def shown(self) -> pd.DataFrame:
        return self.display if self.display is not None else format_table(self.frame)


@dataclass
class FigureItem:
    name: str
    paths: List[str]
    caption: str


@dataclass
class Section:
    title: str
    blocks: List[Union[str, TableItem, FigureItem]] = field(default_factory=list)

    def text(self, s: str):
        self.blocks.append(s)

    def note(self, s: str):
        self.blocks.append("Note: " + s)


# --------------------------------------------------------------------------------------------
# Display transformations (wide views of tidy tables)
# --------------------------------------------------------------------------------------------


def _delta_wide(dl: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for cond, g in dl.groupby("condition", sort=False):
        g = g.set_index("category")
        row = {"condition": cond, "n_runs": _fmt_number("n_runs", g["n_runs"].iloc[0])}
        for cat in ("clean", "ambiguous", "contested", "all"):
            if cat in g.index:
                row[f"ΔL {cat}"] = (
                    f"{_fmt_number('', g.loc[cat, 'delta_loss_mean'])} ± {_fmt_number('', g.loc[cat, 'delta_loss_sd'])}"
                )
            else:
                row[f"ΔL {cat}"] = "—"
        if "contested" in g.index:
            row["contested with ΔL > 0"] = _fmt_number("share", g.loc["contested", "unlearning_share_mean"])
        rows.append(row)
    return pd.DataFrame(rows)


def _binning_compact(b: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (cond, scheme), g in b.groupby(["condition", "scheme"], sort=False):
        g = g.sort_values("bin_order")
        rows.append(
            {
                "condition": cond,
                "scheme": scheme,
                "mean AULC per bin, low → high entropy (nats)": ", ".join(
                    f"{bn} {v:.3f}" for bn, v in zip(g["bin"], g["aulc_mean"])
                ),
                "monotonic": "yes" if g["monotonic"].iloc[0] else "no",
            }
        )
    return pd.DataFrame(rows)


def _regression_wide(reg: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: the entropy and token-length terms (coefficient, beta, largest p) and R²."""
    rows = []
    for cond, g in reg.groupby("condition", sort=False):
        g = g.set_index("term")
        row = {"condition": cond, "n_runs": _fmt_number("n_runs", g["n_runs"].iloc[0])}
        for term in ("entropy", "token_length"):
            if term in g.index:
                row[f"{term} coef (mean ± sd)"] = (
                    f"{_fmt_number('', g.loc[term, 'coef_mean'])} ± {_fmt_number('', g.loc[term, 'coef_sd'])}"
                )
                row[f"{term} beta"] = _fmt_number("", g.loc[term, "beta_mean"])
                row[f"{term} p_max"] = _fmt_number("p_max", g.loc[term, "p_max"])
        labels = [t for t in g.index if str(t).startswith("label=")]
        row["gold-label terms p_max"] = _fmt_number("p_max", g.loc[labels, "p_max"].min()) if labels else "—"
        row["R² (mean)"] = _fmt_number("", g["r2_mean"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def _comparison_display(t: pd.DataFrame, vary: str) -> pd.DataFrame:
    keys = [
        k for k in ("model", "method", "rank", "dataset", "composition", "label_noise", "loss") if k in t and k != vary
    ]
    # The table's groups differ in every key column but the shown ones too (bulk size, learning rate, ...):
    # name that difference, as condition labels do, so two groups never read as one.
    fam = setting_families(t, (vary, *T.VARIED_WITH.get(vary, ())), within=keys)
    t = t.assign(settings=fam["settings"].to_numpy())
    cols = [
        *keys,
        *(["settings"] if (t["settings"] != "").any() else []),
        vary,
        "noise_rule",
        "category",
        "n_runs",
        "seeds",
        "n_examples",
        "delta_loss_mean",
        "delta_loss_sd",
        "aulc_mean",
        "aulc_sd",
        "delta_loss_original_mean",
        "delta_loss_original_sd",
        "aulc_original_mean",
        "aulc_original_sd",
        "rho_mean",
        "rho_sd",
    ]
    return format_table(t[[c for c in cols if c in t]], drop_keys=False)


# --------------------------------------------------------------------------------------------
# Computing everything
# --------------------------------------------------------------------------------------------


def compute_tables(study: Study, alpha: float = T.ALPHA, family: str = "main") -> Dict[str, pd.DataFrame]:
    """Every table of the report, by name (empty DataFrames where no run applies)."""
    runs, ex = study.runs, study.examples
    label_names = list(NLI_LABELS)
    out: Dict[str, pd.DataFrame] = {}
    out["runs"] = runs[
        [
            c
            for c in (
                "run_id",
                "condition",
                "seed",
                "status",
                "learned",
                "n_train",
                "n_validation",
                "n_points",
                "final_step",
                "tracked_set",
                "format_version",
                "duplicate_of",
                "exclusion",
                "path",
            )
            if c in runs
        ]
    ]
    out["conditions"] = condition_table(runs)
    out["rho_by_condition"] = T.rho_by_condition(runs, alpha, boot=study.boot, family=family)
    out["per_seed"] = T.per_seed_table(runs)
    has_ex = not ex.empty
    out["delta_loss"] = T.delta_loss_table(runs, ex) if has_ex else pd.DataFrame()
    out["entropy_distribution"] = T.entropy_distribution(study.entropy)
    out["rank_sweep"] = T.rank_sweep(runs)
    out["rank_trend"] = T.rank_trend(out["rank_sweep"]) if not out["rank_sweep"].empty else pd.DataFrame()
    out["architecture"] = T.architecture_table(runs)
    out["partial_corr_runs"] = T.partial_correlation(runs, ex) if has_ex else pd.DataFrame()
    out["partial_corr"] = T.summarize_partial(out["partial_corr_runs"])
    out["regression_runs"] = T.regression(runs, ex, label_names) if has_ex else pd.DataFrame()
    out["regression"] = T.summarize_terms(out["regression_runs"])
    out["kendall_runs"], out["kendall"] = T.kendall_vs_spearman(runs)
    out["composition"] = T.composition_comparison(runs, ex) if has_ex else pd.DataFrame()
    out["binning"] = T.binning_table(runs, ex) if has_ex else pd.DataFrame()
    out["noise_levels"] = T.noise_levels(runs, ex) if has_ex else pd.DataFrame()
    out["noise_tests"] = T.noise_tests(runs, ex) if has_ex else pd.DataFrame()
    out["soft_label"] = T.soft_label_comparison(runs, ex) if has_ex else pd.DataFrame()
    out["calibration"] = T.calibration_table(runs, study.calibration)
    out["calibration_runs"] = T.calibration_runs(runs, study.calibration)
    out["agreement"] = T.agreement_by_condition(runs, study.agreement)
    matched = matched_lr_table(study)
    if not matched.empty:  # only a report with the matched-LR grid has the table (and its section's files)
        out["matched_lr"] = matched
    agr = study.agreement
    out["agreement_points"] = (
        agr.merge(runs[["run_id", "condition", "seed"]], on="run_id") if not agr.empty else pd.DataFrame()
    )
    out["cartography_runs"] = T.cartography_table(runs, ex) if has_ex else pd.DataFrame()
    out["cartography"] = T.summarize_runs(
        out["cartography_runs"], ["rho_conf_aulc", "r2_confidence", "r2_full", "delta_r2"], ["p_delta"]
    )
    out.update(I.instrument_tables(study))  # only the tables some run's instruments feed
    return out


def _table(name, title, tables, caption="", display=None, inline=None) -> TableItem:
    frame = tables[name]
    shown_rows = len(display) if display is not None else len(frame)
    if shown_rows <= ALWAYS_INLINE_ROWS:
        inline = True  # small tables are always shown, not only linked
    elif inline is None:
        inline = shown_rows <= INLINE_ROWS
    return TableItem(name, title, frame, caption, display, inline)


def compose(
    study: Study,
    tables: Dict[str, pd.DataFrame],
    figs: Dict[str, List[str]],
    alpha: float,
    family: str = "main",
    main_ranks=MAIN_RANKS,
) -> List[Section]:
    """The report's sections, in the order of the study's analyses."""
    runs = study.runs
    t = tables
    opts = study.options
    sections: List[Section] = []
    conds = t["conditions"]
    n_boot = opts.n_boot
    boot_text = (
        f"95% CI: percentile bootstrap over {n_boot} resamples of the tracked examples (seed "
        f"{opts.boot_seed}); a condition's CI resamples the same examples in every seed and averages the "
        f"seeds' rho per resample"
        if n_boot
        else "no bootstrap (--bootstrap 0): CIs are empty"
    )

    s = Section("Runs")
    n_incomplete = int((~runs["history_complete"] & ~runs["diverged"]).sum()) if "history_complete" in runs else 0
    n_dup = int(runs["duplicate_of"].notna().sum()) if "duplicate_of" in runs else 0
    n_not_learned = int((runs["learned"].eq(False) & ~runs["excluded"]).sum()) if "learned" in runs else 0
    s.text(
        f"{len(runs)} runs in {len(conds)} conditions. A condition is defined by every recorded setting that "
        f"changes the numbers (model, method, rank, LoRA alpha and dropout, learning rate and schedule, epochs / "
        f"max_steps, batch × accumulation × world size, bulk size, track_every, max length, data files, split "
        f"seed, the tracked example set (hash of the sorted train ids), composition, label noise and its drawing "
        f"rule, loss, class weights, label names); only the seed varies within one. A setting a run did not "
        f"record counts as a value of its own. {n_dup} duplicate run(s) (same condition and seed as another) are "
        f"counted once. {int(runs['diverged'].sum())} diverged, {n_incomplete} with an incomplete history "
        f"(excluded from every aggregate and figure like duplicates; the reason is in the inventory's exclusion "
        f"column). "
        f"Diverged: a non-finite tracked loss, or a mean tracked loss above the sanity bound 10 ln K nats "
        f"(K classes; ln K is the loss of a uniform prediction) at any tracking point. "
        f"{n_not_learned} usable run(s) did not learn: validation accuracy less than {LEARNED_MARGIN * 100:g} "
        f"points above chance (learned False in the inventory; kept in the aggregates, named in the warnings). "
        f"Datasets: {', '.join(sorted(runs['dataset'].unique()))}."
    )
    s.blocks.append(
        _table(
            "conditions",
            "Conditions and their defining settings",
            t,
            "One row per condition: seeds of its usable runs, and the settings that define it (the main "
            "ones, plus every setting that varies across this report; 'None': not recorded). "
            "tracked_set: hash of the sorted ids of the tracked train examples. in_main_family: part of "
            "the correction family of section 2.",
            display=format_table(conds, drop_keys=False),
        )
    )
    s.blocks.append(_table("runs", "Run inventory", t, "Every run found, with its status.", inline=False))
    if study.notes:
        s.text("Warnings:\n" + "\n".join(f"- {n}" for n in study.notes))
    sections.append(s)

    s = Section("1. Loss trajectories by entropy category")
    if figs["trajectories"]:
        s.blocks.append(
            FigureItem(
                "trajectories",
                figs["trajectories"],
                "Mean tracked loss −log p(gold) (nats) of the clean / ambiguous / contested train "
                "examples over training, averaged over seeds; band: 95% CI of the mean over examples "
                "(averaged over seeds). Rows: model × dataset; columns: LoRA ranks, IA3, full FT; legend: entropy "
                "category."
                + (
                    " A model's conditions that differ in another setting (bulk size, learning rate, ...) are rows "
                    "of their own, named in the panel titles: a panel is one condition, never several pooled."
                    if _has_families(runs)
                    else ""
                ),
            )
        )
    else:
        s.note("no usable run in the main setting.")
    if figs["trajectories_variants"]:
        s.blocks.append(
            FigureItem(
                "trajectories_variants",
                figs["trajectories_variants"],
                "The same for the variants (composition, label noise, loss), beside their main-setting condition.",
            )
        )
    sections.append(s)

    s = Section("2. Spearman rho(entropy, AULC) per condition")
    fam_n = int(t["rho_by_condition"]["in_family"].sum()) if not t["rho_by_condition"].empty else 0
    fam_text = (
        f"the study's main-matrix conditions present ({fam_n}): base variant (composition all, no label "
        f"noise, loss ce) and, for LoRA, rank {' or '.join(str(int(r)) for r in main_ranks)} (the other ranks are "
        f"the sweep's)"
        if family == "main"
        else f"every condition in this report ({fam_n})"
    )
    s.text(
        f"rho per run over its tracked train examples; mean ± sd across seeds (sd over runs, ddof 1; — with one "
        f"run); {boot_text}. Test (directional, as the claim is rho > 0): a condition is significant when every "
        f"seed's one-sided Spearman p (alternative rho > 0, scipy) is below alpha after correction; its p-value "
        f"p_max is the largest of them (intersection–union test, valid whatever the dependence between seeds that "
        f"share their examples; a seed with rho < 0 has p near 1, so mixed signs are never significant). "
        f"Correction family (--family {family}): {fam_text}; p_bonf / p_bh: p_max corrected over that family with "
        f"pingouin.multicomp (Bonferroni / Benjamini–Hochberg); conditions outside it have none. sig_* at alpha = "
        f"{alpha:g}. Excluded runs (diverged, incomplete history, duplicates) are not in the mean. Runs that did not "
        f"learn (validation accuracy less than {LEARNED_MARGIN * 100:g} points above chance: learned False in the "
        f"per-seed table, counted in n_not_learned) are in it, as the protocol keeps them; their rho describes an "
        f"untrained model, so read such a condition with care."
    )
    s.blocks.append(_table("rho_by_condition", "rho(entropy, AULC) per condition", t))
    if figs.get("entropy_aulc"):
        s.blocks.append(
            FigureItem(
                "entropy_aulc",
                figs["entropy_aulc"],
                "Annotation entropy (nats) against AULC (nats; each point one tracked train example, "
                "its AULC averaged over the condition's seeds), one panel per condition, coloured by "
                f"entropy category (hexbin of counts above {F.HEXBIN_MIN} examples). In each panel: "
                f"the mean over seeds of the per-run Spearman rho and its 95% bootstrap CI "
                f"({n_boot} resamples of the examples), the seeds and the number of examples.",
            )
        )
    s.blocks.append(
        _table(
            "per_seed",
            "Per-seed breakdown",
            t,
            "rho_ci_low / rho_ci_high: 95% percentile bootstrap CI of the run's rho (examples "
            "resampled). p_val: two-sided; p_greater: one-sided (rho > 0). "
            "p_bonf / p_bh: each run's two-sided p corrected over all usable runs. validation_accuracy: argmax "
            "accuracy on the validation set at the last tracking point. Diverged runs: status "
            "'diverged', rho over the examples whose losses stayed finite; runs resumed without their "
            "earlier trajectory: status 'incomplete history'; exclusion: why a run is left out. learned: False when "
            f"the validation accuracy is less than {LEARNED_MARGIN * 100:g} points above chance (NOT LEARNED), empty "
            "without a validation set.",
            inline=True,
        )
    )
    sections.append(s)

    s = Section("3. Mean Delta L per entropy category")
    if t["delta_loss"].empty:
        s.note("no usable runs.")
    else:
        s.text(
            "ΔL = loss at the last tracking point − loss at the first (nats; > 0: un-learning), mean over a "
            "category's examples per run, then mean ± sd across seeds."
        )
        s.blocks.append(
            _table(
                "delta_loss", "Mean ΔL per condition and category", t, display=_delta_wide(t["delta_loss"]), inline=True
            )
        )
    sections.append(s)

    s = Section("4. Entropy distribution")
    s.blocks.append(
        _table(
            "entropy_distribution",
            "Entropy categories per dataset",
            t,
            "The union of the examples tracked (train and validation sets) by any run of each dataset, "
            "each example once; a dataset whose runs all use a restricted composition shows only that "
            "composition's examples. n per category is in the table. clean H < 0.4 ≤ ambiguous ≤ 0.7 "
            "< contested (nats).",
        )
    )
    if figs["entropy_histogram"]:
        s.blocks.append(
            FigureItem(
                "entropy_histogram",
                figs["entropy_histogram"],
                "Annotation entropy of the examples in the table above (union over the runs of each "
                "dataset, train and validation sets), stacked by category; dashed: the 0.4 / 0.7 "
                "thresholds.",
            )
        )
    sections.append(s)

    s = Section("5. Rank sweep")
    if t["rank_sweep"].empty:
        s.note("no model has main-setting LoRA runs at two or more ranks; rank sweep skipped.")
    else:
        if "settings" in t["rank_sweep"]:
            s.text(
                "A sweep combines only conditions that agree on every setting but method and rank (and LoRA alpha, "
                "dropout and target modules, which come with them). A model's conditions that differ in another "
                "setting are separate sweeps, never averaged together: settings names what tells them apart, and "
                "the trend test and the figure treat each sweep on its own."
            )
        s.blocks.append(
            _table(
                "rank_sweep",
                "rho per LoRA rank (full FT on its own row)",
                t,
                display=format_table(t["rank_sweep"], drop_keys=False),
            )
        )
        s.blocks.append(
            _table(
                "rank_trend",
                "Spearman of rank vs rho",
                t,
                "Over the per-rank mean rho (one point per rank); needs three or more ranks. p_val: "
                "one-sided permutation p for rho > 0 (rho grows with rank), exact (all n! orderings) for "
                "up to 8 ranks, else Monte Carlo (100,000 seeded permutations): p_method. monotonic: "
                "mean rho strictly increases with rank. rho_full: full fine-tuning.",
                display=format_table(t["rank_trend"], drop_keys=False),
            )
        )
    if figs["rho_vs_rank"] and not t["rank_sweep"].empty:
        s.blocks.append(
            FigureItem(
                "rho_vs_rank",
                figs["rho_vs_rank"],
                "rho vs LoRA rank per model (error bars: sd over seeds); encoders solid, decoders "
                "dashed; squares: full fine-tuning."
                + (" One line per sweep (its settings in the legend)." if "settings" in t["rank_sweep"] else ""),
            )
        )
    sections.append(s)

    s = Section("6. Partial correlation and multiple regression")
    if t["partial_corr"].empty:
        s.note("no usable runs.")
    else:
        s.text(
            "Spearman partial correlation of entropy and AULC controlling for token length (pingouin.partial_corr), "
            "per run, then mean ± sd across seeds; p_max: the largest seed p-value."
        )
        s.blocks.append(_table("partial_corr", "Partial correlation (covariate: token length)", t))
        s.blocks.append(_table("partial_corr_runs", "Partial correlation per run", t, inline=False))
        s.text(
            "OLS AULC ~ entropy + token_length + gold label (dummy-coded, reference: entailment) per run "
            "(pingouin.linear_regression); beta: standardised coefficient; coefficients in nats of AULC per unit."
        )
        s.blocks.append(
            _table(
                "regression",
                "Multiple regression, per condition",
                t,
                "Entropy and token-length terms; the CSV has every term, the gold-label dummies "
                "included ('gold-label terms p_max': the smallest of their largest-seed p-values).",
                display=_regression_wide(t["regression"]),
                inline=True,
            )
        )
        s.blocks.append(_table("regression_runs", "Multiple regression per run", t, inline=False))
    sections.append(s)

    s = Section("7. Training-set composition")
    if t["composition"].empty:
        s.note("no runs with a composition other than 'all'; comparison skipped.")
    else:
        s.text(
            "Runs trained on a restricted ChaosNLI part (low = clean only, high = contested only, balanced) beside "
            "the matching composition='all' runs (equal in every other setting but the tracked set, which the "
            "composition restricts). A restricted run "
            "tracks only its own ChaosNLI examples, so its rho is over a narrower entropy range."
        )
        for note in T.unmatched_variants(runs, "composition", "all"):
            s.note(note)
        s.blocks.append(
            _table("composition", "Composition vs all", t, display=_comparison_display(t["composition"], "composition"))
        )
    sections.append(s)

    s = Section("8. Alternative binning")
    if t["binning"].empty:
        s.note("no usable runs.")
    else:
        s.text(
            "Mean AULC per bin under the fixed categories, quartile and tercile bins of entropy (per run, then "
            "averaged over seeds); monotonic: strictly increasing with entropy."
        )
        s.blocks.append(
            _table("binning", "Mean AULC by entropy bin", t, display=_binning_compact(t["binning"]), inline=True)
        )
    if figs["aulc_bins"]:
        s.blocks.append(
            FigureItem(
                "aulc_bins",
                figs["aulc_bins"],
                "Mean AULC (nats) per entropy bin, main-setting conditions; error bars: sd over "
                "seeds; line style: LoRA solid, IA3 dash-dot, full FT dashed.",
            )
        )
    sections.append(s)

    s = Section("9. Kendall tau-b vs Spearman")
    s.blocks.append(
        _table(
            "kendall",
            "tau-b / rho over all usable runs",
            t,
            "ratio = tau / rho per run (about 2/3 is usual for a monotonic association); sign "
            "concordance: share of runs where tau and rho have the same sign.",
        )
    )
    s.blocks.append(_table("kendall_runs", "tau-b and rho per run", t, inline=False))
    sections.append(s)

    s = Section("10. Label-noise injection")
    if t["noise_levels"].empty:
        s.note("no runs with label_noise > 0; noise analysis skipped.")
    else:
        s.blocks.append(
            _table(
                "noise_levels",
                "rho and ΔL per noise level",
                t,
                "ΔL and AULC against the training (noisy) label; *_original: against the label before "
                "noise; mean ± sd across seeds of the per-run category means. Baselines: the runs equal in "
                "every other setting.",
                display=_comparison_display(t["noise_levels"], "label_noise"),
            )
        )
        for note in T.unmatched_variants(runs, "label_noise", 0.0):
            s.note(note)
        if t["noise_tests"].empty:
            s.note(
                "no noisy run has a noise-free twin (equal in every other setting, seed included); paired tests "
                "skipped."
            )
        else:
            s.text(
                "Paired Wilcoxon signed-rank test (pingouin.wilcoxon, two-sided) of per-example AULC between each "
                "noisy run and its noise-free twin: the run equal in every other setting of the condition key and "
                "in the seed (no other run is ever paired). target 'training': the noisy run's AULC against the "
                "label it was trained on (the noisy one) vs the twin's; target 'original': both against the label "
                "before noise, so both sides measure the same class. Subsets: all, the examples chosen for noise, "
                "the others. noise_rule: how noisy labels were drawn ('all classes': uniformly from all K, so a "
                "share keeps its label; 'other classes': --label_noise_exclude_original). share_changed: noised "
                "examples whose label the draw actually changed. d_z: mean difference / sd of the differences "
                "(paired); d_av: mean difference / root mean of the two variances (pingouin's paired cohen); "
                "> 0: higher AULC with noise."
            )
            shown = t["noise_tests"].drop(columns=["run_id", "baseline_run_id"], errors="ignore")
            keep = [
                c
                for c in (
                    "model",
                    "method",
                    "rank",
                    "dataset",
                    "seed",
                    "label_noise",
                    "noise_rule",
                    "target",
                    "subset",
                    "n",
                    "n_noised",
                    "share_changed",
                    "aulc_baseline_mean",
                    "aulc_noisy_mean",
                    "mean_diff",
                    "W",
                    "p_val",
                    "d_z",
                    "d_av",
                )
                if c in shown
            ]
            s.blocks.append(
                _table(
                    "noise_tests",
                    "Paired tests, noisy vs its noise-free twin",
                    t,
                    display=format_table(shown[keep], drop_keys=False),
                )
            )
    if figs["noise"]:
        s.blocks.append(
            FigureItem(
                "noise",
                figs["noise"],
                "rho and mean ΔL per category against the noise level (error bars: sd over seeds).",
            )
        )
    sections.append(s)

    s = Section("11. Soft-label training")
    if t["soft_label"].empty:
        s.note("no runs with a loss other than 'ce'; soft-label comparison skipped.")
    else:
        s.text(
            "Runs trained on the annotator distribution (e.g. loss = soft_kl) beside the matching hard-label "
            "(ce) runs; the tracked loss is the gold-label cross-entropy in both."
        )
        for note in T.unmatched_variants(runs, "loss", "ce"):
            s.note(note)
        s.blocks.append(
            _table("soft_label", "Soft vs hard labels", t, display=_comparison_display(t["soft_label"], "loss"))
        )
    sections.append(s)

    sections += instrument_sections(study, t, figs)

    s = Section("14. Calibration per category")
    if t["calibration"].empty:
        s.note("no usable runs with finite final log-probabilities.")
    else:
        s.text(
            f"At the final tracking point (hf_entropy_callback.dynamics.calibration): mean entropy of the predicted "
            f"distribution (nats), mean max probability, ECE ({opts.ece_bins} equal-width confidence bins, "
            f"--ece-bins), accuracy; mean ± sd across seeds. ECE depends on the bin count; each run's ECE has a 95% "
            f"percentile bootstrap interval ({n_boot} resamples of the examples) in the per-run table."
        )
        s.blocks.append(_table("calibration", "Calibration per condition, set and category", t, inline=False))
        s.blocks.append(
            _table("calibration_runs", "Calibration per run, with the ECE bootstrap interval", t, inline=False)
        )
    if figs["calibration"]:
        s.blocks.append(
            FigureItem(
                "calibration",
                figs["calibration"],
                f"Calibration per category at the final point: prediction entropy, mean max "
                f"confidence and ECE ({opts.ece_bins} bins); bars: mean over seeds, error bars: sd over "
                f"seeds.",
            )
        )
    sections.append(s)

    s = Section("15. Dataset cartography")
    if t["cartography"].empty:
        s.note("no usable runs.")
    else:
        pts = (
            "the epoch-end tracking points (one per epoch, as Swayamdipta et al. 2020; step 0 and the interval "
            "points are left out)"
            if opts.cartography_points == "epoch_end"
            else "every tracking point, step 0 and the every-track_every points included (--cartography-points all)"
        )
        s.text(
            f"confidence = mean p(gold) over {pts}; variability = its population sd (ddof 0, as the original). "
            "rho_conf_aulc: Spearman of "
            "confidence vs AULC. r2_confidence: OLS AULC ~ confidence; r2_full: + entropy; delta_r2: the "
            "increment from entropy; p_delta_max: the largest seed p of the nested F test."
        )
        s.blocks.append(_table("cartography", "Cartography: confidence vs AULC and the R² added by entropy", t))
        s.blocks.append(_table("cartography_runs", "Cartography per run", t, inline=False))
    if figs["cartography"]:
        s.blocks.append(
            FigureItem(
                "cartography",
                figs["cartography"],
                "Cartography maps (lowest seed of each main-setting condition): variability "
                "(population sd of p(gold)) against confidence (mean p(gold)) over the points named "
                "above, one dot per tracked train example, coloured by entropy category.",
            )
        )
    sections.append(s)

    s = Section("16. Decoders vs encoders")
    if t["architecture"].empty:
        s.note("no main-setting LoRA runs.")
    else:
        split = "settings" in t["architecture"]
        if split:
            s.note(
                "runs that differ in a setting other than the model (its path, architecture and target modules) "
                "are not pooled: each setting family is a row of its own, named in the settings column."
            )
        s.blocks.append(
            _table(
                "architecture",
                "rho by architecture and LoRA rank",
                t,
                "Pooled over the models of an architecture and their seeds (sd: over all those runs)"
                + (", within a setting family (settings)." if split else "."),
                display=format_table(t["architecture"], drop_keys=False),
            )
        )
        if figs["rho_vs_rank"]:
            s.text("See the rho-vs-rank figure in section 5 (encoders solid, decoders dashed).")
    sections.append(s)
    s = Section("17. Agreement with the human label distribution")
    if t["agreement"].empty:
        s.note("no usable runs.")
    else:
        s.text(
            "Beyond the study (as in the ChaosNLI / LeWiDi line of work): per example, from the stored "
            "log-probabilities and the 100 annotators' label counts (natural log, nats): KL(human || model); "
            "Jensen–Shannon divergence and JS distance (its square root, as scipy.spatial.distance.jensenshannon "
            "and ChaosNLI's scoreboard); soft-label cross-entropy; Manhattan (L1) distance; accuracy against the "
            "majority label (the label before any noise). Mean over a category's examples per run at the final "
            "tracking point, then mean ± sd across seeds. Every tracking point: agreement_points (CSV)."
        )
        s.blocks.append(
            _table("agreement", "Agreement with the human distribution at the final point", t, inline=False)
        )
        s.blocks.append(
            _table("agreement_points", "Agreement per run, tracking point, set and category", t, inline=False)
        )
    if figs.get("agreement"):
        s.blocks.append(
            FigureItem(
                "agreement",
                figs["agreement"],
                "Mean Jensen–Shannon distance (natural log) between the model's and the annotators' "
                "distribution over training, per entropy category, on the validation set (the "
                "train set when none is tracked); averaged over seeds; main-setting conditions.",
            )
        )
    sections.append(s)

    s = Section("18. Matched learning rates: full fine-tuning vs LoRA")
    if "matched_lr" not in t:
        s.note(
            "no model and dataset trained at two or more learning rates by both methods (the sweeps' "
            "matched_lr matrix); section skipped."
        )
    else:
        s.text(
            f"Runs without a variant, per model, dataset and learning rate: mean ± sd over seeds of rho "
            f"(entropy vs AULC) and validation accuracy, mean ΔL per category. underfit: mean validation accuracy "
            f"within {UNDERFIT_MARGIN:g} of chance (1/K); lora_underfit_regime: LoRA underfit where full "
            "fine-tuning is not, so LoRA's rho and ΔL there describe a model that did not train."
        )
        if "settings" in t["matched_lr"]:
            s.text(
                "Rates and methods are compared only between runs that agree on every other setting; a model's "
                "runs that differ in one (named in the settings column) are separate rows, never averaged together."
            )
        s.blocks.append(_table("matched_lr", "Full FT vs LoRA at matched learning rates", t))
    sections.append(s)

    return sections


TRAIN_CARTOGRAPHY_TITLE = "Training-set cartography (train mode, whole training set)"
#: Runs drawn in the training-set data-map figure (the first ones in the report's order).
TRAIN_CARTOGRAPHY_MAPS = 4


def train_cartography_sections(
    study: Study, tables: Dict[str, pd.DataFrame], figs: Dict[str, List[str]], folder: str
) -> List[Section]:
    """The section on the runs that recorded train dynamics (`record_train_dynamics`); none when no run did.

    Adds the table ``train_cartography`` to `tables` and the figure ``train_cartography`` (written under
    `folder`/figures) to `figs`.
    """
    from matplotlib.figure import Figure

    from hf_entropy_callback import cartography as C
    from hf_entropy_callback.entropy import CATEGORIES
    from hf_entropy_callback.runs import RunFormatError

    found, problems = [], []
    for _, run in study.runs.iterrows():
        folder_of_run = C.find_train_dynamics(run["path"])  # the tracking folder's sibling train_dynamics/
        if folder_of_run is None:
            continue
        try:
            carto = C.train_cartography(C.load_train_dynamics(folder_of_run))
        except (RunFormatError, ValueError) as err:
            problems.append(f"{run['run_id']}: {err}")
            continue
        cats = study.examples.loc[study.examples["run_id"] == run["run_id"]].set_index("example_id")["category"]
        carto["group"] = carto["example_id"].map(cats).fillna("untracked").astype(str)
        found.append((run, carto))
    if not found and not problems:
        return []
    s = Section(TRAIN_CARTOGRAPHY_TITLE)
    s.text(
        "Beyond the study (Swayamdipta et al., 2020, as in their recipe): every training example, bulk "
        "included, from the records of the TRAINING forward (train mode: dropout on, the weights before "
        "each update; run_glue_entropy.py --record_train_dynamics), one record per epoch, over the epochs "
        "that ran to their end. confidence = mean p(gold) over epochs, variability = its sd, correctness = "
        "share of epochs predicted right. Not the eval-mode tracked points of the other sections. Groups: the "
        "tracked examples' entropy categories; untracked = the rest of the training set (the bulk corpus)."
    )
    for p in problems:
        s.note(f"train dynamics not read: {p}")
    order = list(CATEGORIES) + ["untracked"]
    rows = []
    for run, carto in found:
        summary = C.summarize_cartography(carto, "group")
        summary["group"] = pd.Categorical(summary["group"], [g for g in order if g in set(summary["group"])])
        summary = summary.sort_values("group").assign(group=lambda d: d["group"].astype(str))
        rows.append(summary.assign(run_id=run["run_id"], condition=run.get("condition"), seed=run.get("seed")))
    if rows:
        table = pd.concat(rows, ignore_index=True)
        cols = ["run_id", "condition", "seed", "group", "n", "n_epochs", "confidence", "variability", "correctness"]
        tables["train_cartography"] = table[cols]
        s.blocks.append(
            _table(
                "train_cartography",
                "Training-set cartography per run and group (train mode)",
                tables,
                "Means over each group's examples.",
                display=format_table(table[cols], drop_keys=False),
            )
        )
        shown = found[:TRAIN_CARTOGRAPHY_MAPS]
        fig = Figure(figsize=(4.6 * len(shown), 4.2), layout="constrained")
        for ax, (run, carto) in zip(np.atleast_1d(fig.subplots(1, len(shown))), shown):
            # the palette's order: untracked (bulk) examples first, so the tracked ones are drawn on top
            C.plot_data_map(carto, hue="group", palette={"untracked": "#bbbbbb", **F.CATEGORY_COLORS}, ax=ax)
            ax.set_title(str(run["run_id"]), fontsize="medium")
        figs["train_cartography"] = [F.save_figure(fig, os.path.join(folder, "figures", "train_cartography.png"))]
        s.blocks.append(
            FigureItem(
                "train_cartography",
                figs["train_cartography"],
                f"Data maps of the training set (train mode) of the first {len(shown)} of {len(found)} runs with "
                "train dynamics: variability vs confidence per example, coloured by group.",
            )
        )
    return [s]


# --------------------------------------------------------------------------------------------
# Instrument sections (issue 12): analyses 12 and 13, and drift
# --------------------------------------------------------------------------------------------

#: What the gradients of the instruments were taken of, by the config's ``instruments.loss``.
INSTRUMENT_LOSSES = {
    "class_weighted_ce": "the training loss, class-weighted cross-entropy to the gold label",
    "soft_kl": "the KL divergence to the annotators' label distribution (soft labels)",
    "ce": "the unweighted cross-entropy of the gold label",
}
#: How to get the instruments: the note of a section when no run has any.
INSTRUMENT_HINT = "rerun the training with --instruments grad_alignment,grad_norms,drift (or those wanted)"


def _not_computed(study: Study, instrument: str) -> str:
    runs = study.usable
    names = runs["instrument_names"] if "instrument_names" in runs else pd.Series(dtype=object)
    if not names.fillna("").astype(bool).any():
        return f"not computed (no run has instruments: {INSTRUMENT_HINT})."
    return (
        f"not computed (no run recorded the {instrument} instrument: rerun the training with --instruments "
        f"including {instrument})."
    )


def _instrument_settings_text(study: Study, instrument: str) -> str:
    """Which loss the instrument's gradients used and the sample size, from the runs' configs (for drift:
    the instrument settings)."""
    u = study.usable
    u = u[u["instrument_names"].fillna("").str.split(",").map(lambda names: instrument in names)]
    if instrument == "drift":
        settings = "; ".join(sorted(u["drift_setting"].dropna().unique()))
        return f"{len(u)} usable run(s) with this instrument; instrument setting(s): {settings}."
    losses = sorted({str(v) for v in u["instrument_loss"].dropna()})
    samples = sorted({float(v) for v in u["instrument_sample"].dropna()})
    loss_text = (
        "; ".join(f"{v} ({INSTRUMENT_LOSSES.get(v, 'as named in the run config')})" for v in losses)
        if losses
        else "not recorded in the run configs"
    )
    sample_text = (
        ", ".join("all tracked train examples" if v < 0 else f"{int(v)} examples per entropy category" for v in samples)
        if samples
        else "not recorded in the run configs"
    )
    return (
        f"{len(u)} usable run(s) with this instrument. Gradients of: {loss_text}. Sample: {sample_text} "
        "(drawn from the tracked train examples with the instruments' seed; a category with fewer examples "
        "contributes all of them)."
    )


def _settings_column(frame: pd.DataFrame) -> List[str]:
    return ["instrument_setting"] if frame["instrument_setting"].nunique() > 1 else []


def _instrument_display(frame: pd.DataFrame) -> pd.DataFrame:
    """`format_table` without the learning rate (the condition's label names it where it varies) and,
    when the report has one instrument setting, without that (the section's text names it)."""
    drop = ["learning_rate"] + ([] if _settings_column(frame) else ["instrument_setting"])
    return format_table(frame.drop(columns=[c for c in drop if c in frame]))


def _at_ends(frame: pd.DataFrame, keys: Sequence[str], by: str, value: str, which: Sequence[str]) -> pd.DataFrame:
    """One row per (condition, setting): "value (mean ± sd)" of each `by` level at the first / last step."""
    rows = []
    for (cond, setting), g in frame.groupby(["condition", "instrument_setting"], sort=False):
        row = {"condition": cond, "instrument_setting": setting, "n_runs": _fmt_number("n_runs", g["n_runs"].max())}
        for level in which:
            d = g[g[by] == level].sort_values("step")
            for end, r in (("first", d.head(1)), ("last", d.tail(1))):
                if end == "first" and by != "pair":
                    continue
                row[f"{level} ({end})" if by == "pair" else level] = (
                    f"{_fmt_number('', r[f'{value}_mean'].iloc[0])} ± {_fmt_number('', r[f'{value}_sd'].iloc[0])}"
                    if len(r)
                    else "—"
                )
        rows.append(row)
    out = pd.DataFrame(rows)
    return out[[c for c in out if c != "instrument_setting" or c in keys]]


def _has_families(runs: pd.DataFrame) -> bool:
    """Whether some conditions share their label (model, method, dataset, variant) and differ in another
    setting: then the figures' rows per model are split into setting families."""
    return "distinct_by" in runs and bool((runs["distinct_by"].fillna("") != "").any())


def _pooled_settings_text(runs: pd.DataFrame, per_run: pd.DataFrame) -> str:
    """A sentence naming the settings, besides method and rank, in which the runs of `per_run` differ (a
    statistic over runs pools them by design), or "" when they differ in none."""
    used = runs[runs["run_id"].isin(set(per_run["run_id"]))] if "run_id" in per_run else runs.iloc[:0]
    differ = differing_settings(used, [c for c in KEY_COLUMNS if c not in METHOD_SETTINGS])
    if "model" in differ:  # its path says the same again
        differ = [c for c in differ if c != "model_name_or_path"]
    if not differ:
        return ""
    return (
        f" The runs pooled here also differ in other settings ({settings_detail(used, differ)}), so these rho "
        "mix those differences too; drift_delta_runs has each run with its condition."
    )


def instrument_sections(study: Study, tables: Dict[str, pd.DataFrame], figs: Dict[str, List[str]]) -> List[Section]:
    """Sections 12 (gradient alignment), 13 (gradient norms by category) and 13b (drift) of the report.

    Each is computed from the runs that recorded its instrument; without any, it says "not computed"
    with the flag to rerun with, and no table or figure is written.
    """
    t = tables
    sections = []

    s = Section("12. Gradient alignment over training")
    if "grad_alignment" not in t:
        s.note(_not_computed(study, "grad_alignment"))
    else:
        a = t["grad_alignment"]
        s.text(
            "Cosine similarity between the aggregated gradients of two entropy categories' sampled train "
            "examples at each tracking point (the tracker's grad_alignment instrument; clean~contested is the "
            "study's comparison: a falling cosine means the two groups pull the weights apart). "
            + _instrument_settings_text(study, "grad_alignment")
            + " Mean over seeds per condition (method, rank, learning rate, ...) and instrument setting; band and "
            "ci_low / ci_high: 95% t interval over seeds (mean ± t(0.975, n−1)·sd/√n; none with one seed). "
            "Runs with different gradient instrument settings (loss, sample size) are never pooled."
        )
        for n in I.instrument_notes(study.runs, "gradients"):
            s.note(n)
        keys = _settings_column(a)
        s.blocks.append(
            _table(
                "grad_alignment",
                "Gradient alignment per condition and tracking step",
                t,
                "Shown: the cosine (mean ± sd over seeds) at the first and the last tracking point; the CSV has "
                "every step with its 95% t interval.",
                display=_at_ends(
                    a, keys, "pair", "cosine", ["clean~contested", "clean~ambiguous", "ambiguous~contested"]
                ),
            )
        )
        if figs.get("grad_alignment"):
            s.blocks.append(
                FigureItem(
                    "grad_alignment",
                    figs["grad_alignment"],
                    "Cosine of the clean and the contested examples' aggregated gradients over training, LoRA vs "
                    "full FT (line style: LoRA solid, IA3 dash-dot, full FT dashed) per model, dataset, variant and "
                    "learning rate; line: mean over seeds, band: 95% t interval over seeds.",
                )
            )
    sections.append(s)

    s = Section("13. Per-example gradient norms by entropy category")
    if "grad_norms" not in t:
        s.note(_not_computed(study, "grad_norms"))
    else:
        g = t["grad_norms"]
        s.text(
            "L2 norm of each sampled train example's own loss gradient (the tracker's grad_norms instrument), "
            "summarised per category and tracking point by the runs' mean and median; here the mean ± sd over "
            "seeds (95% t interval in the CSV). " + _instrument_settings_text(study, "grad_norms")
        )
        for n in I.instrument_notes(study.runs, "gradients"):
            s.note(n)
        s.blocks.append(
            _table(
                "grad_norms",
                "Gradient norm by category per condition and tracking step",
                t,
                "Shown: the category mean of the per-example norms at the last tracking point (mean ± sd over "
                "seeds); the CSV has every step, the medians and the 95% t intervals.",
                display=_at_ends(g, _settings_column(g), "category", "grad_norm", ["clean", "ambiguous", "contested"]),
            )
        )
        if "grad_norm_test_summary" in t:
            s.text(
                "Contested vs clean (the study's figure-4 comparison), per run at the last tracking point with "
                "per-example norms: two-sided Mann–Whitney U test (scipy.stats.mannwhitneyu) of the contested "
                "against the clean examples' norms; cles = U / (n_contested · n_clean), the probability that a "
                "contested example's norm exceeds a clean one's (0.5: none). Per condition: cles and the ratio of "
                "medians (contested / clean), mean ± sd over seeds; n_higher: seeds with cles > 0.5; n_sig: seeds "
                "with p < 0.05; p_max: the largest seed p (the difference holds for a condition only if it holds "
                "in every seed)."
            )
            s.blocks.append(
                _table(
                    "grad_norm_test_summary",
                    "Contested vs clean gradient norms per condition",
                    t,
                    display=_instrument_display(t["grad_norm_test_summary"]),
                )
            )
            s.blocks.append(
                _table(
                    "grad_norm_tests",
                    "Contested vs clean gradient norms per run",
                    t,
                    display=_instrument_display(t["grad_norm_tests"]),
                    inline=False,
                )
            )
        else:
            s.note("no run stored per-example gradient norms (instrument_examples.parquet); no test of the categories.")
        if figs.get("grad_norms"):
            s.blocks.append(
                FigureItem(
                    "grad_norms",
                    figs["grad_norms"],
                    "Per-example gradient norm by entropy category over training (study figure 4), one panel per "
                    "condition: the category mean of the sampled examples' norms, mean over seeds; band: 95% t "
                    "interval over seeds. Panels do not share the y axis (full FT's norms are far larger).",
                )
            )
    sections.append(s)

    s = Section("13b. Drift over training and the contested examples' Delta L")
    if "drift" not in t:
        s.note(_not_computed(study, "drift"))
    else:
        d = t["drift"]
        s.text(
            "Beyond the study (the tracker's drift instrument): per layer the mean attention entropy (nats) and "
            "the linear CKA of the layer's representations against the initial model (1: unchanged), per module "
            "the norm of the weight update since the start, and its total. Per run the layer mean of attention "
            "entropy and CKA; mean ± sd and 95% t interval over seeds per condition, so per method and learning "
            "rate. " + _instrument_settings_text(study, "drift") + " Runs with different drift settings (sample "
            "size, attention implementation) are never pooled."
        )
        for n in I.instrument_notes(study.runs, "drift"):
            s.note(n)
        s.blocks.append(
            _table(
                "drift",
                "Drift per condition and tracking step",
                t,
                "Shown: each quantity at the last tracking point (mean ± sd over seeds); the CSV has every step.",
                display=_at_ends(d, _settings_column(d), "quantity", "value", list(I.DRIFT_QUANTITIES)),
            )
        )
        s.blocks.append(
            _table(
                "drift_layers",
                "Drift per layer and module at the last point",
                t,
                "final: the value at each run's last instrument point; change: final minus the first point's; "
                "mean ± sd over seeds.",
                display=_instrument_display(t["drift_layers"]),
                inline=False,
            )
        )
        if figs.get("drift"):
            s.blocks.append(
                FigureItem(
                    "drift",
                    figs["drift"],
                    "Drift over training by method (line colour and style) at each learning rate (one row per "
                    "model, dataset and learning rate, main setting): layer-mean attention entropy, layer-mean CKA "
                    "against the initial model and total weight-update norm; mean over seeds, band: 95% t interval "
                    "over seeds.",
                )
            )
        if "drift_delta" in t:
            measures = "; ".join(f"{k}: {v}" for k, v in I.DRIFT_MEASURES.items())
            s.text(
                "Does a run that drifts more un-learn its contested examples more? Per run, its final drift "
                f"({measures}) against the mean ΔL of its contested train examples (loss at the last tracking "
                "point minus the first, as in section 3). Spearman rho over runs (scipy.stats.spearmanr, "
                "two-sided p) within each instrument setting, over all runs and within each method (methods "
                "differ in both, so the pooled rho mostly compares methods); needs three runs."
                + _pooled_settings_text(study.runs, t["drift_delta_runs"])
            )
            s.blocks.append(
                _table(
                    "drift_delta",
                    "Drift vs contested ΔL: Spearman rho over runs",
                    t,
                    display=_instrument_display(t["drift_delta"]),
                )
            )
            s.blocks.append(
                _table(
                    "drift_delta_runs",
                    "Drift and contested ΔL per run",
                    t,
                    display=_instrument_display(t["drift_delta_runs"]),
                    inline=False,
                )
            )
            if figs.get("drift_delta"):
                s.blocks.append(
                    FigureItem(
                        "drift_delta",
                        figs["drift_delta"],
                        "Each run's final drift against its contested examples' mean ΔL (> 0: un-learning), "
                        "coloured by method; title: Spearman rho over all runs.",
                    )
                )
    sections.append(s)
    return sections


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _render_markdown(sections: Sequence[Section], header: str, folder: str) -> str:
    lines = [header, ""]
    lines.append("Contents: " + " · ".join(f"[{s.title}](#{_anchor(s.title)})" for s in sections))
    for s in sections:
        lines += ["", f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, str):
                lines += [b, ""]
            elif isinstance(b, TableItem):
                links = f"([markdown](tables/{b.name}.md), [CSV](tables/{b.name}.csv))"
                lines += [f"**{b.title}** {links}", ""]
                if b.caption:
                    lines += [b.caption, ""]
                if b.frame.empty:
                    lines += ["(empty)", ""]
                elif b.inline:
                    lines += [markdown_table(b.shown()), ""]
                else:
                    lines += [f"{len(b.frame)} rows: see the linked files.", ""]
            elif isinstance(b, FigureItem):
                for p in b.paths:
                    rel = os.path.relpath(p, folder)
                    lines += [f"![{b.name}]({rel})", ""]
                lines += [f"*{b.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _anchor(title: str) -> str:
    keep = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -")
    return keep.strip().replace(" ", "-")


def _render_html(sections: Sequence[Section], header: str, folder: str) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Annotation entropy report</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;line-height:1.4}"
        "table{border-collapse:collapse;font-size:0.8em;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:right}th{background:#f0f0f0}td:first-child{text-align:left}img{max-width:100%}"
        ".note{color:#8a4b00}</style></head><body>",
    ]
    head, *rest = header.split("\n")
    parts.append(f"<h1>{esc(head.lstrip('# '))}</h1>")
    parts += [f"<p>{esc(line)}</p>" for line in rest if line.strip()]
    parts.append("<p>" + " · ".join(f"<a href='#{_anchor(s.title)}'>{esc(s.title)}</a>" for s in sections) + "</p>")
    for s in sections:
        parts.append(f"<h2 id='{_anchor(s.title)}'>{esc(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, str):
                if b.startswith("Warnings:"):
                    items = "".join(f"<li>{esc(x[2:])}</li>" for x in b.split("\n")[1:])
                    parts.append(f"<p class='note'>Warnings:</p><ul class='note'>{items}</ul>")
                else:
                    cls = " class='note'" if b.startswith("Note:") else ""
                    parts.append(f"<p{cls}>{esc(b)}</p>")
            elif isinstance(b, TableItem):
                parts.append(
                    f"<h3>{esc(b.title)} <small>(<a href='tables/{b.name}.md'>markdown</a>, "
                    f"<a href='tables/{b.name}.csv'>CSV</a>)</small></h3>"
                )
                if b.caption:
                    parts.append(f"<p>{esc(b.caption)}</p>")
                if b.frame.empty:
                    parts.append("<p>(empty)</p>")
                elif b.inline:
                    parts.append(b.shown().to_html(index=False, escape=True, border=0))
                else:
                    parts.append(f"<p>{len(b.frame)} rows: see the linked files.</p>")
            elif isinstance(b, FigureItem):
                for p in b.paths:
                    parts.append(f"<p><img src='{esc(os.path.relpath(p, folder))}' alt='{esc(b.name)}'></p>")
                parts.append(f"<p><em>{esc(b.caption)}</em></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _write_tables(sections: Sequence[Section], folder: str) -> List[str]:
    os.makedirs(os.path.join(folder, "tables"), exist_ok=True)
    written = []
    for s in sections:
        for b in s.blocks:
            if not isinstance(b, TableItem):
                continue
            csv = os.path.join(folder, "tables", f"{b.name}.csv")
            b.frame.to_csv(csv, index=False)
            md = os.path.join(folder, "tables", f"{b.name}.md")
            body = markdown_table(b.shown()) if not b.frame.empty else "(empty)"
            with open(md, "w") as fh:
                fh.write(f"# {b.title}\n\n{b.caption}\n\n{body}\n" if b.caption else f"# {b.title}\n\n{body}\n")
            written += [csv, md]
    return written


@dataclass
class Report:
    """What `build_report` wrote."""

    folder: str
    index: str
    tables: Dict[str, pd.DataFrame]
    figures: Dict[str, List[str]]
    notes: List[str]
    timings: Dict[str, float]


class ReportFolderError(FileExistsError):
    """The report's ``--out`` folder cannot be (re)placed safely; the message names it and why."""


def _is_marked(folder: str) -> bool:
    try:
        with open(os.path.join(folder, REPORT_MARKER)) as fh:
            return fh.readline().strip() == REPORT_TAG
    except (OSError, UnicodeDecodeError):
        return False


def _is_legacy_report(folder: str) -> bool:
    """A report written before the marker existed: index.md and nothing but a report's own files."""
    names = set(os.listdir(folder))
    if "index.md" not in names:
        return False
    for name in names:
        path = os.path.join(folder, name)
        if name in _LEGACY_FILES and os.path.isfile(path) and not os.path.islink(path):
            continue
        if name in _LEGACY_DIRS and os.path.isdir(path) and not os.path.islink(path):
            for sub in os.listdir(path):
                subpath = os.path.join(path, sub)
                if not (sub.endswith(_LEGACY_DIRS[name]) and os.path.isfile(subpath) and not os.path.islink(subpath)):
                    return False
            continue
        return False
    return True


def _holds_run(folder: str) -> Optional[str]:
    for root, _dirs, files in os.walk(folder):
        if "run_config.json" in files:
            return root
    return None


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (both resolved real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_inputs(target: str, inputs: Sequence[str]) -> None:
    """Refuse a target that is, lies inside or holds one of the run folders given as input."""
    real = os.path.realpath(target)
    for given in inputs:
        folder = os.path.realpath(given)
        if real == folder:
            raise ReportFolderError(
                f"{target}: is the run folder {given} given as input; refusing to write the report there "
                "(it would replace the runs). Choose a report folder outside the run folders."
            )
        if _inside(real, folder):
            raise ReportFolderError(
                f"{target}: lies inside the run folder {given} given as input; refusing to write the report there. "
                f"Choose a report folder outside the run folders, e.g. {os.path.join(os.path.dirname(folder), 'report')}."
            )
        if _inside(folder, real):
            raise ReportFolderError(
                f"{target}: holds the run folder {given} given as input; refusing to replace it. "
                "Choose a report folder outside the run folders."
            )


def _check_target(target: str, inputs: Sequence[str] = ()) -> None:
    """Refuse a target the writer may not replace (see the module docstring); an older report is fine."""
    _check_inputs(target, inputs)
    if os.path.islink(target):
        raise ReportFolderError(f"{target}: is a symbolic link; refusing to replace it (pass the folder it points to)")
    if not os.path.exists(target):
        return
    if not os.path.isdir(target):
        raise ReportFolderError(f"{target}: exists and is not a folder; refusing to replace it")
    if not os.listdir(target):
        return
    if _is_marked(target) or _is_legacy_report(target):
        run = _holds_run(target)
        if run:
            raise ReportFolderError(f"{target}: is a report folder but now holds a run ({run}); refusing to replace it")
        return
    raise ReportFolderError(
        f"{target}: folder is not empty and holds no {REPORT_MARKER} (it is not a report written by "
        "`hf-entropy-report` / `python -m analysis`); refusing to replace it. Choose a new or empty folder."
    )


def _write_marker(folder: str) -> None:
    with open(os.path.join(folder, REPORT_MARKER), "w") as fh:
        fh.write(
            f"{REPORT_TAG}\nformat {REPORT_FORMAT_VERSION}\n"
            "This folder was written by `hf-entropy-report` (`python -m analysis`) and is replaced as a whole by the next report "
            "written to it.\n"
        )


def _make_temp(target: str) -> str:
    """The hidden folder beside `target` the report is built in (after removing a killed build's leftovers)."""
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temporaries(target)
        tmp = tempfile.mkdtemp(dir=parent, prefix=temp_name_prefix(target, "tmp"))
    except OSError as err:
        hint = ""
        if err.errno == errno.ENAMETOOLONG:
            hint = (
                f" (the folder name has {len(os.path.basename(target))} characters; with the temporary folder's "
                "suffix it exceeds the file system's limit per name, usually 255 bytes: choose a shorter name)"
            )
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = f" ({parent} is not writable: choose a folder you can write to)"
        else:
            hint = f" (in {parent}: choose a folder you can write to)"
        raise ReportFolderError(f"{target}: cannot create the report folder: {err.strerror or err}{hint}") from None
    try:
        apply_umask(tmp, directory=True)
        _write_marker(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _replace_folder(tmp: str, target: str, inputs: Sequence[str] = ()) -> None:
    """Move the finished report `tmp` to `target`, replacing an older report but nothing else."""
    _check_target(target, inputs)
    if os.path.exists(target):
        old = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=temp_name_prefix(target, "old"))
        os.rmdir(old)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)  # put the old report back rather than leave no report
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def build_report(
    paths: Sequence[str],
    out_dir: str,
    alpha: float = T.ALPHA,
    train_set: str = "train",
    validation_set: Optional[str] = "validation",
    html_index: bool = True,
    progress: Optional[bool] = None,
    skip_invalid: bool = False,
    options: Optional[Options] = None,
    family: str = "main",
    main_ranks=MAIN_RANKS,
    workers: Optional[int] = 1,
) -> Report:
    """Load every run below `paths` and write the full report to `out_dir`.

    Parameters
    ----------
    paths : sequence of str
        Folders holding run directories (searched recursively).
    out_dir : str
        The report folder (created; an older report there is replaced; see the module docstring for
        what is refused).
    alpha : float
        Significance level of the significance flags.
    train_set, validation_set : str
        Tracked set names for trajectories and for validation accuracy.
    html_index : bool
        Also write index.html.
    progress : bool or None
        tqdm progress bar while loading (None: on a terminal only).
    skip_invalid : bool
        Skip runs that cannot be read (listed in the report) instead of failing.
    options : Options, optional
        Bootstrap count and seed, ECE bins, cartography points (`hf_entropy_callback.study.loading.Options`).
    family : {"main", "all"}
        Correction family of the condition test (`hf_entropy_callback.study.tables.rho_by_condition`).
    main_ranks : sequence of int
        LoRA ranks of the main matrix (for ``family="main"``).
    workers : int or None
        Processes that load the runs (`hf_entropy_callback.study.loading.load_study`): 1 (default) none,
        0 or None one per CPU for large studies. The report does not depend on it.

    Returns
    -------
    report : Report

    Raises
    ------
    NoRunsFoundError, RunFormatError
        No runs, or a run that cannot be read (unless `skip_invalid`).
    ReportFolderError
        `out_dir` may not be replaced (see the module docstring) or cannot be created.
    """
    timings = {}
    out_dir = os.path.abspath(out_dir)
    # Fail before the work, not after it: the target, every input and every run found must be safe.
    _check_target(out_dir, paths)
    run_dirs = [os.path.dirname(d) if os.path.basename(d) == TRACKING_DIRNAME else d for d in discover_runs(paths)[0]]
    inputs = list(paths) + run_dirs
    _check_target(out_dir, inputs)
    t0 = time.perf_counter()
    study = load_study(
        paths,
        train_set,
        validation_set,
        progress=progress,
        skip_invalid=skip_invalid,
        options=options,
        main_ranks=main_ranks,
        workers=workers,
    )
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tables = compute_tables(study, alpha, family)
    timings["tables"] = time.perf_counter() - t0

    tmp = _make_temp(out_dir)
    try:
        t0 = time.perf_counter()
        figs = F.all_figures(study, tables, os.path.join(tmp, "figures"))
        timings["figures"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sections = compose(study, tables, figs, alpha, family, main_ranks)
        sections += train_cartography_sections(study, tables, figs, tmp)
        _write_tables(sections, tmp)
        n_fig = sum(len(v) for v in figs.values())
        header = (
            f"# Annotation entropy and per-example learning dynamics: report\n"
            f"{len(study.runs)} runs from {', '.join(map(str, paths))}; {len(tables)} tables, {n_fig} figures; "
            f"built {datetime.datetime.now().isoformat(timespec='seconds')}."
        )
        with open(os.path.join(tmp, "index.md"), "w") as fh:
            fh.write(_render_markdown(sections, header, tmp))
        if html_index:
            with open(os.path.join(tmp, "index.html"), "w") as fh:
                fh.write(_render_html(sections, header, tmp))
        timings["write"] = time.perf_counter() - t0
        _replace_folder(tmp, out_dir, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Paths of figures as they are after the move.
    figs = {k: [os.path.join(out_dir, os.path.relpath(p, tmp)) for p in v] for k, v in figs.items()}
    return Report(out_dir, os.path.join(out_dir, "index.md"), tables, figs, study.notes, timings)
