"""The real path: two tiny runs trained with run_glue_entropy.py, then the report built from them."""

import os
import sys

import pandas as pd
import pytest

from hf_entropy_callback import load_run
from hf_entropy_callback.dynamics import run_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from script_args import script_argv, write_script_inputs  # noqa: E402

import run_glue_entropy  # noqa: E402
from hf_entropy_callback.study.cli import main as analysis_main  # noqa: E402


def test_report_from_two_trained_runs(tmp_path):
    inputs = write_script_inputs(tmp_path)
    chaos, bulk, model = inputs["chaosnli"], inputs["bulk"], inputs["bert"]
    runs = tmp_path / "runs"
    for seed in (1, 2):
        run_glue_entropy.main(script_argv(model, chaos, bulk, runs / f"tiny-lora-s{seed}", seed=seed))
    report = tmp_path / "report"
    assert analysis_main([str(runs), "--out", str(report), "--quiet"]) == 0
    assert (report / "index.md").stat().st_size > 0 and (report / "index.html").stat().st_size > 0
    pngs = list((report / "figures").glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)

    per_seed = pd.read_csv(report / "tables" / "per_seed.csv")
    assert sorted(per_seed["seed"]) == [1, 2]
    for seed in (1, 2):
        summary = run_summary(load_run(str(runs / f"tiny-lora-s{seed}")))
        rho = next(r["r"] for r in summary["correlations"] if r["y"] == "aulc" and r["method"] == "spearman")
        row = per_seed[per_seed["seed"] == seed].iloc[0]
        assert row["rho"] == pytest.approx(rho)
        assert row["validation_accuracy"] == pytest.approx(summary["validation_accuracy"])
    by_cond = pd.read_csv(report / "tables" / "rho_by_condition.csv")
    assert len(by_cond) == 1 and by_cond["n_runs"].iloc[0] == 2
    assert by_cond["rho_mean"].iloc[0] == pytest.approx(per_seed["rho"].mean())
