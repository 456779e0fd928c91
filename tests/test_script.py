"""run_glue_entropy.py end to end on tiny random models and generated data."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_entropy_callback import load_run
from hf_entropy_callback.callback import tracking_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from script_args import script_values, write_script_inputs  # noqa: E402

import run_glue_entropy  # noqa: E402

SCRIPT = os.path.join(ROOT, "run_glue_entropy.py")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_script_inputs(tmp_path_factory.mktemp("inputs"), archs=("bert", "qwen2"))


def _values(inputs, out, model="bert", **extra):
    return script_values(inputs[model], inputs["chaosnli"], inputs["bulk"], out, **extra)


def _argv(inputs, out, model="bert", **extra):
    return run_glue_entropy._as_argv(_values(inputs, out, model, **extra))


# ChaosNLI 60 -> 48 train / 12 validation; + 40 bulk = 88 examples; batch 16 -> 6 steps per epoch.
HAND_SCHEDULE = [
    (0, "step0"),
    (2, "interval"),
    (4, "interval"),
    (6, "interval+epoch_end"),
    (8, "interval"),
    (10, "interval"),
    (12, "interval+epoch_end+final"),
]


@pytest.mark.parametrize(
    "model,peft", [("bert", "none"), ("bert", "lora"), ("bert", "ia3"), ("qwen2", "lora"), ("qwen2", "ia3")]
)
def test_methods_end_to_end(inputs, tmp_path, model, peft):
    summary = run_glue_entropy.main(_argv(inputs, tmp_path, model, peft=peft))
    run = load_run(str(tmp_path))
    assert tracking_schedule(88, 16, 2, track_every=2) == HAND_SCHEDULE
    assert list(zip(run.points["step"], run.points["reason"])) == HAND_SCHEDULE
    assert len(run.set_examples("train")) == 48 and len(run.set_examples("validation")) == 12
    cfg = run.config
    assert cfg["method"] == {"none": "full", "lora": "lora", "ia3": "ia3"}[peft]
    assert cfg["architecture"] == ("decoder" if model == "qwen2" else "encoder")
    assert cfg["n_train"] == 88 and cfg["trainable_params"] > 0 and len(cfg["class_weights"]) == 3
    if peft != "none":
        assert cfg["trainable_params"] < cfg["total_params"]
    assert summary["n_examples"] == 48 and summary["validation_accuracy"] is not None
    with open(tmp_path / "entropy_tracking" / "summary.json") as fh:
        assert json.load(fh)["n_examples"] == 48
    with open(tmp_path / "eval_results.json") as fh:
        assert "eval_accuracy" in json.load(fh)
    # the saved model reloads for evaluation and reproduces the last tracked point
    _check_reload(tmp_path, inputs[model], peft, run)


def _check_reload(out, base, peft, run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    if peft == "none":
        model = AutoModelForSequenceClassification.from_pretrained(str(out))
    else:
        from peft import PeftModel

        base_model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
        base_model.config.pad_token_id = tok.pad_token_id
        model = PeftModel.from_pretrained(base_model, str(out))
    model.eval()
    from hf_entropy_callback import load_chaosnli
    from hf_entropy_callback.data import split_chaosnli

    chaos = split_chaosnli(load_chaosnli(run.config["chaosnli_file"]), 0.2, seed=42)["validation"]
    enc = tok(list(chaos["premise"]), list(chaos["hypothesis"]), padding=True, return_tensors="pt")
    if model.config.model_type == "distilbert":
        enc.pop("token_type_ids")
    with torch.no_grad():
        lp = torch.log_softmax(model(**enc).logits, -1).numpy()
    np.testing.assert_allclose(lp, run.logprobs["validation"][-1], atol=1e-4)


def test_json_config_file(inputs, tmp_path):
    cfg = _values(
        inputs,
        tmp_path / "out",
        composition="balanced",
        label_noise=0.5,
        loss="soft_kl",
        label_noise_exclude_original=True,
    )
    path = tmp_path / "args.json"
    path.write_text(json.dumps(cfg))
    run_glue_entropy.main([str(path)])
    run = load_run(str(tmp_path / "out"))
    assert run.config["composition"] == "balanced" and run.config["loss"] == "soft_kl"
    ex = run.set_examples("train")
    counts = ex["category"].value_counts()
    assert counts.nunique() == 1  # balanced: equal numbers per category
    clean = ex[ex["category"] == "clean"]
    assert clean["noised"].sum() == round(0.5 * len(clean)) and not ex[ex["category"] != "clean"]["noised"].any()
    # the run files keep the label before noise; with exclude_original every noised label changed
    noised = ex[ex["noised"]]
    assert (noised["label"] != noised["original_label"]).all()
    assert (ex[~ex["noised"]]["label"] == ex[~ex["noised"]]["original_label"]).all()
    assert run.config["label_noise_exclude_original"] is True


def test_resume_from_last_checkpoint(inputs, tmp_path):
    full = tmp_path / "full"
    run_glue_entropy.main(_argv(inputs, full, save_strategy="epoch"))
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    # as if interrupted after the first epoch: only checkpoint-6 and no final outputs remain
    shutil.rmtree(cut / "checkpoint-12")
    shutil.rmtree(cut / "entropy_tracking")
    run_glue_entropy.main(_argv(inputs, cut, save_strategy="epoch"))  # finds checkpoint-6 by itself
    a, b = load_run(str(full)), load_run(str(cut))
    assert a.points[["step", "reason"]].equals(b.points[["step", "reason"]])
    for name in ("train", "validation"):
        np.testing.assert_allclose(a.logprobs[name], b.logprobs[name], atol=1e-6)


def test_smoke_preset_cli(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "smoke", "--output_dir", str(out), "--use_cpu", "true"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spearman entropy vs aulc" in proc.stdout and "contested" in proc.stdout
    assert load_run(str(out)).config["preset"] == "smoke"


def test_help_lists_study_flags():
    proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for flag in (
        "--task",
        "--chaosnli_file",
        "--train_file",
        "--bulk_size",
        "--chaosnli_val_fraction",
        "--composition",
        "--label_noise",
        "--loss",
        "--track_every",
        "--peft",
        "--r",
        "--lora_alpha",
        "--lora_dropout",
        "--target_modules",
        "--learning_rate",
        "--resume_from_checkpoint",
    ):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    "extra,match",
    [
        (dict(peft="qlora"), "--peft must be one of"),
        (dict(task="rte"), "--task must be snli or mnli"),
        (dict(composition="medium"), "--composition"),
        (dict(label_noise=1.5), "--label_noise"),
        (dict(chaosnli_file="/nonexistent/chaos.jsonl"), "ChaosNLI file not found"),
        (dict(train_file="/nonexistent/bulk.jsonl"), "Bulk training file not found"),
        (dict(resume_from_checkpoint="/nonexistent/ckpt"), "no such checkpoint"),
    ],
)
def test_bad_flags_and_missing_files_are_usage_errors(inputs, tmp_path, extra, match, capsys):
    with pytest.raises(SystemExit) as exc:
        run_glue_entropy.main(_argv(inputs, tmp_path, **extra))
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "entropy_tracking")


@pytest.mark.parametrize(
    "extra,error,match",
    [
        (dict(model_name_or_path="/nonexistent/model"), FileNotFoundError, "model folder not found"),
        (dict(model_name_or_path="someone/unreachable-model"), ConnectionError, "cannot be reached"),
    ],
)
def test_missing_model_fails_when_loading(inputs, tmp_path, extra, error, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error, match=match):
        run_glue_entropy.main(_argv(inputs, tmp_path, **extra))
    assert not os.path.exists(tmp_path / "entropy_tracking")


def test_unknown_flag_is_rejected(inputs, tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--no_such_flag", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no_such_flag" in proc.stderr


@pytest.mark.parametrize("script,count", [("main_matrix.sh", 78), ("rank_sweep.sh", 14), ("ablations.sh", 18)])
def test_sweeps_dry_run_parse(tmp_path, script, count):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), MODELS="/models")
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "sweeps", script)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.strip().splitlines()
    assert len(commands) == count and len(set(commands)) == count
    for line in commands:
        argv = line.split()
        assert argv[:3] == ["accelerate", "launch", "run_glue_entropy.py"]
        model_args, data_args, ent_args, training_args = run_glue_entropy.parse_args(argv[3:])
        assert model_args.model_name_or_path.startswith("/models/")
        assert training_args.output_dir.startswith(str(tmp_path))
        assert training_args.num_train_epochs == 5 and training_args.per_device_train_batch_size == 32


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(ROOT, "..", "shared", "data", "snli")), reason="../shared/data absent"
)
def test_real_data_pipeline():
    data = os.path.join(ROOT, "..", "shared", "data")
    args = run_glue_entropy.DataArguments(
        task="snli",
        chaosnli_file=os.path.join(data, "chaosnli", "chaosNLI_snli.jsonl"),
        train_file=os.path.join(data, "snli", "snli_train_subset.jsonl"),
    )
    train, tracked, val = run_glue_entropy.build_datasets(args)
    assert len(tracked) == 1211 and len(val) == 303 and len(train) == 1211 + 20000  # the study's 21,211
    assert set(tracked["example_id"]).isdisjoint(val["example_id"])
    args = run_glue_entropy.DataArguments(
        task="mnli",
        chaosnli_file=os.path.join(data, "chaosnli", "chaosNLI_mnli_m.jsonl"),
        train_file=os.path.join(data, "mnli", "mnli_train_subset.jsonl"),
    )
    with pytest.warns(UserWarning, match="only 9999 exist"):
        train, tracked, val = run_glue_entropy.build_datasets(args)
    assert len(tracked) + len(val) == 1599 and len(train) == len(tracked) + 9999


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_script_run(inputs, tmp_path):
    argv = _argv(inputs, tmp_path / "two", max_eval_samples=5)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # "--" keeps torchrun's parser from reading the script's --r as an abbreviation of its own flags
    cmd = [shutil.which("torchrun"), "--nproc_per_node", "2", "--master_port", "29531", "--", SCRIPT, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = load_run(str(tmp_path / "two"))
    assert run.config["world_size"] == 2
    # 88 examples / (2 x 16) -> 3 steps per epoch
    assert list(zip(run.points["step"], run.points["reason"])) == tracking_schedule(
        88, 16, 2, track_every=2, world_size=2
    )
    for name, n in (("train", 48), ("validation", 12)):
        ex = run.set_examples(name)
        assert len(ex) == n and ex["example_id"].is_unique and np.isfinite(run.logprobs[name]).all()
    assert proc.stdout.count("spearman entropy vs aulc") == 1  # one process writes and reports
    with open(tmp_path / "two" / "eval_results.json") as fh:
        assert json.load(fh)["eval_samples"] == 5


def test_lora_r_alias():
    assert run_glue_entropy.parse_args(["--lora_r", "16", "--output_dir", "x"])[2].r == 16
    assert run_glue_entropy.parse_args(["--r", "4", "--output_dir", "x"])[2].r == 4


def test_instrument_flags_reach_the_run(inputs, tmp_path):
    argv = _argv(inputs, tmp_path, instruments=["grad_alignment,grad_norms", "drift"])
    argv += ["--instrument_sample_per_category", "2", "--instrument_seed", "3"]
    run_glue_entropy.main(argv)
    run = load_run(str(tmp_path))
    described = run.config["instruments"]
    assert described["names"] == ["grad_alignment", "grad_norms", "drift"]
    assert (described["sample_per_category"], described["seed"], described["sample_size"]) == (2, 3, 6)
    assert described["loss"] == "class_weighted_ce"  # read from the script's ClassWeightedTrainer
    np.testing.assert_allclose(described["class_weights"], run.config["class_weights"])
    assert set(run.instruments["point"]) == set(range(len(HAND_SCHEDULE)))
    assert set(run.instruments["instrument"]) == {"grad_alignment", "grad_norms", "drift"}
    assert len(run.instrument_examples) == 6 * len(HAND_SCHEDULE)


def test_a_bulk_file_smaller_than_bulk_size_is_recorded_as_what_was_trained(inputs, tmp_path):
    """The MNLI subset holds 9,999 examples, fewer than the study's --bulk_size 20000: the run trains on all
    of them, and its record and the report must say so, not the 20,000 that was asked for."""
    from hf_entropy_callback.study.loading import load_study
    from hf_entropy_callback.study.report import build_report

    asked = tmp_path / "runs" / "asked1000-s1"
    with pytest.warns(UserWarning, match="Asked for 1000 bulk examples but only 40 exist"):
        run_glue_entropy.main(_argv(inputs, asked, bulk_size=1000, seed=1))
    exact = tmp_path / "runs" / "asked40-s2"
    run_glue_entropy.main(_argv(inputs, exact, bulk_size=40, seed=2))
    cfg = load_run(str(asked)).config
    assert (cfg["bulk_size"], cfg["n_bulk"], cfg["n_train"]) == (1000, 40, 88)
    assert load_run(str(exact)).config["n_bulk"] == 40
    rep = build_report([str(tmp_path / "runs")], str(tmp_path / "report"), progress=False, html_index=False)
    # Same training data: one condition with both seeds, its bulk setting the 40 examples trained on.
    assert len(rep.tables["conditions"]) == 1 and rep.tables["rho_by_condition"]["seeds"].tolist() == ["1, 2"]
    assert load_study([str(tmp_path / "runs")], progress=False).runs["bulk_size"].tolist() == [40, 40]
