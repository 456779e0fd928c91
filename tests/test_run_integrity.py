"""run_glue_entropy.py and its output folder: reruns, locks, crash windows, divergence, bad input.

Each test runs the script the way a user does (``main([...])`` or a subprocess) on tiny random
models and generated data, then looks at the files on disk and the exit status.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from hf_entropy_callback import load_run
from hf_entropy_callback.testing import write_synthetic_chaosnli

# The script's folder errors (hf_entropy_callback.run_folder.RunFolderError) are RuntimeErrors; the tests
# catch RuntimeError with the expected message, so that on a script without the checks they fail as
# "DID NOT RAISE" rather than on an import.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from script_args import script_argv, write_script_inputs  # noqa: E402

import run_glue_entropy  # noqa: E402

SCRIPT = os.path.join(ROOT, "run_glue_entropy.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_script_inputs(tmp_path_factory.mktemp("inputs"))


def _argv(inputs, out, **extra):
    return script_argv(inputs["bert"], inputs["chaosnli"], inputs["bulk"], out, **{"save_strategy": "epoch", **extra})


# 88 training examples, batch 16: 6 steps per epoch, checkpoints 6 and 12, 7 tracking points.
N_POINTS = 7


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """One uninterrupted run (checkpoint-6, checkpoint-12), copied by the tests that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_glue_entropy.main(_argv(inputs, out))
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _snapshot(folder):
    """{relative path: (mtime_ns, bytes)} of every file under `folder`."""
    snap = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                snap[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, fh.read())
    return snap


def _assert_same_trajectory(a_dir, b_dir, atol=1e-6):
    a, b = load_run(str(a_dir)), load_run(str(b_dir))
    assert a.points[["step", "reason"]].equals(b.points[["step", "reason"]])
    for name in ("train", "validation"):
        np.testing.assert_allclose(a.logprobs[name], b.logprobs[name], atol=atol)


def _run_cli(args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


# ---- reruns into a used folder -------------------------------------------------------------------


def test_identical_rerun_of_finished_run_rewrites_nothing(inputs, finished, tmp_path, caplog):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    summary = run_glue_entropy.main(_argv(inputs, out))
    with open(out / "train_results.json") as fh:
        assert json.load(fh)["train_loss"] > 0.5  # not rewritten as a 0-step run's 0.0
    assert _snapshot(out) == before  # not one file rewritten
    assert "already done" in caplog.text
    assert summary is not None and summary["n_examples"] == 48
    assert not os.path.exists(out / ".lock")


def test_other_configuration_on_finished_run_is_refused(inputs, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    before = _snapshot(out)
    with pytest.raises(RuntimeError) as err:
        run_glue_entropy.main(_argv(inputs, out, peft="ia3", seed=7, learning_rate=5e-2))
    message = str(err.value)
    for line in (
        "method: 'lora' (in the folder) -> 'ia3' (now)",
        "seed: 42 (in the folder) -> 7 (now)",
        "learning_rate: 0.005 (in the folder) -> 0.05 (now)",
        "--overwrite_output_dir",
    ):
        assert line in message
    assert _snapshot(out) == before  # the old run, its adapter and its labels are untouched
    assert not os.path.exists(out / ".lock")  # released although main raised

    # from the command line: exit status 1 and the differences, no traceback
    proc = _run_cli(_argv(inputs, out, seed=7))
    assert proc.returncode == 1 and "seed: 42 (in the folder) -> 7 (now)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_overwrite_output_dir_moves_the_old_run_aside(inputs, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    old_adapter = (out / "adapter_model.safetensors").read_bytes()
    run_glue_entropy.main(_argv(inputs, out, seed=7, num_train_epochs=1, overwrite_output_dir=True))
    assert load_run(str(out)).config["seed"] == 7 and len(load_run(str(out)).points) == 4
    assert not os.path.exists(out / "checkpoint-12")  # the old run's checkpoints left with it
    aside = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert len(aside) == 1
    moved = tmp_path / aside[0]
    assert (
        load_run(str(moved)).config["seed"] == 42 and (moved / "adapter_model.safetensors").read_bytes() == old_adapter
    )
    _assert_same_trajectory(finished, moved)


def test_run_without_fingerprint_is_refused_until_overwrite(inputs, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    (out / "run_fingerprint.json").unlink()  # as left by an older version of the script
    with pytest.raises(RuntimeError, match="without run_fingerprint.json"):
        run_glue_entropy.main(_argv(inputs, out))
    # --overwrite_output_dir starts over even with the same settings (it never resumes)
    run_glue_entropy.main(_argv(inputs, out, overwrite_output_dir=True))
    with open(out / "run_fingerprint.json") as fh:
        assert json.load(fh)["status"] == "finished"
    _assert_same_trajectory(finished, out)
    assert len([p for p in os.listdir(tmp_path) if p.startswith("run.old-")]) == 1


def _cut_after_first_epoch(finished, dst):
    """A run killed during its second epoch: checkpoint-6 and nothing later."""
    out = _copy(finished, dst)
    shutil.rmtree(out / "checkpoint-12")
    shutil.rmtree(out / "entropy_tracking")
    return out


def test_resume_with_other_configuration_is_refused(inputs, finished, tmp_path):
    out = _cut_after_first_epoch(finished, tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"(?s)unfinished run.*learning_rate: 0.005 .* -> 0.001"):
        run_glue_entropy.main(_argv(inputs, out, learning_rate=1e-3, seed=7))
    assert not os.path.exists(out / "entropy_tracking") and not os.path.exists(out / "checkpoint-12")
    # settings that do not change the numbers do not block the resume
    run_glue_entropy.main(
        _argv(
            inputs,
            out,
            logging_steps=1,
            run_name="renamed",
            tracking_batch_size=8,
            dataloader_num_workers=0,
            save_total_limit=3,
        )
    )
    _assert_same_trajectory(finished, out, atol=1e-5)


# ---- concurrent writers --------------------------------------------------------------------------


def _write_lock(out, pid):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, ".lock"), "w") as fh:
        json.dump({"pid": pid, "hostname": socket.gethostname(), "started": "2026-11-24T10:00:00+00:00"}, fh)


def test_second_writer_is_stopped_and_stale_lock_taken_over(inputs, tmp_path):
    out = tmp_path / "run"
    # a live process owns the folder
    owner = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        _write_lock(out, owner.pid)
        proc = _run_cli(_argv(inputs, out))
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"pid {owner.pid} on {socket.gethostname()}" in proc.stderr and "Traceback" not in proc.stderr
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written besides the owner's lock
    finally:
        owner.communicate(b"")
    # the owner died without removing its lock: stale, taken over
    assert owner.returncode == 0
    proc = _run_cli(_argv(inputs, out, save_strategy="no"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stale lock" in proc.stdout + proc.stderr
    assert not os.path.exists(out / ".lock")
    assert len(load_run(str(out)).points) == N_POINTS


# ---- crash windows -------------------------------------------------------------------------------


def test_half_written_newest_checkpoint_is_skipped(inputs, finished, tmp_path, caplog):
    out = _cut_after_first_epoch(finished, tmp_path / "run")
    # killed while the Trainer wrote checkpoint-12: weights there, optimizer cut short, no state yet
    shutil.copytree(finished / "checkpoint-12", out / "checkpoint-12")
    (out / "checkpoint-12" / "trainer_state.json").unlink()
    (out / "checkpoint-12" / "optimizer.pt").write_bytes(b"")
    shutil.rmtree(out / "checkpoint-12" / "entropy_tracking")
    run_glue_entropy.main(_argv(inputs, out))
    log = caplog.text
    assert "Skipping incomplete checkpoint" in log and "checkpoint-12: trainer_state.json is missing" in log
    assert "optimizer.pt is empty (0 bytes)" in log
    _assert_same_trajectory(finished, out)  # resumed from checkpoint-6: equal to the uninterrupted run
    assert os.path.getsize(out / "checkpoint-12" / "optimizer.pt") > 0  # rewritten whole


def test_checkpoint_without_trajectory_is_not_resumed(inputs, finished, tmp_path, caplog):
    out = _cut_after_first_epoch(finished, tmp_path / "run")
    # killed between the Trainer's checkpoint and the tracker's save beside it
    shutil.rmtree(out / "checkpoint-6" / "entropy_tracking")
    run_glue_entropy.main(_argv(inputs, out))
    run = load_run(str(out))
    assert len(run.points) == N_POINTS and not run.run_config.resumed_without_history  # all points, from step 0
    assert "checkpoint-6: entropy_tracking/run_config.json is missing" in caplog.text
    _assert_same_trajectory(finished, out)


# ---- divergence ----------------------------------------------------------------------------------


def test_diverged_run_reports_no_accuracy(inputs, tmp_path):
    out = tmp_path / "run"
    # a learning rate this large makes the weights, then the logits, NaN within the first steps
    run_glue_entropy.main(_argv(inputs, out, learning_rate=1e30, num_train_epochs=1, save_strategy="no"))
    with open(out / "eval_results.json") as fh:
        ev = json.load(fh)
    assert ev["eval_accuracy"] is None and ev["eval_macro_f1"] is None  # not the share of class 0
    assert ev["eval_non_finite_logits"] == 12 and ev["eval_diverged"] is True and ev["diverged"] is True
    with open(out / "train_results.json") as fh:
        tr = json.load(fh)
    assert tr["diverged"] is True and tr["train_loss"] is None and tr["train_loss_non_finite"] is True
    assert tr["non_finite_tracked_points"] > 0


# ---- bad input, caught before any work -----------------------------------------------------------


def _snli_like_chaosnli(path):
    """A ChaosNLI file in the SNLI subset's form (uids are SNLI pair ids)."""
    with open(write_synthetic_chaosnli(str(path), n=60)) as fh:
        records = [json.loads(line) for line in fh]
    with open(path, "w") as fh:
        for i, r in enumerate(records):
            r["uid"] = r["example"]["uid"] = f"{1000 + i}.jpg#0r1{'enc'[i % 3]}"
            fh.write(json.dumps(r) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "extra,match",
    [
        (dict(learning_rate="nan"), "--learning_rate must be a finite number > 0, got nan"),
        (dict(learning_rate=0), "--learning_rate must be a finite number > 0, got 0"),
        (dict(num_train_epochs=0), r"--num_train_epochs \(0.0\) or --max_steps \(-1\) must be > 0"),
        (dict(bulk_size=-1), "--bulk_size must be >= 0"),
        (dict(lora_alpha=0), "--lora_alpha must be a finite number > 0, got 0"),
        (dict(r=0), r"--r \(LoRA rank\) must be >= 1, got 0"),
        (dict(chaosnli_val_fraction=0), r"--chaosnli_val_fraction must be in \(0, 1\), got 0"),
        (dict(chaosnli_val_fraction=1), r"--chaosnli_val_fraction must be in \(0, 1\), got 1"),
        (dict(max_tracked_samples=0), "--max_tracked_samples must be >= 1 when given, got 0"),
        (dict(track_every=-1), "--track_every must be >= 0"),
        (dict(tracking_batch_size=0), "--tracking_batch_size must be >= 1, got 0"),
        (dict(instruments=["grad_alignment,gradnorms"]), r"--instruments: unknown instrument\(s\) \['gradnorms'\]"),
        (dict(instrument_sample_per_category=-1), "--instrument_sample_per_category must be >= 0"),
        ("snli_file_as_mnli", r"holds ChaosNLI SNLI examples \(line 1: uid '1000.jpg#0r1e'\) but --task is mnli"),
    ],
)
def test_bad_values_fail_before_any_work(inputs, tmp_path, capsys, extra, match):
    if extra == "snli_file_as_mnli":
        extra = dict(task="mnli", chaosnli_file=_snli_like_chaosnli(tmp_path / "chaosNLI_snli.jsonl"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run_glue_entropy.main(_argv(inputs, out, **extra))
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not os.path.exists(out)  # nothing created: it stopped before the folder, data and model


@pytest.mark.parametrize("kind", ["overlong", "a file", "read-only"])
def test_unusable_output_dir_fails_before_training(inputs, tmp_path, kind):
    if kind == "overlong":
        out = tmp_path / ("x" * 300)
    elif kind == "a file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        out = parent / "run"
    proc = _run_cli(_argv(inputs, out), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "Traceback" not in proc.stderr and "--output_dir" in proc.stderr and "is not a writable folder" in proc.stderr
    )
    # the smoke preset, which writes its inputs into the output folder while parsing, says the same
    proc = _run_cli(["--preset", "smoke", "--output_dir", str(out), "--use_cpu", "true"], timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--output_dir" in proc.stderr


def test_failed_start_leaves_no_fingerprint(inputs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        run_glue_entropy.main(_argv(inputs, out, model_name_or_path=str(tmp_path / "no-model"), save_strategy="no"))
    assert not os.path.exists(out / "run_fingerprint.json") and not os.path.exists(out / ".lock")
    # so the corrected command is a new run, not "another configuration" ...
    run_glue_entropy.main(_argv(inputs, out, save_strategy="no"))
    assert len(load_run(str(out)).points) == N_POINTS
    # ... and the folder now refuses the wrong one
    with pytest.raises(RuntimeError, match="model_name_or_path"):
        run_glue_entropy.main(_argv(inputs, out, model_name_or_path=str(tmp_path / "no-model"), save_strategy="no"))


# ---- smoke preset inputs written by several processes --------------------------------------------


def test_interrupted_smoke_input_write_is_not_trusted(tmp_path, monkeypatch):
    from hf_entropy_callback import testing

    out = tmp_path / "run"
    real = testing.save_tiny_model

    def killed_midway(path, arch="bert", **kw):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as fh:
            fh.write('{"model_type": "be')  # the process dies here
        raise KeyboardInterrupt

    monkeypatch.setattr(testing, "save_tiny_model", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        run_glue_entropy.preset_values("smoke", str(out))
    monkeypatch.setattr(testing, "save_tiny_model", real)
    values = run_glue_entropy.preset_values("smoke", str(out))
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(values["model_name_or_path"])  # whole, not the half-write
    assert [p for p in os.listdir(out / "smoke_inputs") if p.startswith(".")] == []


def test_concurrent_smoke_input_writers(tmp_path):
    out = str(tmp_path / "run")
    code = "import sys, run_glue_entropy as r, json; print(json.dumps(r.preset_values('smoke', sys.argv[1])))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            cwd=ROOT,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-1500:] for r in results]
    values = [json.loads(r[0].strip().splitlines()[-1]) for r in results]
    assert all(v == values[0] for v in values)
    from transformers import AutoModelForSequenceClassification

    from hf_entropy_callback import load_chaosnli
    from hf_entropy_callback.data import load_bulk

    AutoModelForSequenceClassification.from_pretrained(values[0]["model_name_or_path"])
    assert len(load_chaosnli(values[0]["chaosnli_file"])) == 60 and len(load_bulk(values[0]["train_file"])) == 40
    assert [p for p in os.listdir(os.path.join(out, "smoke_inputs")) if p.startswith(".")] == []


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_smoke_preset_and_rerun(tmp_path):
    out = tmp_path / "two"
    cmd = [
        shutil.which("torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        "29537",
        "--",
        SCRIPT,
        "--preset",
        "smoke",
        "--output_dir",
        str(out),
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_run(str(out)).config["world_size"] == 2
    assert not os.path.exists(out / ".lock")
    before = _snapshot(out)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)  # both processes: done
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already done" in proc.stdout + proc.stderr and _snapshot(out) == before
