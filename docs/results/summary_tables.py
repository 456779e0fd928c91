"""Print the condensed tables of docs/RESULTS.md from a report folder built by `python -m analysis`.

    python docs/results/summary_tables.py REPORT_DIR

Every number comes from the report's CSV tables (tables/per_seed.csv, delta_loss.csv,
grad_alignment.csv, rho_by_condition.csv, matched_lr.csv); this script only selects columns and rounds, so
RESULTS.md can be regenerated from the same runs without copying numbers by hand.
"""

from __future__ import annotations

import argparse
import os

import pandas as pd

from hf_entropy_callback.study.report import markdown_table


def _fmt(x, digits=3):
    return "—" if pd.isna(x) else f"{x:+.{digits}f}"


def _p(x):
    return "—" if pd.isna(x) else f"{x:.2g}"


def _not_learned(row) -> bool:
    # The report's `learned` column: False less than 5 points above chance, empty without a validation set.
    return str(getattr(row, "learned", "")) == "False"


def per_run(tables: str) -> pd.DataFrame:
    """One row per usable run: rho(entropy, AULC) with its CI and one-sided p, tau, validation accuracy."""
    seeds = pd.read_csv(os.path.join(tables, "per_seed.csv"))
    seeds = seeds[seeds["status"] == "ok"]
    rows = []
    for r in seeds.itertuples(index=False):
        rows.append(
            {
                "condition": r.condition,
                "seed": int(r.seed),
                "steps": int(r.final_step),
                "val. acc.": f"{r.validation_accuracy:.3f}" + (" NOT LEARNED" if _not_learned(r) else ""),
                "rho(H, AULC)": _fmt(r.rho),
                "95% CI": f"[{_fmt(r.rho_ci_low)}, {_fmt(r.rho_ci_high)}]",
                "p (rho > 0)": _p(r.p_greater),
                "tau-b": _fmt(r.tau),
            }
        )
    return pd.DataFrame(rows)


def by_condition(tables: str) -> pd.DataFrame:
    """rho per condition (mean over seeds, CI, corrected p) with mean Delta L of clean and contested examples."""
    rho = pd.read_csv(os.path.join(tables, "rho_by_condition.csv"))
    dl = pd.read_csv(os.path.join(tables, "delta_loss.csv")).set_index(["condition", "category"])
    rows = []
    for r in rho.itertuples(index=False):

        def d(cat, col="delta_loss_mean", cond=r.condition):
            return dl.loc[(cond, cat), col] if (cond, cat) in dl.index else float("nan")

        rows.append(
            {
                "condition": r.condition,
                "seeds": r.seeds + (f" ({r.n_not_learned} not learned)" if getattr(r, "n_not_learned", 0) else ""),
                "rho mean": _fmt(r.rho_mean),
                "rho sd": _fmt(r.rho_sd).lstrip("+"),  # a spread, never signed
                "95% CI": f"[{_fmt(r.rho_ci_low)}, {_fmt(r.rho_ci_high)}]",
                "p_max": _p(r.p_max),
                "p Bonferroni": _p(r.p_bonf),
                "ΔL clean": _fmt(d("clean")),
                "ΔL ambiguous": _fmt(d("ambiguous")),
                "ΔL contested": _fmt(d("contested")),
                "un-learned share (contested)": _fmt(d("contested", "unlearning_share_mean"), 2).lstrip("+"),
            }
        )
    return pd.DataFrame(rows)


def alignment(tables: str) -> pd.DataFrame:
    """Cosine of each pair of categories at the first, middle and last tracking point, and its mean, per condition."""
    path = os.path.join(tables, "grad_alignment.csv")
    if not os.path.exists(path):
        return pd.DataFrame()
    ga = pd.read_csv(path)
    rows = []
    for (cond, pair), g in ga.groupby(["condition", "pair"], sort=False):
        g = g.sort_values("step")
        mid = g.iloc[len(g) // 2]
        rows.append(
            {
                "condition": cond,
                "pair": pair,
                "step 0": _fmt(g.iloc[0]["cosine_mean"]),
                f"step {int(mid['step'])}": _fmt(mid["cosine_mean"]),
                "last step": _fmt(g.iloc[-1]["cosine_mean"]),
                "mean over points": _fmt(g["cosine_mean"].mean()),
            }
        )
    # Mid-steps differ between conditions: one column for the middle point, named in the row.
    out = pd.DataFrame(rows)
    mid_cols = [c for c in out.columns if c.startswith("step ") and c != "step 0"]
    if len(mid_cols) > 1:
        out["middle point"] = out[mid_cols].bfill(axis=1).iloc[:, 0]
        out = out.drop(columns=mid_cols)
    return out.fillna("—")


def matched_lr(tables: str) -> pd.DataFrame:
    """LoRA vs full fine-tuning rate by rate (the report's matched-learning-rate table), when the runs have one."""
    path = os.path.join(tables, "matched_lr.csv")
    if not os.path.exists(path):
        return pd.DataFrame()
    rows = []
    for r in pd.read_csv(path).itertuples(index=False):
        rows.append(
            {
                "dataset": r.dataset,
                **({"settings": r.settings} if hasattr(r, "settings") and pd.notna(r.settings) else {}),
                "learning rate": f"{r.learning_rate:g}",
                "method": r.method,
                "runs": int(r.n_runs),
                "val. acc.": f"{r.validation_accuracy_mean:.3f}" + (" underfit" if r.underfit else ""),
                "rho mean": _fmt(r.rho_mean),
                "ΔL clean": _fmt(r.delta_loss_clean),
                "ΔL ambiguous": _fmt(r.delta_loss_ambiguous),
                "ΔL contested": _fmt(r.delta_loss_contested),
            }
        )
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="a report folder (holding tables/)")
    a = ap.parse_args(argv)
    tables = os.path.join(a.report, "tables")
    for title, df in (
        ("Per run", per_run(tables)),
        ("Per condition", by_condition(tables)),
        ("Gradient alignment (cosine of the categories' summed gradients)", alignment(tables)),
        ("Matched learning rates", matched_lr(tables)),
    ):
        print(f"### {title}\n")
        print(markdown_table(df) if not df.empty else "(none)")
        print()


if __name__ == "__main__":
    main()
