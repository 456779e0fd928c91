"""The study's figures, drawn with matplotlib's object API (no pyplot state).

Two layers, as in seaborn: *panel* functions (``*_panel``) draw one panel into a given axes
(``ax=``, a new figure when omitted) and return that axes; *plot* functions (``*_plot``,
`entropy_histogram`) lay panels out in a grid, into a given figure or sequence of axes
(``axes=``) or a new figure, and return the figure, or None when there is nothing to draw.
Neither writes anything: `save_figure` does, and `all_figures` draws and saves the report's set.
Every function takes tidy tables from `hf_entropy_callback.study.loading` / `hf_entropy_callback.study.tables`, data first and
options keyword-only. Losses and entropies are in nats. The report's grids are split into pages
of at most `MAX_ROWS` rows so the number of files stays small however many runs there are.

Examples
--------
A panel in a layout of one's own (here two panels side by side), then saved:

>>> import os, tempfile
>>> binning = pd.DataFrame({"condition": "LoRA r=8", "method": "lora", "scheme": "fixed",
...                         "bin": ["clean", "ambiguous", "contested"], "bin_order": [0, 1, 2],
...                         "aulc_mean": [0.3, 0.6, 0.9], "aulc_sd": 0.05})
>>> fig = Figure(figsize=(8, 3))
>>> left, right = fig.subplots(1, 2)
>>> aulc_bins_panel(binning, ax=right) is right
True
>>> len(right.lines) > 0, len(left.lines)
(True, 0)
>>> path = save_figure(fig, os.path.join(tempfile.mkdtemp(), "figure2.png"))
>>> os.path.getsize(path) > 0
True
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hf_entropy_callback.entropy import CATEGORIES, DEFAULT_THRESHOLDS

from .conditions import (
    METHOD_SETTINGS,
    VARIANT_SETTINGS,
    method_label,
    order_conditions,
    setting_families,
    setting_text,
)

__all__ = [
    "save_figure",
    "all_figures",
    "condition_curves",
    "trajectory_panel",
    "trajectory_plot",
    "entropy_histogram_panel",
    "entropy_histogram",
    "aulc_bins_panel",
    "aulc_bins_plot",
    "rank_panel",
    "rank_plot",
    "cartography_panel",
    "cartography_plot",
    "calibration_panel",
    "calibration_plot",
    "noise_rho_panel",
    "noise_delta_panel",
    "noise_plot",
    "entropy_aulc_panel",
    "entropy_aulc_plot",
    "agreement_curves",
    "alignment_panel",
    "alignment_plot",
    "grad_norm_panel",
    "grad_norm_plot",
    "drift_panel",
    "drift_plot",
    "drift_delta_panel",
    "drift_delta_plot",
    "instrument_figures",
]

CATEGORY_COLORS = {"clean": "#1b9e77", "ambiguous": "#7570b3", "contested": "#d95f02", "all": "#555555"}
METHOD_STYLES = {"lora": "-", "ia3": "-.", "full": "--"}
MAX_ROWS = 8
DPI = 110


def _excluded(runs: pd.DataFrame) -> pd.Series:
    """Runs kept out of every aggregate (diverged, incomplete history), as `load_study` marks them."""
    return runs["excluded"] if "excluded" in runs else runs["diverged"]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Union[Figure, Axes], path: str, *, dpi: int = DPI) -> str:
    """Write a figure (or the figure of an axes) to `path`, creating its folder; returns `path`.

    The format follows the file extension (PNG, PDF, SVG, ...).
    """
    fig = fig.figure if isinstance(fig, Axes) else fig
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _new_axes(width: float = 4.6, height: float = 3.2) -> Axes:
    return _new_figure(width, height).add_subplot()


def _grid_into(axes, n_rows: int, n_cols: int, what: str, **grid_kw):
    """(figure, 2-d array of axes, whether we made the figure) for a grid of panels.

    `axes` is None (a new figure with the report's fixed margins), a `Figure` (the grid is added
    to it) or a sequence of axes with exactly ``n_rows * n_cols`` elements, taken row by row.
    """
    if axes is None:
        fig, grid = _grid(n_rows, n_cols, **grid_kw)
        return fig, grid, True
    if isinstance(axes, Figure):
        return axes, axes.subplots(n_rows, n_cols, squeeze=False, sharey=grid_kw.get("sharey", True)), False
    flat = np.asarray(axes, dtype=object).ravel()
    if flat.size != n_rows * n_cols or not all(isinstance(a, Axes) for a in flat):
        raise ValueError(
            f"{what}: needs {n_rows} x {n_cols} = {n_rows * n_cols} panels, got {flat.size} "
            f"(pass a Figure, or that many axes)"
        )
    return flat[0].figure, flat.reshape(n_rows, n_cols), False


def _grid_legend(fig: Figure, grid, own: bool, handles, title: str, **kw) -> None:
    """The report's legend above the grid; on a caller's figure, inside the first panel instead, so
    as not to draw over their layout."""
    if own:
        _top_legend(fig, handles, title, **kw)
    else:
        grid.flat[0].legend(handles=handles, title=title, fontsize=7, title_fontsize=7)


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
    first = (
        sub[sub["run_id"] == run_ids[0]]
        if (sub["run_id"] == run_ids[0]).any()
        else sub[sub["run_id"] == sub["run_id"].iloc[0]]
    )
    grid = first[first["category"] == first["category"].iloc[0]].sort_values("point")
    prog, xs = grid["progress"].to_numpy(float), grid[xcol].to_numpy(float)
    # Each (category, run) curve by positions into plain arrays (categories and, within each, runs in
    # order of appearance), sorted by point: no frame per run.
    point, progress = sub["point"].to_numpy(), sub["progress"].to_numpy(float)
    mean, sd, n = sub["mean"].to_numpy(float), sub["sd"].to_numpy(float), sub["n"].to_numpy(float)
    cat_code, cat_names = pd.factorize(sub["category"].to_numpy())  # codes in order of first appearance
    run_code, _ = pd.factorize(sub["run_id"].to_numpy())
    rows = []
    for c, cat in enumerate(cat_names):
        in_cat = np.flatnonzero(cat_code == c)
        means, halves = [], []
        for r in pd.unique(run_code[in_cat]):
            if r < 0:
                continue  # a missing run id (grouping leaves those out too)
            idx = in_cat[run_code[in_cat] == r]
            idx = idx[np.argsort(point[idx])]
            p = progress[idx]
            means.append(np.interp(prog, p, mean[idx]))
            half = 1.96 * sd[idx] / np.sqrt(np.maximum(n[idx], 1))
            halves.append(np.interp(prog, p, np.nan_to_num(half)))
        rows.append(
            pd.DataFrame(
                {"category": cat, "x": xs, "mean": np.mean(means, axis=0), "half_width": np.mean(halves, axis=0)}
            )
        )
    return pd.concat(rows, ignore_index=True)


def _grid(
    n_rows: int,
    n_cols: int,
    panel_w: float = 3.0,
    panel_h: float = 2.2,
    *,
    sharey=True,
    left: float = 0.75,
    right: float = 0.2,
    top: float = 0.95,
    bottom: float = 0.55,
    wspace: float = 0.45,
    hspace: float = 0.85,
    legend_right: float = 0.0,
):
    """A figure with a grid of panels and fixed margins in inches.

    Fixed margins instead of matplotlib's constrained layout: the layout solver costs seconds on
    grids of dozens of panels, and these grids have uniform labels, so fixed space suffices.
    """
    width = left + right + legend_right + n_cols * panel_w + (n_cols - 1) * wspace
    height = top + bottom + n_rows * panel_h + (n_rows - 1) * hspace
    fig = _new_figure(width, height)
    fig.subplots_adjust(
        left=left / width,
        right=1 - (right + legend_right) / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=wspace / panel_w,
        hspace=hspace / panel_h,
    )
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey=sharey)
    return fig, axes


def _top_legend(fig: Figure, handles, title: str, ncols: int = 3) -> None:
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=ncols,
        fontsize=8.5,
        title=title,
        title_fontsize=8.5,
        frameon=False,
    )


def _few_ticks(ax, x: int = 5, y: int = 5, x_integer: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(x, integer=x_integer))
    ax.yaxis.set_major_locator(MaxNLocator(y))


def _method_column(row) -> str:
    return method_label(row["method"], float(row["rank"]) if pd.notna(row["rank"]) else math.nan)


def _line(color, label, ls="-", marker=None):
    from matplotlib.lines import Line2D

    return Line2D([0], [0], color=color, lw=2, ls=ls, marker=marker, label=label)


def _one(frame: pd.DataFrame, column: str, value, what: str):
    """`value`, or the only value of `column`; an error naming the choices when there are several."""
    if value is not None or column not in frame:
        return value
    values = sorted(frame[column].dropna().unique())
    if len(values) > 1:
        raise ValueError(f"{what}: the data hold several {column}s ({', '.join(map(str, values))}); pass {column}=")
    return values[0] if values else None


# ------------------------------------------------------------------------------------------------
# Trajectories
# ------------------------------------------------------------------------------------------------


def trajectory_panel(
    curves: pd.DataFrame,
    run_ids: Sequence[str],
    *,
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
    ylabel: str = "loss −log p(gold) (nats)",
) -> Axes:
    """Mean tracked loss by entropy category over training for one condition (its runs `run_ids`).

    Lines: mean over examples, averaged over the runs; bands: 95% CI of the mean over examples,
    averaged over the runs (see `condition_curves`). Returns the axes drawn into.
    """
    ax = ax if ax is not None else _new_axes(3.6, 2.8)
    _, xlabel = _x_axis(curves)
    cc = condition_curves(curves, list(run_ids))
    for cat in [c for c in CATEGORIES if (cc["category"] == c).any()]:
        d = cc[cc["category"] == cat]
        ax.plot(d["x"], d["mean"], color=CATEGORY_COLORS[cat], lw=1.6, label=cat)
        ax.fill_between(
            d["x"],
            d["mean"] - d["half_width"],
            d["mean"] + d["half_width"],
            color=CATEGORY_COLORS[cat],
            alpha=0.25,
            lw=0,
        )
    if title is not None:
        ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    _few_ticks(ax, x_integer=xlabel == "epoch")
    ax.tick_params(labelsize=7.5, labelleft=True)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    return ax


def _trajectory_layout(curves: pd.DataFrame, runs: pd.DataFrame, variants: bool):
    """(row keys, column keys, {(row, column): runs}) of the trajectory grid, or None without data.

    A panel averages the runs of one condition only: a row is a setting family
    (`hf_entropy_callback.study.conditions.setting_families`), so conditions that differ in a setting other
    than what the columns vary (bulk size, learning rate, ...) get rows of their own, whose ``settings``
    name that difference.
    """
    u = runs[~_excluded(runs)]
    if variants:
        groups = u[u["variant"] != "base"][["model", "dataset", "method", "rank"]].drop_duplicates()
        keep = u.merge(groups, on=["model", "dataset", "method", "rank"])
        row_keys, col_key = ["dataset", "model", "method", "rank"], "variant"
        point = ("composition", "label_noise", "loss")
        keep = setting_families(keep, VARIANT_SETTINGS, within=row_keys, point=point) if len(keep) else keep
        if len(keep):
            # A family without a variant run has nothing to set beside its main-setting panel.
            keep = keep[keep.groupby("family")["variant"].transform(lambda v: bool((v != "base").any()))]
    else:
        keep = u[u["variant"] == "base"]
        row_keys, col_key = ["dataset", "model"], "_col"
        if len(keep):
            keep = setting_families(keep, METHOD_SETTINGS, within=row_keys, point=("method", "rank"))
    if keep.empty or curves.empty:
        return None
    row_keys = [*row_keys, "family"]
    keep = order_conditions(
        keep.assign(
            _col=[method_label(m, float(r) if pd.notna(r) else math.nan) for m, r in zip(keep["method"], keep["rank"])]
        )
    )
    # A model's families one after the other (the method order within each kept).
    keep = keep.sort_values(
        [c for c in ("dataset", "architecture", "model") if c in keep] + ["settings"], kind="stable"
    ).reset_index(drop=True)
    keep["_row"] = [tuple(r) for r in keep[row_keys].astype(str).itertuples(index=False)]
    if variants:
        cols = ["base"] + sorted(set(keep[col_key]) - {"base"})
    else:
        # Columns by method then rank: LoRA ranks ascending, IA3, full FT.
        order = {"lora": 0, "ia3": 1, "full": 2}
        col_rows = keep.drop_duplicates("_col")
        cols = [
            c
            for _, _, c in sorted(
                zip(col_rows["method"].map(order).fillna(3), col_rows["rank"].fillna(math.inf), col_rows["_col"])
            )
        ]
    rows = list(dict.fromkeys(keep["_row"]))
    panels = {key: grp for key, grp in keep.groupby(["_row", col_key], sort=False)}
    return rows, cols, panels


def trajectory_plot(
    curves: pd.DataFrame,
    runs: pd.DataFrame,
    *,
    variants: bool = False,
    page: int = 0,
    max_rows: Optional[int] = MAX_ROWS,
    axes=None,
    ylabel: str = "loss −log p(gold) (nats)",
) -> Optional[Figure]:
    """Mean tracked loss by entropy category over training, one `trajectory_panel` per condition.

    Main setting (``variants=False``): one row per model x dataset, one column per method
    (LoRA ranks, IA3, full FT), so LoRA and full fine-tuning sit side by side. Variants
    (``variants=True``): one row per model x dataset x method, one column per variant, the
    main-setting run first. Rows come in pages of `max_rows` (None: all rows); `page` picks one.

    Parameters
    ----------
    axes : Figure or sequence of Axes, optional
        Where to draw: a figure (the grid is added to it) or exactly rows x columns axes, row by
        row; default a new figure.

    Returns
    -------
    figure : Figure or None
        The figure drawn into; None without usable runs or curves, or past the last page.
    """
    layout = _trajectory_layout(curves, runs, variants)
    if layout is None:
        return None
    rows, cols, panels = layout
    if max_rows:
        rows = rows[page * max_rows : (page + 1) * max_rows]
    if not rows:
        return None
    fig, grid, own = _grid_into(
        axes, len(rows), len(cols), "trajectory_plot", top=0.95, panel_w=max(3.0, 4.2 / len(cols))
    )
    for i, rkey in enumerate(rows):
        for j, ckey in enumerate(cols):
            ax = grid[i, j]
            sel = panels.get((rkey, ckey))
            if sel is None:
                ax.set_axis_off()
                continue
            first = sel.iloc[0]
            family = f" · {first['settings']}" if first.get("settings") else ""
            title = f"{first['model']} · {first['dataset']}{family}\n{_method_column(first)}"
            if variants:
                title += f" · {ckey}"
            trajectory_panel(
                curves,
                list(sel["run_id"]),
                ax=ax,
                ylabel=ylabel,
                title=f"{title} ({len(sel)} seed{'s' if len(sel) != 1 else ''})",
            )
            if j > 0:
                ax.set_ylabel("")
    # A short legend title (the caption explains line and band), so it fits above a one-column grid too.
    _grid_legend(fig, grid, own, [_line(CATEGORY_COLORS[c], c) for c in CATEGORIES], "entropy category")
    return fig


# ------------------------------------------------------------------------------------------------
# Entropy histogram
# ------------------------------------------------------------------------------------------------


def entropy_histogram_panel(
    entropy: pd.DataFrame,
    distribution: Optional[pd.DataFrame] = None,
    *,
    dataset: Optional[str] = None,
    thresholds: Tuple[float, float] = DEFAULT_THRESHOLDS,
    bins=30,
    ax: Optional[Axes] = None,
) -> Axes:
    """Histogram of one dataset's annotation entropy, stacked by category, thresholds dashed.

    `distribution` (the ``entropy_distribution`` table) gives the shares in the legend; without it
    they are counted from `entropy`. `dataset` may be left out when the data hold one. Returns the
    axes drawn into.
    """
    ax = ax if ax is not None else _new_axes()
    data = entropy.drop_duplicates(["dataset", "example_id"]) if "dataset" in entropy else entropy
    ds = _one(data, "dataset", dataset, "entropy_histogram_panel")
    d = data[data["dataset"] == ds] if ds is not None else data
    cats = [c for c in CATEGORIES if (d["category"] == c).any()]
    if distribution is not None and not distribution.empty:
        dist = distribution[distribution["dataset"] == ds] if "dataset" in distribution else distribution
        dist = dist.set_index("category")
        shares = {c: (dist.loc[c, "share"], int(dist.loc[c, "n"])) for c in cats}
    else:
        shares = {c: ((d["category"] == c).mean(), int((d["category"] == c).sum())) for c in cats}
    labels = [f"{c}: {shares[c][0]:.1%} (n={shares[c][1]})" for c in cats]
    ax.hist(
        [d.loc[d["category"] == c, "entropy"] for c in cats],
        bins=bins,
        stacked=True,
        color=[CATEGORY_COLORS[c] for c in cats],
        label=labels,
        edgecolor="white",
        linewidth=0.4,
    )
    for t in thresholds:
        ax.axvline(t, color="black", ls="--", lw=1)
        ax.text(t, ax.get_ylim()[1] * 0.5, f"H = {t:g} ", fontsize=7.5, rotation=90, ha="right", va="center")
    ax.set_title(f"{ds}: {len(d)} tracked examples (all sets)" if ds else f"{len(d)} tracked examples", fontsize=9.5)
    ax.set_xlabel("annotation entropy H (nats)", fontsize=8.5)
    ax.set_ylabel("examples", fontsize=8.5)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7.5, loc="best", title="category: share", title_fontsize=7.5)
    ax.grid(alpha=0.3, axis="y")
    return ax


def entropy_histogram(
    entropy: pd.DataFrame,
    distribution: Optional[pd.DataFrame] = None,
    *,
    thresholds: Tuple[float, float] = DEFAULT_THRESHOLDS,
    axes=None,
) -> Optional[Figure]:
    """One `entropy_histogram_panel` per dataset, on common bins; returns the figure (None without data)."""
    if entropy.empty:
        return None
    data = entropy.drop_duplicates(["dataset", "example_id"])
    datasets = sorted(data["dataset"].unique())
    fig, grid, _ = _grid_into(
        axes, 1, len(datasets), "entropy_histogram", panel_w=4.6, panel_h=3.2, sharey=False, top=0.45, wspace=0.7
    )
    hmax = max(math.log(3), float(data["entropy"].max()))
    bins = np.linspace(0, hmax * 1.0001, 31)
    for ax, ds in zip(grid[0], datasets):
        entropy_histogram_panel(data, distribution, dataset=ds, thresholds=thresholds, bins=bins, ax=ax)
    return fig


# ------------------------------------------------------------------------------------------------
# AULC by entropy bin
# ------------------------------------------------------------------------------------------------

AULC_SCHEMES = {"fixed": "fixed categories", "quartile": "quartile bins", "tercile": "tercile bins"}


def _condition_colors(labels: Sequence[str]) -> Dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {lab: cmap(i % 20) for i, lab in enumerate(labels)}


def _main_binning(binning: pd.DataFrame) -> pd.DataFrame:
    b = binning[binning["variant"] == "base"] if "variant" in binning else binning
    return binning if b.empty else b


def aulc_bins_panel(
    binning: pd.DataFrame,
    *,
    scheme: str = "fixed",
    dataset: Optional[str] = None,
    colors: Optional[Mapping[str, tuple]] = None,
    ax: Optional[Axes] = None,
) -> Axes:
    """Mean AULC per entropy bin of one binning `scheme` ("fixed", "quartile", "tercile"), one line per
    main-setting condition.

    Error bars: sd across seeds; line style by method (LoRA solid, IA3 dash-dot, full FT dashed);
    each line is labelled with its condition, so ``ax.legend()`` names them. `dataset` may be left
    out when the table holds one. Returns the axes drawn into.
    """
    if scheme not in AULC_SCHEMES:
        raise ValueError(f"aulc_bins_panel: scheme must be one of {', '.join(AULC_SCHEMES)}, got {scheme!r}")
    ax = ax if ax is not None else _new_axes(3.6, 3.0)
    b = _main_binning(binning)
    ds = _one(b, "dataset", dataset, "aulc_bins_panel")
    d = b[b["dataset"] == ds] if ds is not None else b
    colors = colors or _condition_colors(list(dict.fromkeys(b["condition"])))
    method_of = dict(zip(b["condition"], b["method"])) if "method" in b else {}
    for cond, g in d[d["scheme"] == scheme].groupby("condition", sort=False):
        g = g.sort_values("bin_order")
        ax.errorbar(
            g["bin"],
            g["aulc_mean"],
            yerr=g["aulc_sd"].fillna(0),
            color=colors[cond],
            ls=METHOD_STYLES.get(method_of.get(cond), ":"),
            marker="o",
            ms=3,
            lw=1.2,
            capsize=2,
            label=cond,
        )
    ax.set_title(f"{ds} · {AULC_SCHEMES[scheme]}" if ds else AULC_SCHEMES[scheme], fontsize=9)
    ax.set_xlabel("entropy bin (low → high)", fontsize=8)
    ax.set_ylabel("mean AULC (nats)", fontsize=8)
    ax.tick_params(labelsize=7.5)
    ax.grid(alpha=0.3)
    return ax


def aulc_bins_plot(binning: pd.DataFrame, *, axes=None) -> Optional[Figure]:
    """`aulc_bins_panel` for the three schemes (columns) of each dataset (rows), one legend of conditions.

    Returns the figure drawn into (None without data).
    """
    if binning.empty:
        return None
    b = _main_binning(binning)
    datasets = sorted(b["dataset"].unique()) if "dataset" in b else [None]
    conds = list(dict.fromkeys(b["condition"]))
    colors = _condition_colors(conds)
    method_of = dict(zip(b["condition"], b["method"])) if "method" in b else {}
    if axes is None:
        # Constrained layout: panels of different y ranges keep their own tick labels clear of their neighbours.
        fig = Figure(figsize=(3 * 3.4 + 3.6, len(datasets) * 3.0 + 0.4), layout="constrained")
        FigureCanvasAgg(fig)
        grid, own = fig.subplots(len(datasets), 3, squeeze=False), True
    else:
        fig, grid, own = _grid_into(axes, len(datasets), 3, "aulc_bins_plot", sharey=False)
    for i, ds in enumerate(datasets):
        for j, scheme in enumerate(AULC_SCHEMES):
            aulc_bins_panel(b, scheme=scheme, dataset=ds, colors=colors, ax=grid[i, j])
    handles = [_line(colors[c], c, METHOD_STYLES.get(method_of.get(c), ":")) for c in conds]
    if own:
        fig.legend(
            handles=handles,
            loc="outside right center",
            fontsize=7,
            title="condition (error bars: sd over seeds)",
            title_fontsize=7.5,
            frameon=False,
        )
    else:
        _grid_legend(fig, grid, own, handles, "condition (error bars: sd over seeds)")
    return fig


# ------------------------------------------------------------------------------------------------
# rho against LoRA rank
# ------------------------------------------------------------------------------------------------


def _rank_runs(runs: pd.DataFrame):
    u = runs[(~_excluded(runs)) & (runs["variant"] == "base")]
    return u, u[(u["method"] == "lora") & u["rank"].notna()]


def rank_panel(runs: pd.DataFrame, *, dataset: Optional[str] = None, ax: Optional[Axes] = None) -> Axes:
    """Spearman rho against LoRA rank per model (and setting family) for one dataset (error bars: sd across seeds).

    Encoders solid, decoders dashed; a model's full fine-tuning is drawn at the right end
    ("full"). Uses the main-setting runs of every model with a LoRA run; `dataset` may be left
    out when the runs hold one. Runs that differ in a setting other than method and rank (bulk
    size, learning rate, ...) are separate lines (`hf_entropy_callback.study.tables.rank_families`),
    labelled with it ("bulk=2000"). Returns the axes drawn into.
    """
    from .tables import mean_sd, rank_families

    ax = ax if ax is not None else _new_axes(4.6, 3.4)
    _, lora = _rank_runs(runs)
    ds = _one(lora, "dataset", dataset, "rank_panel")
    stats_ = mean_sd(
        rank_families(runs), ["dataset", "architecture", "model", "settings", "family", "method", "rank"], ["rho"]
    )
    # Ranks over every dataset, so side-by-side panels share their x axis.
    ranks = sorted(lora["rank"].unique())
    full_x = ranks[-1] * 2.0 if ranks else 2.0
    enc_colors = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#8c564b"]
    dec_colors = ["#d62728", "#ff7f0e", "#e377c2", "#bcbd22"]
    d = stats_[stats_["dataset"] == ds]
    ie = idc = 0
    for (arch, model, settings, _), g in d.groupby(["architecture", "model", "settings", "family"], sort=True):
        if arch == "decoder":
            color, ls, idc = dec_colors[idc % len(dec_colors)], "--", idc + 1
        else:
            color, ls, ie = enc_colors[ie % len(enc_colors)], "-", ie + 1
        gl = g[g["method"] == "lora"].sort_values("rank")
        if gl.empty:
            continue
        ax.errorbar(
            gl["rank"],
            gl["rho_mean"],
            yerr=gl["rho_sd"].fillna(0),
            color=color,
            ls=ls,
            marker="o",
            capsize=3,
            lw=1.5,
            label=f"{model} ({arch})" + (f" · {settings}" if settings else ""),
        )
        gf = g[g["method"] == "full"]
        if len(gf):
            ax.errorbar(
                [full_x], gf["rho_mean"], yerr=gf["rho_sd"].fillna(0), color=color, marker="s", capsize=3, ls="none"
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ranks) + [full_x], [str(int(r)) for r in ranks] + ["full"])
    ax.minorticks_off()
    ax.axhline(0, color="black", lw=0.8)
    ax.set_title(f"{ds}: rho vs LoRA rank", fontsize=9.5)
    ax.set_xlabel("LoRA rank r (log scale); square: full fine-tuning", fontsize=8.5)
    ax.set_ylabel("Spearman rho(entropy, AULC)", fontsize=8.5)
    ax.tick_params(labelsize=8, labelleft=True)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="best", title="error bars: sd over seeds", title_fontsize=7)
    return ax


def rank_plot(runs: pd.DataFrame, *, axes=None) -> Optional[Figure]:
    """One `rank_panel` per dataset, encoders vs decoders; returns the figure (None without LoRA runs)."""
    _, lora = _rank_runs(runs)
    if lora.empty:
        return None
    datasets = sorted(lora["dataset"].unique())
    fig, grid, _ = _grid_into(
        axes, 1, len(datasets), "rank_plot", panel_w=4.6, panel_h=3.4, sharey=True, top=0.45, wspace=0.9
    )
    for ax, ds in zip(grid[0], datasets):
        rank_panel(runs, dataset=ds, ax=ax)
    return fig


# ------------------------------------------------------------------------------------------------
# Dataset cartography
# ------------------------------------------------------------------------------------------------


def cartography_panel(
    examples: pd.DataFrame, *, run_id: Optional[str] = None, title: Optional[str] = None, ax: Optional[Axes] = None
) -> Axes:
    """Dataset-Cartography map of one run (variability x, confidence y) coloured by entropy category.

    `run_id` may be left out when `examples` hold one run. Returns the axes drawn into.
    """
    ax = ax if ax is not None else _new_axes(4.4, 4.0)
    rid = _one(examples, "run_id", run_id, "cartography_panel")
    cols = ["variability", "confidence", "category"]
    ex = examples.loc[examples["run_id"] == rid, cols] if rid is not None else examples[cols]
    # Contested drawn last (on top): the category the study is about stays visible in the crowd.
    for cat in CATEGORIES:
        d = ex[ex["category"] == cat]
        ax.scatter(d["variability"], d["confidence"], s=9, alpha=0.65, color=CATEGORY_COLORS[cat], lw=0, label=cat)
    ax.set_title(title if title is not None else str(rid or ""), fontsize=8)
    ax.set_xlabel("variability (population sd of p(gold))", fontsize=7.5)
    ax.set_ylabel("confidence (mean p(gold))", fontsize=7.5)
    _few_ticks(ax, 4, 5)
    ax.tick_params(labelsize=7, labelleft=True)
    ax.grid(alpha=0.3)
    return ax


def _cartography_runs(examples: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Each main-setting condition's lowest-seed usable run, in the study's order."""
    u = runs[(~_excluded(runs)) & (runs["variant"] == "base")]
    if u.empty or examples.empty:
        return u.iloc[:0]
    return order_conditions(u.sort_values("seed", kind="stable").drop_duplicates("condition"))


def cartography_plot(
    examples: pd.DataFrame,
    runs: pd.DataFrame,
    *,
    ncols: int = 4,
    page: int = 0,
    max_rows: Optional[int] = MAX_ROWS,
    axes=None,
) -> Optional[Figure]:
    """One `cartography_panel` per main-setting condition, from its lowest-seed usable run.

    Panels fill `ncols` columns, `max_rows` rows a page (None: all); `page` picks one. Returns the
    figure (None without data or past the last page).
    """
    first = _cartography_runs(examples, runs)
    if max_rows:
        first = first.iloc[page * max_rows * ncols : (page + 1) * max_rows * ncols]
    if first.empty:
        return None
    nrows = math.ceil(len(first) / ncols)
    fig, grid, own = _grid_into(
        axes, nrows, min(ncols, len(first)), "cartography_plot", panel_w=4.2, panel_h=3.8, sharey=True, top=0.8
    )
    flat = grid.ravel()
    for ax, r in zip(flat, first.to_dict("records")):
        seed = "" if pd.isna(r["seed"]) else f", seed {int(r['seed'])}"
        # What tells this condition from others of the same label (e.g. "bulk=2000"), as its label says.
        distinct = [c for c in str(r.get("distinct_by") or "").split(", ") if c]
        family = f" · {setting_text(r, distinct)}" if distinct else ""
        title = f"{r['model']} · {r['dataset']}{family}\n{method_label(r['method'], r['rank'])}{seed}"
        cartography_panel(examples, run_id=r["run_id"], ax=ax, title=title)
    for ax in flat[len(first) :]:
        ax.set_axis_off()
    handles = [_line(CATEGORY_COLORS[c], c, ls="none", marker="o") for c in CATEGORIES]
    for h in handles:
        h.set_markersize(9)
    _grid_legend(fig, grid, own, handles, "entropy category")
    return fig


# ------------------------------------------------------------------------------------------------
# Entropy against AULC (the headline claim)
# ------------------------------------------------------------------------------------------------

#: Above this many points a panel draws a hexbin (counts) instead of a scatter.
HEXBIN_MIN = 2000


def entropy_aulc_panel(
    examples: pd.DataFrame,
    run_ids: Sequence[str],
    *,
    rho: Optional[Mapping] = None,
    title: Optional[str] = None,
    ax: Optional[Axes] = None,
) -> Axes:
    """Annotation entropy against AULC for one condition (its runs `run_ids`), coloured by category.

    Each point is one tracked example, its AULC averaged over the runs (seeds; they track the same
    examples). More than `HEXBIN_MIN` points: a hexbin of counts instead. `rho` (a row of
    ``rho_by_condition``: ``rho_mean``, ``rho_ci_low``, ``rho_ci_high``, ``n_runs``) is written
    into the panel. Returns the axes drawn into.
    """
    ax = ax if ax is not None else _new_axes(3.6, 3.2)
    # Only the columns drawn: the rows of a condition with every column would be a large copy at scale.
    ex = examples.loc[examples["run_id"].isin(list(run_ids)), ["example_id", "entropy", "aulc", "category"]]
    ex = ex[np.isfinite(ex["aulc"].to_numpy(float))]
    per = ex.groupby("example_id", sort=False).agg(
        entropy=("entropy", "first"), aulc=("aulc", "mean"), category=("category", "first")
    )
    if len(per) > HEXBIN_MIN:
        hb = ax.hexbin(per["entropy"], per["aulc"], gridsize=35, mincnt=1, cmap="viridis", bins="log", lw=0.1)
        ax.figure.colorbar(hb, ax=ax, label="examples (log)", pad=0.01)
    else:
        for cat in CATEGORIES:
            d = per[per["category"] == cat]
            ax.scatter(d["entropy"], d["aulc"], s=5, alpha=0.55, color=CATEGORY_COLORS[cat], lw=0, label=cat)
    if rho is not None:
        lo, hi = rho.get("rho_ci_low", math.nan), rho.get("rho_ci_high", math.nan)
        ci = f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else ""
        n_runs = int(rho.get("n_runs", len(run_ids)))
        ax.text(
            0.02,
            0.97,
            f"rho = {rho['rho_mean']:.3f}{ci}\n{n_runs} seed{'s' if n_runs != 1 else ''}, n = {len(per)}",
            transform=ax.transAxes,
            fontsize=7,
            va="top",
            bbox={"facecolor": "white", "alpha": 0.8, "lw": 0, "pad": 1.5},
        )
    if title is not None:
        ax.set_title(title, fontsize=8)
    ax.set_xlabel("annotation entropy H (nats)", fontsize=7.5)
    ax.set_ylabel("AULC (nats; mean over seeds)", fontsize=7.5)
    _few_ticks(ax, 4, 5)
    ax.tick_params(labelsize=7, labelleft=True)
    ax.grid(alpha=0.3)
    return ax


def _scatter_conditions(runs: pd.DataFrame, rho_table: pd.DataFrame) -> pd.DataFrame:
    u = runs[~_excluded(runs)]
    keep = rho_table[rho_table["condition"].isin(set(u["condition"])) & (rho_table["n_runs"] > 0)]
    return keep.reset_index(drop=True)


def entropy_aulc_plot(
    examples: pd.DataFrame,
    runs: pd.DataFrame,
    rho_table: pd.DataFrame,
    *,
    ncols: int = 4,
    page: int = 0,
    max_rows: Optional[int] = MAX_ROWS,
    axes=None,
) -> Optional[Figure]:
    """One `entropy_aulc_panel` per condition of `rho_table` (its order), with its mean rho and bootstrap CI.

    Returns the figure (None without data or past the last page).
    """
    conds = _scatter_conditions(runs, rho_table)
    if max_rows:
        conds = conds.iloc[page * max_rows * ncols : (page + 1) * max_rows * ncols]
    if conds.empty or examples.empty:
        return None
    nrows = math.ceil(len(conds) / ncols)
    fig, grid, own = _grid_into(
        axes,
        nrows,
        min(ncols, len(conds)),
        "entropy_aulc_plot",
        panel_w=3.4,
        panel_h=3.0,
        sharey=False,
        top=0.8,
        wspace=0.75,
        hspace=1.0,
    )
    flat = grid.ravel()
    u = runs[~_excluded(runs)]
    for ax, r in zip(flat, conds.to_dict("records")):
        ids = list(u.loc[u["condition"] == r["condition"], "run_id"])
        import textwrap

        title = "\n".join(textwrap.wrap(r["condition"], 44)[:3])  # the full label, on up to three lines
        entropy_aulc_panel(examples, ids, rho=r, title=title, ax=ax)
    for ax in flat[len(conds) :]:
        ax.set_axis_off()
    handles = [_line(CATEGORY_COLORS[c], c, ls="none", marker="o") for c in CATEGORIES]
    _grid_legend(fig, grid, own, handles, "entropy category (scatter panels)")
    return fig


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------

CALIBRATION_MEASURES = {
    "pred_entropy": "prediction entropy (nats)",
    "max_confidence": "mean max confidence",
    "ece": "ECE (equal-width bins)",
}


def _calibration_sets(c: pd.DataFrame) -> List[str]:
    return [s for s in ("validation", "train") if (c["set"] == s).any()] + sorted(
        set(c["set"]) - {"validation", "train"}
    )


def calibration_panel(
    cal: pd.DataFrame,
    *,
    measure: str = "ece",
    tracked_set: Optional[str] = None,
    labels: bool = True,
    ax: Optional[Axes] = None,
) -> Axes:
    """One calibration `measure` ("pred_entropy", "max_confidence", "ece") per condition and category at the
    final point, as horizontal bars (error bars: sd across seeds).

    `tracked_set` defaults to "validation" when present; ``labels=False`` leaves the condition
    names off the y axis (for panels to the right of one that has them). Returns the axes drawn into.
    """
    if measure not in CALIBRATION_MEASURES:
        raise ValueError(
            f"calibration_panel: measure must be one of {', '.join(CALIBRATION_MEASURES)}, got {measure!r}"
        )
    c = cal[cal["category"] != "all"]
    conds = list(dict.fromkeys(c["condition"]))
    ax = ax if ax is not None else _new_axes(2.6 + 0.058 * max(map(len, conds), default=0), 0.6 + 0.3 * len(conds))
    s = tracked_set if tracked_set is not None else (_calibration_sets(c) or [None])[0]
    d = c[c["set"] == s]
    y = np.arange(len(conds))
    w = 0.27
    for k, cat in enumerate(CATEGORIES):
        dc = d[d["category"] == cat].set_index("condition").reindex(conds)
        ax.barh(
            y + (k - 1) * w,
            dc[f"{measure}_mean"],
            height=w,
            xerr=dc[f"{measure}_sd"].fillna(0),
            color=CATEGORY_COLORS[cat],
            error_kw={"lw": 0.6, "capsize": 1.2},
            label=cat,
        )
    ax.set_yticks(y, conds if labels else [""] * len(conds), fontsize=7)
    ax.set_ylim(len(conds) - 0.5, -0.5)
    ax.set_xlabel(CALIBRATION_MEASURES[measure], fontsize=8)
    ax.set_title(f"{s} set, final point", fontsize=8.5)
    ax.grid(alpha=0.3, axis="x")
    _few_ticks(ax, 4, len(conds) + 1)
    ax.tick_params(axis="x", labelsize=7.5)
    return ax


def calibration_plot(cal: pd.DataFrame, *, axes=None) -> Optional[Figure]:
    """`calibration_panel` for the three measures (columns) of each tracked set (rows, validation first).

    Returns the figure (None without data).
    """
    if cal.empty:
        return None
    c = cal[cal["category"] != "all"]
    sets = _calibration_sets(c)
    conds = list(dict.fromkeys(c["condition"]))
    longest = max(len(x) for x in conds)
    fig, grid, own = _grid_into(
        axes,
        len(sets),
        3,
        "calibration_plot",
        panel_w=2.6,
        panel_h=max(1.5, 0.3 * len(conds)),
        sharey=False,
        top=0.8,
        hspace=0.8,
        left=0.3 + 0.058 * longest,
        wspace=0.3,
    )
    for i, s in enumerate(sets):
        for j, m in enumerate(CALIBRATION_MEASURES):
            calibration_panel(c, measure=m, tracked_set=s, labels=j == 0, ax=grid[i, j])
    _grid_legend(
        fig,
        grid,
        own,
        [_line(CATEGORY_COLORS[k], k) for k in CATEGORIES],
        "entropy category (error bars: sd over seeds)",
    )
    return fig


# ------------------------------------------------------------------------------------------------
# Label noise
# ------------------------------------------------------------------------------------------------

_NOISE_KEYS = ("model", "method", "rank", "dataset", "composition", "loss")


def noise_rho_panel(levels: pd.DataFrame, *, title: Optional[str] = None, ax: Optional[Axes] = None) -> Axes:
    """rho(entropy, AULC) against the label-noise level for one condition's ``noise_levels`` rows
    (error bars: sd over seeds). Returns the axes drawn into."""
    ax = ax if ax is not None else _new_axes(3.6, 2.6)
    allc = levels[levels["category"] == "all"].sort_values("label_noise")
    ax.errorbar(
        allc["label_noise"] * 100,
        allc["rho_mean"],
        yerr=allc["rho_sd"].fillna(0),
        marker="o",
        capsize=3,
        color="#333333",
    )
    ax.set_xlabel("label noise on clean examples (%)", fontsize=8)
    ax.set_ylabel("Spearman rho(entropy, AULC)", fontsize=8)
    if title is not None:
        ax.set_title(title, fontsize=8.5)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7.5)
    return ax


def noise_delta_panel(levels: pd.DataFrame, *, ax: Optional[Axes] = None) -> Axes:
    """Mean Delta L per entropy category against the label-noise level for one condition's
    ``noise_levels`` rows (error bars: sd over seeds). Returns the axes drawn into."""
    ax = ax if ax is not None else _new_axes(3.6, 2.6)
    for cat in CATEGORIES:
        d = levels[levels["category"] == cat].sort_values("label_noise")
        if len(d):
            ax.errorbar(
                d["label_noise"] * 100,
                d["delta_loss_mean"],
                yerr=d["delta_loss_sd"].fillna(0),
                marker="o",
                capsize=3,
                color=CATEGORY_COLORS[cat],
                label=cat,
            )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("label noise on clean examples (%)", fontsize=8)
    ax.set_ylabel("mean ΔL (nats; > 0: un-learning)", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    ax.tick_params(labelsize=7.5)
    return ax


def noise_plot(levels: pd.DataFrame, *, axes=None) -> Optional[Figure]:
    """`noise_rho_panel` and `noise_delta_panel` side by side for each condition of the ``noise_levels``
    table; returns the figure (None without data)."""
    if levels.empty:
        return None
    keys = [k for k in _NOISE_KEYS if k in levels]
    # One panel row per setting family: the table's groups (baseline and noisy runs equal in every other
    # setting) that share a title are told apart by their settings, never drawn as one line; two noise
    # rules at one level are two rows, each with the baseline.
    fam = setting_families(levels, ("label_noise", "noise_rule"), within=keys, point=("label_noise",))
    groups = list(fam.groupby("family", sort=False))
    fig, grid, _ = _grid_into(
        axes, len(groups), 2, "noise_plot", panel_w=3.6, panel_h=2.6, sharey=False, top=0.5, wspace=0.8
    )
    for i, (_, g) in enumerate(groups):
        meta = g.iloc[0]
        title = (
            f"{meta.get('model')} · {method_label(meta.get('method'), meta.get('rank', math.nan))} · "
            f"{meta.get('dataset')}" + (f"\n{meta['settings']}" if meta["settings"] else "")
        )
        noise_rho_panel(g, title=title, ax=grid[i, 0])
        noise_delta_panel(g, ax=grid[i, 1])
    return fig


# ------------------------------------------------------------------------------------------------
# Instruments (issue 12): gradient alignment, gradient norms by category, drift
# ------------------------------------------------------------------------------------------------

#: Instrument panels are keyed by these columns (besides method and rank, which tell the lines apart).
_PANEL_KEYS = ("dataset", "model", "variant", "learning_rate", "instrument_setting")
DRIFT_LABELS = {
    "attention_entropy": "attention entropy, layer mean (nats)",
    "cka": "linear CKA vs initial, layer mean",
    "update_norm_total": "weight-update norm, total",
}
DRIFT_MEASURE_LABELS = {
    "update_norm_total": "total weight-update norm (last point)",
    "cka_drift": "1 − layer-mean CKA (last point)",
    "attention_entropy_change": "Δ layer-mean attention entropy (nats)",
}


#: Markers that tell apart the lines of conditions sharing a method label in one instrument panel.
_SHARED_MARKERS = ("o", "s", "^", "D", "v", "P")


def _label_of(row) -> str:
    return method_label(str(row["method"]), float(row["rank"]) if pd.notna(row["rank"]) else math.nan)


def _method_colors(frame: pd.DataFrame) -> Dict[str, tuple]:
    """A colour per method label (LoRA ranks ascending, IA3, full FT), fixed across a figure's panels."""
    from matplotlib import colormaps

    if frame.empty:
        return {}
    order = {"lora": 0, "ia3": 1, "full": 2}
    keys = frame[["method", "rank"]].drop_duplicates()
    keys = sorted(
        (
            (order.get(m, 3), r if pd.notna(r) else math.inf, _label_of({"method": m, "rank": r}))
            for m, r in keys.values
        ),
        key=lambda k: k[:2],
    )
    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, (_, _, label) in enumerate(dict.fromkeys(keys))}


def _panel_title(row, *, skip: Sequence[str] = ()) -> str:
    parts = [f"{row['model']} · {row['dataset']}"]
    if "variant" not in skip and row.get("variant") not in (None, "base") and pd.notna(row.get("variant")):
        parts.append(str(row["variant"]))
    if "learning_rate" not in skip and pd.notna(row.get("learning_rate")):
        parts.append(f"lr {float(row['learning_rate']):g}")
    return " · ".join(parts)


def _panels(frame: pd.DataFrame, keys: Sequence[str] = _PANEL_KEYS) -> List[Tuple[tuple, pd.DataFrame]]:
    """The rows of `frame` grouped by `keys` (NaN keys kept), in the report's condition order."""
    if frame.empty:
        return []
    ordered = order_conditions(frame)
    present = [k for k in keys if k in ordered]
    return list(ordered.groupby(present, dropna=False, sort=False))


def _curve_lines(ax, d: pd.DataFrame, value: str, colors: Mapping[str, tuple]) -> None:
    """One line per condition of `d` (its method label), with the 95% t band over seeds where there is one."""
    labels = {c: _label_of(g.iloc[0]) for c, g in d.groupby("condition", sort=False)}
    shared = {lab for lab in labels.values() if list(labels.values()).count(lab) > 1}
    seen: Dict[str, int] = {}
    for cond, g in d.groupby("condition", sort=False):
        g = g.sort_values("progress")
        label = labels[cond]
        color = colors.get(label, "#333333")
        ls = METHOD_STYLES.get(str(g["method"].iloc[0]), ":")
        # Conditions of one method that differ in another setting (bulk size, ...) share colour and style:
        # a marker of their own keeps their lines apart (the legend names each condition).
        k = seen[label] = seen.get(label, -1) + 1
        marker = _SHARED_MARKERS[k % len(_SHARED_MARKERS)] if label in shared else None
        ax.plot(
            g["progress"],
            g[f"{value}_mean"],
            color=color,
            ls=ls,
            lw=1.6,
            marker=marker,
            ms=4,
            label=cond if label in shared else label,
        )
        lo, hi = g[f"{value}_ci_low"].to_numpy(float), g[f"{value}_ci_high"].to_numpy(float)
        if np.isfinite(lo).any():
            ax.fill_between(g["progress"], lo, hi, color=color, alpha=0.2, lw=0)


def _style(ax, xlabel: str, ylabel: str, title: Optional[str]) -> None:
    if title is not None:
        ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    _few_ticks(ax)
    ax.tick_params(labelsize=7.5, labelleft=True)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)


def alignment_panel(
    alignment: pd.DataFrame,
    *,
    pair: str = "clean~contested",
    colors: Optional[Mapping[str, tuple]] = None,
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
) -> Axes:
    """Cosine similarity of two categories' aggregated gradients over training, one line per condition of
    the ``grad_alignment`` rows given (e.g. LoRA and full FT of one model, dataset and learning rate).

    Lines: mean over seeds; bands: 95% t interval over seeds; line style by method (LoRA solid, IA3
    dash-dot, full FT dashed). Returns the axes drawn into.
    """
    ax = ax if ax is not None else _new_axes(3.6, 2.8)
    d = alignment[alignment["pair"] == pair]
    _curve_lines(ax, d, "cosine", colors or _method_colors(d))
    ax.axhline(0, color="black", lw=0.8)
    _style(ax, "training progress (step / last step)", f"cosine ({pair})", title)
    if ax.lines:
        ax.legend(fontsize=6.5, loc="best")
    return ax


def alignment_plot(
    alignment: pd.DataFrame,
    *,
    pair: str = "clean~contested",
    page: int = 0,
    per_page: Optional[int] = 4 * MAX_ROWS,
    ncols: int = 4,
    axes=None,
) -> Optional[Figure]:
    """`alignment_panel` per model, dataset, variant, learning rate and instrument setting (LoRA and full FT
    in one panel); panels in pages of `per_page`. Returns the figure (None without data or past the last page)."""
    panels = _panels(alignment[alignment["pair"] == pair]) if not alignment.empty else []
    if per_page:
        panels = panels[page * per_page : (page + 1) * per_page]
    if not panels:
        return None
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, grid, _ = _grid_into(axes, nrows, ncols, "alignment_plot", sharey=True, top=0.4, panel_w=3.2, wspace=0.6)
    colors = _method_colors(alignment)
    for i, (ax, (_, d)) in enumerate(zip(grid.flat, panels)):
        alignment_panel(d, pair=pair, colors=colors, ax=ax, title=_panel_title(d.iloc[0]))
        if i % ncols:
            ax.set_ylabel("")
    for ax in list(grid.flat)[len(panels) :]:
        ax.set_axis_off()
    return fig


def grad_norm_panel(
    grad_norms: pd.DataFrame, *, ax: Optional[Axes] = None, title: Optional[str] = None, median: bool = False
) -> Axes:
    """Per-example gradient norms by entropy category over training for one condition's ``grad_norms`` rows
    (the study's figure 4): per category the mean over seeds of the runs' category means (`median`: of
    their medians); bands: 95% t interval over seeds (means only). Returns the axes drawn into."""
    ax = ax if ax is not None else _new_axes(3.6, 2.8)
    value = "grad_norm_median" if median else "grad_norm"
    for cat in [c for c in CATEGORIES if (grad_norms["category"] == c).any()]:
        g = grad_norms[grad_norms["category"] == cat].sort_values("progress")
        ax.plot(g["progress"], g[f"{value}_mean"], color=CATEGORY_COLORS[cat], lw=1.6, label=cat)
        if not median and np.isfinite(g["grad_norm_ci_low"].to_numpy(float)).any():
            ax.fill_between(
                g["progress"],
                g["grad_norm_ci_low"],
                g["grad_norm_ci_high"],
                color=CATEGORY_COLORS[cat],
                alpha=0.2,
                lw=0,
            )
    _style(
        ax,
        "training progress (step / last step)",
        f"per-example gradient norm ({'median' if median else 'mean'})",
        title,
    )
    return ax


def grad_norm_plot(
    grad_norms: pd.DataFrame, *, page: int = 0, per_page: Optional[int] = 4 * MAX_ROWS, ncols: int = 4, axes=None
) -> Optional[Figure]:
    """`grad_norm_panel` per condition and instrument setting, in pages of `per_page` panels; the y axes
    are not shared (full fine-tuning's norms are far larger than LoRA's). Returns the figure (None without
    data or past the last page)."""
    panels = _panels(grad_norms, ("condition", "instrument_setting")) if not grad_norms.empty else []
    if per_page:
        panels = panels[page * per_page : (page + 1) * per_page]
    if not panels:
        return None
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, grid, own = _grid_into(
        axes, nrows, ncols, "grad_norm_plot", sharey=False, top=1.0, panel_w=3.2, wspace=0.85, hspace=1.0
    )
    for ax, (_, d) in zip(grid.flat, panels):
        first = d.iloc[0]
        n = int(d["n_runs"].max())
        grad_norm_panel(d, ax=ax, title=f"{_panel_title(first)}\n{_label_of(first)} ({n} seed{'s' if n != 1 else ''})")
    for ax in list(grid.flat)[len(panels) :]:
        ax.set_axis_off()
    _grid_legend(fig, grid, own, [_line(CATEGORY_COLORS[c], c) for c in CATEGORIES], "entropy category")
    return fig


def drift_panel(
    drift: pd.DataFrame,
    *,
    quantity: str = "update_norm_total",
    colors: Optional[Mapping[str, tuple]] = None,
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
) -> Axes:
    """One drift `quantity` ("attention_entropy", "cka", "update_norm_total") over training, one line per
    condition of the ``drift`` rows given (e.g. every method at one learning rate); bands: 95% t interval
    over seeds. Returns the axes drawn into."""
    ax = ax if ax is not None else _new_axes(3.6, 2.8)
    d = drift[drift["quantity"] == quantity]
    _curve_lines(ax, d, "value", colors or _method_colors(d))
    _style(ax, "training progress (step / last step)", DRIFT_LABELS.get(quantity, quantity), title)
    if ax.lines:
        ax.legend(fontsize=6.5, loc="best")
    return ax


def _drift_rows(drift: pd.DataFrame) -> List[Tuple[tuple, pd.DataFrame]]:
    """The rows of the drift grid: one per model, dataset, instrument setting and learning rate (methods
    are the lines), main setting only (variants have one method; all rows when there is no main setting)."""
    base = drift[drift["variant"] == "base"] if "variant" in drift else drift
    return _panels(
        drift if base.empty else base, ("dataset", "model", "variant", "instrument_setting", "learning_rate")
    )


def drift_plot(
    drift: pd.DataFrame, *, page: int = 0, max_rows: Optional[int] = MAX_ROWS, axes=None
) -> Optional[Figure]:
    """Drift over training by method at each learning rate: one row per model, dataset, instrument setting
    and learning rate (main setting), one column per quantity (attention entropy, CKA, update norm), one
    line per method. Rows in pages of `max_rows`. Returns the figure (None without data or past the last page)."""
    if drift.empty:
        return None
    rows = _drift_rows(drift)
    if max_rows:
        rows = rows[page * max_rows : (page + 1) * max_rows]
    if not rows:
        return None
    quantities = [q for q in DRIFT_LABELS if (drift["quantity"] == q).any()]
    fig, grid, _ = _grid_into(
        axes, len(rows), len(quantities), "drift_plot", sharey=False, top=0.4, panel_w=3.4, wspace=0.9
    )
    colors = _method_colors(drift)
    for i, (_, d) in enumerate(rows):
        for k, q in enumerate(quantities):
            ax = grid[i, k]
            if not (d["quantity"] == q).any():
                ax.set_axis_off()
                continue
            drift_panel(d, quantity=q, colors=colors, ax=ax, title=_panel_title(d.iloc[0]))
    return fig


def drift_delta_panel(
    per_run: pd.DataFrame,
    *,
    measure: str = "update_norm_total",
    rho: Optional[pd.DataFrame] = None,
    colors: Optional[Mapping[str, tuple]] = None,
    ax: Optional[Axes] = None,
) -> Axes:
    """Each run's final drift `measure` against its contested examples' mean Delta L (``drift_delta_runs``
    rows), coloured by method; the title gives Spearman rho over all runs from `rho` (``drift_delta``) when
    given. Returns the axes drawn into."""
    ax = ax if ax is not None else _new_axes(3.6, 2.8)
    colors = colors or _method_colors(per_run)
    labels = [_label_of(r) for _, r in per_run.iterrows()]
    for label in dict.fromkeys(labels):
        d = per_run[[lab == label for lab in labels]]
        ax.scatter(d[measure], d["delta_loss_contested"], s=16, color=colors.get(label, "#333333"), label=label)
    ax.axhline(0, color="black", lw=0.8)
    title = DRIFT_MEASURE_LABELS.get(measure, measure)
    if rho is not None and not rho.empty:
        r = rho[(rho["measure"] == measure) & (rho["scope"] == "all runs")]
        if len(r) == 1 and np.isfinite(r["rho"].iloc[0]):
            title += f"\nrho = {r['rho'].iloc[0]:.2f} (p = {r['p_val'].iloc[0]:.2g}, {int(r['n_runs'].iloc[0])} runs)"
    _style(ax, DRIFT_MEASURE_LABELS.get(measure, measure), "contested ΔL, run mean (nats)", title)
    if ax.collections:
        ax.legend(fontsize=6.5, loc="best")
    return ax


def drift_delta_plot(per_run: pd.DataFrame, rho: Optional[pd.DataFrame] = None, *, axes=None) -> Optional[Figure]:
    """`drift_delta_panel` for each drift measure (columns) and instrument setting (rows); returns the figure
    (None without data)."""
    if per_run.empty:
        return None
    settings = sorted(per_run["instrument_setting"].dropna().unique())
    measures = list(DRIFT_MEASURE_LABELS)
    fig, grid, _ = _grid_into(
        axes,
        len(settings),
        len(measures),
        "drift_delta_plot",
        sharey=True,
        top=0.5,
        panel_w=3.4,
        wspace=0.6,
        hspace=1.0,
    )
    colors = _method_colors(per_run)
    for i, setting in enumerate(settings):
        d = per_run[per_run["instrument_setting"] == setting]
        r = rho[rho["instrument_setting"] == setting] if rho is not None and not rho.empty else None
        for j, m in enumerate(measures):
            drift_delta_panel(d, measure=m, rho=r, colors=colors, ax=grid[i, j])
            if j:
                grid[i, j].set_ylabel("")
    return fig


def instrument_figures(tables: Dict[str, pd.DataFrame], folder: str) -> Dict[str, List[str]]:
    """Draw and save the instrument figures of the report (PNG) from its instrument tables
    (`hf_entropy_callback.study.instruments.instrument_tables`); per name the files written (empty when
    the table is absent)."""
    j = os.path.join
    empty = pd.DataFrame()
    align = tables.get("grad_alignment", empty)
    norms = tables.get("grad_norms", empty)
    drift = tables.get("drift", empty)
    per_run = tables.get("drift_delta_runs", empty)
    per_page = 4 * MAX_ROWS
    return {
        "grad_alignment": _pages(
            lambda p: alignment_plot(align, page=p, per_page=per_page),
            len(_panels(align[align["pair"] == "clean~contested"])) if not align.empty else 0,
            per_page,
            j(folder, "grad_alignment.png"),
        ),
        "grad_norms": _pages(
            lambda p: grad_norm_plot(norms, page=p, per_page=per_page),
            len(_panels(norms, ("condition", "instrument_setting"))) if not norms.empty else 0,
            per_page,
            j(folder, "grad_norms.png"),
        ),
        "drift": _pages(
            lambda p: drift_plot(drift, page=p),
            len(_drift_rows(drift)) if not drift.empty else 0,
            MAX_ROWS,
            j(folder, "drift.png"),
        ),
        "drift_delta": _single(
            drift_delta_plot(per_run, tables.get("drift_delta")) if not per_run.empty else None,
            j(folder, "drift_delta.png"),
        ),
    }


# ------------------------------------------------------------------------------------------------
# The report's set
# ------------------------------------------------------------------------------------------------


def agreement_curves(
    agreement: pd.DataFrame, tracked_set: str = "validation", metric: str = "js_distance"
) -> pd.DataFrame:
    """The ``agreement`` table of one tracked set in the layout of ``curves`` (``mean`` = the metric),
    for `trajectory_plot`; ``sd`` and ``n`` are NaN and 0, so no band is drawn."""
    a = agreement[agreement["set"] == tracked_set]
    if a.empty:
        return pd.DataFrame()
    return pd.DataFrame(
        {
            "run_id": a["run_id"],
            "point": a["point"],
            "step": a["step"],
            "progress": a["progress"],
            "epoch": a["epoch"],
            "category": a["category"],
            "mean": a[metric],
            "sd": np.nan,
            "n": 0,
        }
    )


def _pages(draw, n_items: int, per_page: int, path: str) -> List[str]:
    """Draw and save each page in turn (one figure in memory at a time); the paths written."""
    pages = math.ceil(n_items / per_page)
    return [save_figure(draw(page), _paged(path, page, pages)) for page in range(pages)]


def _single(fig: Optional[Figure], path: str) -> List[str]:
    return [] if fig is None else [save_figure(fig, path)]


def all_figures(study, tables: Dict[str, pd.DataFrame], folder: str) -> Dict[str, List[str]]:
    """Draw and save the report's figures into `folder` (PNG).

    Returns, per figure name, the files written (empty when not applicable); paged grids are
    written as ``NAME_1.png``, ``NAME_2.png``, ... when they need more than one page.
    """
    j = os.path.join

    def n_rows(variants, curves=None):
        layout = _trajectory_layout(study.curves if curves is None else curves, study.runs, variants)
        return 0 if layout is None else len(layout[0])

    n_scatter = len(_scatter_conditions(study.runs, tables["rho_by_condition"]))
    agreement = getattr(study, "agreement", pd.DataFrame())
    ag_curves = agreement_curves(agreement, "validation") if not agreement.empty else pd.DataFrame()
    if ag_curves.empty and not agreement.empty:
        ag_curves = agreement_curves(agreement, str(agreement["set"].iloc[0]))
    return {
        "entropy_aulc": _pages(
            lambda p: entropy_aulc_plot(study.examples, study.runs, tables["rho_by_condition"], page=p),
            n_scatter,
            4 * MAX_ROWS,
            j(folder, "entropy_aulc.png"),
        )
        if not study.examples.empty
        else [],
        "agreement": _pages(
            lambda p: trajectory_plot(ag_curves, study.runs, page=p, ylabel="JS distance to human dist."),
            n_rows(False, ag_curves),
            MAX_ROWS,
            j(folder, "agreement.png"),
        )
        if not ag_curves.empty
        else [],
        "trajectories": _pages(
            lambda p: trajectory_plot(study.curves, study.runs, page=p),
            n_rows(False),
            MAX_ROWS,
            j(folder, "trajectories.png"),
        ),
        "trajectories_variants": _pages(
            lambda p: trajectory_plot(study.curves, study.runs, variants=True, page=p),
            n_rows(True),
            MAX_ROWS,
            j(folder, "trajectories_variants.png"),
        ),
        "entropy_histogram": _single(
            entropy_histogram(study.entropy, tables["entropy_distribution"]), j(folder, "entropy_histogram.png")
        ),
        "aulc_bins": _single(aulc_bins_plot(tables["binning"]), j(folder, "aulc_bins.png")),
        # Only with a rank sweep (the section says so when there is none).
        "rho_vs_rank": []
        if tables["rank_sweep"].empty
        else _single(rank_plot(study.runs), j(folder, "rho_vs_rank.png")),
        "noise": _single(noise_plot(tables["noise_levels"]), j(folder, "noise.png")),
        "cartography": _pages(
            lambda p: cartography_plot(study.examples, study.runs, ncols=4, page=p),
            len(_cartography_runs(study.examples, study.runs)),
            4 * MAX_ROWS,
            j(folder, "cartography.png"),
        ),
        "calibration": _single(calibration_plot(tables["calibration"]), j(folder, "calibration.png")),
        **instrument_figures(tables, folder),
    }
