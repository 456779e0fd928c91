"""The study's figures (PNG), drawn with matplotlib's object API (no pyplot state, Agg canvas).

Every function takes tidy tables from `analysis.loading` / `analysis.tables`, writes one or more
PNG files and returns their paths. Losses and entropies are in nats. Grids are split into pages
of at most `MAX_ROWS` rows so the number of files stays small however many runs there are.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_entropy_callback.entropy import CATEGORIES, DEFAULT_THRESHOLDS

from .conditions import method_label, order_conditions

CATEGORY_COLORS = {"clean": "#1b9e77", "ambiguous": "#7570b3", "contested": "#d95f02", "all": "#555555"}
METHOD_STYLES = {"lora": "-", "ia3": "-.", "full": "--"}
MAX_ROWS = 8
DPI = 110


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _paged(path: str, page: int, pages: int) -> str:
    if pages == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{page + 1}{ext}"


def _x_axis(curves: pd.DataFrame) -> Tuple[str, str]:
    """Epochs when every point has one, else the training progress."""
    if "epoch" in curves and np.isfinite(curves["epoch"].to_numpy(float)).all():
        return "epoch", "epoch"
    return "progress", "training progress (step / last step)"


def condition_curves(curves: pd.DataFrame, run_ids: Sequence[str]) -> pd.DataFrame:
    """Mean loss per category and point over a condition's runs, with a 95% CI band.

    Each run's curve is interpolated onto the first run's progress grid (identical grids are
    unchanged). ``mean`` is the average over runs of the mean loss over examples; ``half_width``
    is the average over runs of 1.96 * sd / sqrt(n) (the 95% CI of a run's mean over examples).
    """
    xcol, _ = _x_axis(curves)
    sub = curves[curves["run_id"].isin(run_ids)]
    if sub.empty:
        return pd.DataFrame(columns=["category", "x", "mean", "half_width"])
    first = sub[sub["run_id"] == run_ids[0]] if (sub["run_id"] == run_ids[0]).any() else sub[
        sub["run_id"] == sub["run_id"].iloc[0]]
    grid = first[first["category"] == first["category"].iloc[0]].sort_values("point")
    prog, xs = grid["progress"].to_numpy(float), grid[xcol].to_numpy(float)
    rows = []
    for cat, cgrp in sub.groupby("category", sort=False):
        means, halves = [], []
        for _, r in cgrp.groupby("run_id", sort=False):
            r = r.sort_values("point")
            p = r["progress"].to_numpy(float)
            means.append(np.interp(prog, p, r["mean"].to_numpy(float)))
            half = 1.96 * r["sd"].to_numpy(float) / np.sqrt(np.maximum(r["n"].to_numpy(float), 1))
            halves.append(np.interp(prog, p, np.nan_to_num(half)))
        rows.append(pd.DataFrame({"category": cat, "x": xs, "mean": np.mean(means, axis=0),
                                  "half_width": np.mean(halves, axis=0)}))
    return pd.concat(rows, ignore_index=True)


def _grid(n_rows: int, n_cols: int, panel_w: float = 3.0, panel_h: float = 2.2, *, sharey=True, left: float = 0.75,
          right: float = 0.2, top: float = 0.95, bottom: float = 0.55, wspace: float = 0.45, hspace: float = 0.85,
          legend_right: float = 0.0):
    """A figure with a grid of panels and fixed margins in inches.

    Fixed margins instead of matplotlib's constrained layout: the layout solver costs seconds on
    grids of dozens of panels, and these grids have uniform labels, so fixed space suffices.
    """
    width = left + right + legend_right + n_cols * panel_w + (n_cols - 1) * wspace
    height = top + bottom + n_rows * panel_h + (n_rows - 1) * hspace
    fig = _new_figure(width, height)
    fig.subplots_adjust(left=left / width, right=1 - (right + legend_right) / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wspace / panel_w, hspace=hspace / panel_h)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey=sharey)
    return fig, axes


def _top_legend(fig: Figure, handles, title: str, ncols: int = 3) -> None:
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncols=ncols, fontsize=8.5,
               title=title, title_fontsize=8.5, frameon=False)


def _few_ticks(ax, x: int = 5, y: int = 5, x_integer: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(x, integer=x_integer))
    ax.yaxis.set_major_locator(MaxNLocator(y))


def _method_column(row) -> str:
    return method_label(row["method"], float(row["rank"]) if pd.notna(row["rank"]) else math.nan)


def trajectory_figures(
    curves: pd.DataFrame, runs: pd.DataFrame, path: str, variants: bool = False
) -> List[str]:
    """Mean tracked loss by entropy category over training, one panel per condition.

    Main setting (``variants=False``): one row per model x dataset, one column per method
    (LoRA ranks, IA3, full FT), so LoRA and full fine-tuning sit side by side. Variants
    (``variants=True``): one row per model x dataset x method, one column per variant, the
    main-setting run first. Lines: mean over examples, averaged over seeds; band: 95% CI of the
    mean over examples, averaged over seeds. Returns the files written (none without data).
    """
    u = runs[~runs["diverged"]]
    if variants:
        groups = u[u["variant"] != "base"][["model", "dataset", "method", "rank"]].drop_duplicates()
        keep = u.merge(groups, on=["model", "dataset", "method", "rank"])
        row_keys, col_key = ["dataset", "model", "method", "rank"], "variant"
    else:
        keep = u[u["variant"] == "base"]
        row_keys, col_key = ["dataset", "model"], "_col"
    if keep.empty or curves.empty:
        return []
    keep = order_conditions(keep.assign(_col=[_method_column(r) for _, r in keep.iterrows()]))
    keep["_row"] = [tuple(r) for r in keep[row_keys].astype(str).itertuples(index=False)]
    if variants:
        cols = ["base"] + sorted(set(keep[col_key]) - {"base"})
    else:
        # Columns by method then rank: LoRA ranks ascending, IA3, full FT.
        order = {"lora": 0, "ia3": 1, "full": 2}
        col_rows = keep.drop_duplicates("_col")
        cols = [c for _, _, c in sorted(zip(col_rows["method"].map(order).fillna(3),
                                            col_rows["rank"].fillna(math.inf), col_rows["_col"]))]
    rows = list(dict.fromkeys(keep["_row"]))
    panels = {key: grp for key, grp in keep.groupby(["_row", col_key], sort=False)}
    _, xlabel = _x_axis(curves)
    pages = math.ceil(len(rows) / MAX_ROWS)
    out = []
    for page in range(pages):
        page_rows = rows[page * MAX_ROWS:(page + 1) * MAX_ROWS]
        fig, axes = _grid(len(page_rows), len(cols), top=0.85)
        for i, rkey in enumerate(page_rows):
            for j, ckey in enumerate(cols):
                ax = axes[i, j]
                sel = panels.get((rkey, ckey))
                if sel is None:
                    ax.set_axis_off()
                    continue
                cc = condition_curves(curves, list(sel["run_id"]))
                for cat in [c for c in CATEGORIES if (cc["category"] == c).any()]:
                    d = cc[cc["category"] == cat]
                    ax.plot(d["x"], d["mean"], color=CATEGORY_COLORS[cat], lw=1.6)
                    ax.fill_between(d["x"], d["mean"] - d["half_width"], d["mean"] + d["half_width"],
                                    color=CATEGORY_COLORS[cat], alpha=0.25, lw=0)
                first = sel.iloc[0]
                title = f"{first['model']} · {first['dataset']}\n{_method_column(first)}"
                if variants:
                    title += f" · {ckey}"
                ax.set_title(f"{title} ({len(sel)} seed{'s' if len(sel) != 1 else ''})", fontsize=8)
                ax.grid(alpha=0.3)
                _few_ticks(ax, x_integer=xlabel == "epoch")
                ax.tick_params(labelsize=7.5, labelleft=True)
                ax.set_xlabel(xlabel, fontsize=8)
                if j == 0:
                    ax.set_ylabel("loss −log p(gold) (nats)", fontsize=8)
        _top_legend(fig, [_line(CATEGORY_COLORS[c], c) for c in CATEGORIES],
                    "entropy category (line: mean over examples and seeds; band: 95% CI of the mean)")
        out.append(_save(fig, _paged(path, page, pages)))
    return out


def _line(color, label, ls="-", marker=None):
    from matplotlib.lines import Line2D

    return Line2D([0], [0], color=color, lw=2, ls=ls, marker=marker, label=label)


def entropy_histogram(entropy: pd.DataFrame, distribution: pd.DataFrame, path: str,
                      thresholds: Tuple[float, float] = DEFAULT_THRESHOLDS) -> List[str]:
    """Histogram of annotation entropy per dataset, stacked by category, thresholds dashed, shares in the legend."""
    if entropy.empty:
        return []
    data = entropy.drop_duplicates(["dataset", "example_id"])
    datasets = sorted(data["dataset"].unique())
    fig, axes = _grid(1, len(datasets), 4.6, 3.2, sharey=False, top=0.45, wspace=0.7)
    hmax = max(math.log(3), float(data["entropy"].max()))
    bins = np.linspace(0, hmax * 1.0001, 31)
    for ax, ds in zip(axes[0], datasets):
        d = data[data["dataset"] == ds]
        dist = distribution[distribution["dataset"] == ds].set_index("category")
        cats = [c for c in CATEGORIES if (d["category"] == c).any()]
        labels = [f"{c}: {dist.loc[c, 'share']:.1%} (n={int(dist.loc[c, 'n'])})" for c in cats]
        ax.hist([d.loc[d["category"] == c, "entropy"] for c in cats], bins=bins, stacked=True,
                color=[CATEGORY_COLORS[c] for c in cats], label=labels, edgecolor="white", linewidth=0.4)
        for t in thresholds:
            ax.axvline(t, color="black", ls="--", lw=1)
            ax.text(t, ax.get_ylim()[1] * 0.5, f"H = {t:g} ", fontsize=7.5, rotation=90, ha="right", va="center")
        ax.set_title(f"{ds}: {len(d)} tracked examples (all sets)", fontsize=9.5)
        ax.set_xlabel("annotation entropy H (nats)", fontsize=8.5)
        ax.set_ylabel("examples", fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7.5, loc="best", title="category: share", title_fontsize=7.5)
        ax.grid(alpha=0.3, axis="y")
    return [_save(fig, path)]


def _condition_colors(labels: Sequence[str]) -> Dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {lab: cmap(i % 20) for i, lab in enumerate(labels)}


def aulc_bins_figure(binning: pd.DataFrame, path: str) -> List[str]:
    """Mean AULC per entropy bin (fixed categories, quartiles, terciles), one line per main-setting condition.

    Error bars: sd across seeds; line style by method (LoRA solid, IA3 dash-dot, full FT dashed).
    One row of panels per dataset.
    """
    if binning.empty:
        return []
    b = binning[binning["variant"] == "base"] if "variant" in binning else binning
    if b.empty:
        b = binning
    datasets = sorted(b["dataset"].unique()) if "dataset" in b else [None]
    schemes = [("fixed", "fixed categories"), ("quartile", "quartile bins"), ("tercile", "tercile bins")]
    conds = list(dict.fromkeys(b["condition"]))
    colors = _condition_colors(conds)
    method_of = dict(zip(b["condition"], b["method"])) if "method" in b else {}
    fig, axes = _grid(len(datasets), 3, 3.2, 2.8, sharey=False, top=0.35, legend_right=3.4)
    for i, ds in enumerate(datasets):
        d = b if ds is None else b[b["dataset"] == ds]
        for j, (scheme, title) in enumerate(schemes):
            ax = axes[i, j]
            for cond, g in d[d["scheme"] == scheme].groupby("condition", sort=False):
                g = g.sort_values("bin_order")
                ax.errorbar(g["bin"], g["aulc_mean"], yerr=g["aulc_sd"].fillna(0), color=colors[cond],
                            ls=METHOD_STYLES.get(method_of.get(cond), ":"), marker="o", ms=3, lw=1.2, capsize=2)
            ax.set_title(f"{ds} · {title}" if ds else title, fontsize=9)
            ax.set_xlabel("entropy bin (low → high)", fontsize=8)
            ax.set_ylabel("mean AULC (nats)", fontsize=8)
            ax.tick_params(labelsize=7.5)
            ax.grid(alpha=0.3)
    handles = [_line(colors[c], c, METHOD_STYLES.get(method_of.get(c), ":")) for c in conds]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1 - 3.35 / fig.get_figwidth(), 0.5), fontsize=7,
               title="condition (error bars: sd over seeds)", title_fontsize=7.5, frameon=False)
    return [_save(fig, path)]


def rank_figure(runs: pd.DataFrame, path: str) -> List[str]:
    """Spearman rho against LoRA rank per model (error bars: sd across seeds), encoders vs decoders.

    One panel per dataset; encoders solid, decoders dashed; a model's full fine-tuning is drawn
    at the right end ("full"). Uses the main-setting runs of every model with a LoRA run.
    """
    from .tables import mean_sd

    u = runs[(~runs["diverged"]) & (runs["variant"] == "base")]
    lora = u[(u["method"] == "lora") & u["rank"].notna()]
    if lora.empty:
        return []
    stats_ = mean_sd(u[u["method"].isin(["lora", "full"])], ["dataset", "architecture", "model", "method", "rank"],
                     ["rho"])
    datasets = sorted(lora["dataset"].unique())
    ranks = sorted(lora["rank"].unique())
    full_x = ranks[-1] * 2.0
    fig, axes = _grid(1, len(datasets), 4.6, 3.4, sharey=True, top=0.45, wspace=0.9)
    enc_colors = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#8c564b"]
    dec_colors = ["#d62728", "#ff7f0e", "#e377c2", "#bcbd22"]
    for ax, ds in zip(axes[0], datasets):
        d = stats_[stats_["dataset"] == ds]
        ie = idc = 0
        for (arch, model), g in d.groupby(["architecture", "model"], sort=True):
            if arch == "decoder":
                color, ls, idc = dec_colors[idc % len(dec_colors)], "--", idc + 1
            else:
                color, ls, ie = enc_colors[ie % len(enc_colors)], "-", ie + 1
            gl = g[g["method"] == "lora"].sort_values("rank")
            if gl.empty:
                continue
            ax.errorbar(gl["rank"], gl["rho_mean"], yerr=gl["rho_sd"].fillna(0), color=color, ls=ls, marker="o",
                        capsize=3, lw=1.5, label=f"{model} ({arch})")
            gf = g[g["method"] == "full"]
            if len(gf):
                ax.errorbar([full_x], gf["rho_mean"], yerr=gf["rho_sd"].fillna(0), color=color, marker="s",
                            capsize=3, ls="none")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ranks) + [full_x], [str(int(r)) for r in ranks] + ["full"])
        ax.minorticks_off()
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"{ds}: rho vs LoRA rank", fontsize=9.5)
        ax.set_xlabel("LoRA rank r (log scale); square: full fine-tuning", fontsize=8.5)
        ax.set_ylabel("Spearman rho(entropy, AULC)", fontsize=8.5)
        ax.tick_params(labelsize=8, labelleft=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", title="error bars: sd over seeds", title_fontsize=7)
    return [_save(fig, path)]


def cartography_figures(examples: pd.DataFrame, runs: pd.DataFrame, path: str, ncols: int = 4) -> List[str]:
    """Dataset-Cartography maps (variability x, confidence y) coloured by entropy category.

    One panel per main-setting condition, drawn from its lowest-seed usable run.
    """
    u = runs[(~runs["diverged"]) & (runs["variant"] == "base")]
    if u.empty or examples.empty:
        return []
    first = order_conditions(u.sort_values("seed", kind="stable").drop_duplicates("condition"))
    by_run = {k: g for k, g in examples.groupby("run_id", sort=False)}
    per_page = MAX_ROWS * ncols
    pages = math.ceil(len(first) / per_page)
    out = []
    for page in range(pages):
        sel = first.iloc[page * per_page:(page + 1) * per_page]
        nrows = math.ceil(len(sel) / ncols)
        fig, axes = _grid(nrows, min(ncols, len(sel)), 2.8, 2.5, sharey=True, top=0.8)
        flat = axes.ravel()
        for ax, r in zip(flat, sel.itertuples(index=False)):
            ex = by_run.get(r.run_id, examples.iloc[:0])
            for cat in CATEGORIES:
                d = ex[ex["category"] == cat]
                ax.scatter(d["variability"], d["confidence"], s=3, alpha=0.5, color=CATEGORY_COLORS[cat], lw=0)
            seed = "" if pd.isna(r.seed) else f", seed {int(r.seed)}"
            ax.set_title(f"{r.model} · {r.dataset}\n{method_label(r.method, r.rank)}{seed}", fontsize=8)
            ax.set_xlabel("variability (sd of p(gold))", fontsize=7.5)
            ax.set_ylabel("confidence (mean p(gold))", fontsize=7.5)
            _few_ticks(ax, 4, 5)
            ax.tick_params(labelsize=7, labelleft=True)
            ax.grid(alpha=0.3)
        for ax in flat[len(sel):]:
            ax.set_axis_off()
        _top_legend(fig, [_line(CATEGORY_COLORS[c], c, ls="none", marker="o") for c in CATEGORIES], "entropy category")
        out.append(_save(fig, _paged(path, page, pages)))
    return out


def calibration_figure(cal: pd.DataFrame, path: str) -> List[str]:
    """Mean prediction entropy, mean max confidence and ECE per category at the final point.

    Rows: tracked sets (validation first); columns: the three measures; horizontal bars per
    condition, one per category; error bars: sd across seeds.
    """
    if cal.empty:
        return []
    c = cal[cal["category"] != "all"]
    sets = [s for s in ("validation", "train") if (c["set"] == s).any()] + sorted(
        set(c["set"]) - {"validation", "train"})
    conds = list(dict.fromkeys(c["condition"]))
    measures = [("pred_entropy", "prediction entropy (nats)"), ("max_confidence", "mean max confidence"),
                ("ece", "ECE (10 bins)")]
    longest = max(len(x) for x in conds)
    fig, axes = _grid(len(sets), 3, 2.6, max(1.5, 0.3 * len(conds)), sharey=False, top=0.8, hspace=0.8,
                      left=0.3 + 0.058 * longest, wspace=0.3)
    y = np.arange(len(conds))
    w = 0.27
    for i, s in enumerate(sets):
        d = c[c["set"] == s]
        for j, (m, label) in enumerate(measures):
            ax = axes[i, j]
            for k, cat in enumerate(CATEGORIES):
                dc = d[d["category"] == cat].set_index("condition").reindex(conds)
                ax.barh(y + (k - 1) * w, dc[f"{m}_mean"], height=w, xerr=dc[f"{m}_sd"].fillna(0),
                        color=CATEGORY_COLORS[cat], error_kw={"lw": 0.6, "capsize": 1.2})
            ax.set_yticks(y, conds if j == 0 else [""] * len(conds), fontsize=7)
            ax.set_ylim(len(conds) - 0.5, -0.5)
            ax.set_xlabel(label, fontsize=8)
            ax.set_title(f"{s} set, final point", fontsize=8.5)
            ax.grid(alpha=0.3, axis="x")
            _few_ticks(ax, 4, len(conds) + 1)
            ax.tick_params(axis="x", labelsize=7.5)
    _top_legend(fig, [_line(CATEGORY_COLORS[k], k) for k in CATEGORIES], "entropy category (error bars: sd over seeds)")
    return [_save(fig, path)]


def noise_figure(levels: pd.DataFrame, path: str) -> List[str]:
    """rho(entropy, AULC) and mean Delta L per category against the label-noise level (error bars: sd over seeds)."""
    if levels.empty:
        return []
    keys = [k for k in ("model", "method", "rank", "dataset", "composition", "loss") if k in levels]
    groups = list(levels.groupby(keys, dropna=False, sort=False))
    fig, axes = _grid(len(groups), 2, 3.6, 2.6, sharey=False, top=0.5, wspace=0.8)
    for i, (key, g) in enumerate(groups):
        allc = g[g["category"] == "all"].sort_values("label_noise")
        ax = axes[i, 0]
        ax.errorbar(allc["label_noise"] * 100, allc["rho_mean"], yerr=allc["rho_sd"].fillna(0), marker="o",
                    capsize=3, color="#333333")
        ax.set_xlabel("label noise on clean examples (%)", fontsize=8)
        ax.set_ylabel("Spearman rho(entropy, AULC)", fontsize=8)
        meta = dict(zip(keys, key))
        ax.set_title(f"{meta.get('model')} · {method_label(meta.get('method'), meta.get('rank', math.nan))} · "
                     f"{meta.get('dataset')}", fontsize=8.5)
        ax.grid(alpha=0.3)
        ax = axes[i, 1]
        for cat in CATEGORIES:
            d = g[g["category"] == cat].sort_values("label_noise")
            if len(d):
                ax.errorbar(d["label_noise"] * 100, d["delta_loss_mean"], yerr=d["delta_loss_sd"].fillna(0),
                            marker="o", capsize=3, color=CATEGORY_COLORS[cat], label=cat)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("label noise on clean examples (%)", fontsize=8)
        ax.set_ylabel("mean ΔL (nats; > 0: un-learning)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        for a in axes[i]:
            a.tick_params(labelsize=7.5)
    return [_save(fig, path)]


def all_figures(study, tables: Dict[str, pd.DataFrame], folder: str) -> Dict[str, List[str]]:
    """Draw every figure into `folder`; returns, per figure name, the files written (empty when not applicable)."""
    j = os.path.join
    return {
        "trajectories": trajectory_figures(study.curves, study.runs, j(folder, "trajectories.png")),
        "trajectories_variants": trajectory_figures(study.curves, study.runs, j(folder, "trajectories_variants.png"),
                                                    variants=True),
        "entropy_histogram": entropy_histogram(study.entropy, tables["entropy_distribution"],
                                               j(folder, "entropy_histogram.png")),
        "aulc_bins": aulc_bins_figure(tables["binning"], j(folder, "aulc_bins.png")),
        "rho_vs_rank": rank_figure(study.runs, j(folder, "rho_vs_rank.png")),
        "noise": noise_figure(tables["noise_levels"], j(folder, "noise.png")),
        "cartography": cartography_figures(study.examples, study.runs, j(folder, "cartography.png")),
        "calibration": calibration_figure(tables["calibration"], j(folder, "calibration.png")),
    }
