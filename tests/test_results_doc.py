"""docs/results/summary_tables.py, which prints RESULTS.md's tables from a report folder: every number it
prints is the report's, runs near chance are marked, and the matched-learning-rate rows are the report's."""

import importlib.util
import os

import pandas as pd
import pytest

from hf_entropy_callback.study.loading import Options
from hf_entropy_callback.study.report import build_report
from hf_entropy_callback.synthetic_runs import Dynamics, write_synthetic_run

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "results", "summary_tables.py")
STEPS = [0, 50, 100]


def _script():
    spec = importlib.util.spec_from_file_location("summary_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sections(text):
    """'### Title' -> the markdown table under it, as a DataFrame of strings."""
    out = {}
    for block in text.split("### ")[1:]:
        title, _, body = block.partition("\n")
        lines = [ln for ln in body.strip().splitlines() if ln.startswith("|")]
        if not lines:
            out[title] = pd.DataFrame()
            continue
        cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
        out[title] = pd.DataFrame(cells[2:], columns=cells[0])
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("results_doc")
    runs = root / "runs"
    learned = Dynamics(final_loss=0.1, entropy_slope=0.8, noise_sd=0.4)
    stuck = Dynamics(final_loss=1.6, entropy_slope=0.0, length_slope=0.0, noise_sd=0.3)
    for lr in (1e-4, 5e-5):
        for seed in (1, 2):
            for method in ("lora", "full"):
                cfg = {"method": method, "rank": 8 if method == "lora" else None, "learning_rate": lr, "seed": seed}
                dyn = stuck if (method == "lora" and lr == 5e-5) else learned
                name = f"{method}_lr{lr:g}_s{seed}"
                write_synthetic_run(str(runs / name), cfg, n_train=40, n_val=30, steps=STEPS, dynamics=dyn)
    folder = root / "report"
    build_report([str(runs)], str(folder), progress=False, options=Options(n_boot=50), html_index=False)
    return folder


def test_summary_tables_print_the_reports_numbers(report, capsys):
    _script().main([str(report)])
    sections = _sections(capsys.readouterr().out)
    per_seed = pd.read_csv(report / "tables" / "per_seed.csv")
    per_run = sections["Per run"]
    assert len(per_run) == len(per_seed) == 8
    for got, want in zip(per_run.itertuples(index=False), per_seed.itertuples(index=False)):
        assert got.condition == want.condition and float(got[per_run.columns.get_loc("rho(H, AULC)")]) == pytest.approx(
            want.rho, abs=5e-4
        )
        assert got[per_run.columns.get_loc("val. acc.")].endswith("NOT LEARNED") == (not want.learned)
    rho = pd.read_csv(report / "tables" / "rho_by_condition.csv")
    cond = sections["Per condition"].set_index("condition")
    for r in rho.itertuples(index=False):
        assert float(cond.loc[r.condition, "rho mean"]) == pytest.approx(r.rho_mean, abs=5e-4)
        assert cond.loc[r.condition, "seeds"].endswith("(2 not learned)") == (r.n_not_learned == 2)
    assert sum(cond["seeds"].str.contains("not learned")) == 1


def test_summary_tables_show_the_matched_learning_rates(report, capsys):
    _script().main([str(report)])
    got = _sections(capsys.readouterr().out)["Matched learning rates"]
    want = pd.read_csv(report / "tables" / "matched_lr.csv")
    assert len(got) == len(want) == 4
    for g, w in zip(got.itertuples(index=False), want.itertuples(index=False)):
        assert float(g[got.columns.get_loc("learning rate")]) == pytest.approx(w.learning_rate)
        assert float(g[got.columns.get_loc("rho mean")]) == pytest.approx(w.rho_mean, abs=5e-4)
        assert g[got.columns.get_loc("val. acc.")].endswith("underfit") == bool(w.underfit)
    # LoRA at the low rate sat at chance; full fine-tuning did not.
    assert want.loc[want["underfit"], "method"].str.contains("LoRA").all() and want["underfit"].sum() == 1
