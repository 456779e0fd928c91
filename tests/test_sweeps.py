"""The sweep runner (`hf_entropy_callback.sweeps`): matrices, commands, fault tolerance, parallel runs, Slurm."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import run_glue_entropy
from hf_entropy_callback import sweeps, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = [sys.executable, "-m", "hf_entropy_callback.sweeps"]


def _runner(*args, timeout=600, **kwargs):
    return subprocess.run(RUNNER + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


# ---- dry runs: counts, flags, names -------------------------------------------------------------------


@pytest.mark.parametrize(
    "matrix,count",
    [
        ("main", 78),
        ("rank_sweep", 14),
        ("ablations", 18),
        ("composition", 12),
        ("noise", 9),
        ("soft_label", 6),
        ("matched_lr", 80),
    ],
)
def test_matrix_counts(matrix, count, tmp_path):
    runs = sweeps.expand_runs([matrix], out_dir=str(tmp_path), data_dir="/data")
    assert len(runs) == count and len({r.output_dir for r in runs}) == count
    proc = _runner("--matrix", matrix, "--dry-run", "--out", str(tmp_path), "--data", "/data")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == count
    assert f"{count} runs ({matrix}: {count})" in proc.stderr
    assert "no estimate" in proc.stderr  # nothing calibrated: no invented number


def test_matched_lr_is_80_per_model(tmp_path):
    models = sweeps.resolve_models(["/m/roberta-base", "/m/bert-base-uncased"])
    runs = sweeps.expand_runs(["matched_lr"], out_dir=str(tmp_path), data_dir="/d", models=models)
    assert len(runs) == 160
    grid = {
        (r.condition.model.name, r.condition.method, r.condition.learning_rate, r.condition.task, r.seed) for r in runs
    }
    assert len(grid) == 160
    assert {g[2] for g in grid} == {1e-6, 5e-6, 1e-5, 5e-5} and {g[4] for g in grid} == {42, 123, 456, 789, 2024}
    assert {r.condition.rank for r in runs if r.condition.method == "lora"} == {8}


def test_main_matrix_roles(tmp_path):
    runs = sweeps.expand_runs(["main"], out_dir=str(tmp_path), data_dir="/d")
    names = {r.name for r in runs}
    assert "roberta-base-snli-lora-r8-s42" in names and "roberta-base-snli-ia3-s456" in names
    assert not any(n.startswith("deberta-v3-base-mnli") for n in names)  # DeBERTa: SNLI only
    assert not any(n.startswith("Qwen") and "-full-" in n for n in names)  # decoders: LoRA only
    assert sum(n.startswith("Qwen2.5-3B-snli-lora-r64") for n in names) == 3


def test_no_duplicate_folders_across_matrices(tmp_path):
    per_matrix = {m: sweeps.expand_runs([m], out_dir=str(tmp_path), data_dir="/d") for m in sweeps.MATRICES}
    runs = sweeps.expand_runs(list(sweeps.MATRICES), out_dir=str(tmp_path), data_dir="/d")
    dirs = [r.output_dir for r in runs]
    assert len(dirs) == len(set(dirs)) == 184 < sum(len(v) for v in per_matrix.values())
    shared = {r.name: r for r in runs}["roberta-base-snli-lora-r8-s42"]
    assert set(shared.matrices) == {"main", "rank_sweep", "composition", "noise", "soft_label"}
    # the same run from each matrix has the same command
    for m, mruns in per_matrix.items():
        for r in mruns:
            assert r.flags == {x.name: x for x in runs}[r.name].flags


def test_every_command_parses(tmp_path):
    out = tmp_path / "o u t"
    proc = _runner(
        "--matrix",
        "all",
        "--dry-run",
        "--models-dir",
        "/models",
        "--out",
        str(out),
        "--data",
        "/d a/ta",
        "--extra",
        "--cache_dir",
        "/a dir/with spaces",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 184 and "184 runs" in proc.stderr
    seen = set()
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == [sys.executable, "run_glue_entropy.py"]
        model_args, data_args, ent_args, training_args = run_glue_entropy.parse_args(argv[2:])
        assert model_args.model_name_or_path.startswith("/models/")
        assert model_args.cache_dir == "/a dir/with spaces"
        assert data_args.chaosnli_file.startswith("/d a/ta/chaosnli/")
        assert os.path.dirname(training_args.output_dir) == str(out)
        assert os.path.basename(training_args.output_dir) == training_args.run_name
        assert training_args.num_train_epochs == 5 and training_args.per_device_train_batch_size == 32
        name = training_args.run_name
        assert f"-s{training_args.seed}" in name
        if "-lr" in name:
            assert f"lr{training_args.learning_rate:g}" in name
        else:
            assert training_args.learning_rate == run_glue_entropy.DEFAULT_LEARNING_RATE
        if "-lora-r" in name:
            assert ent_args.peft == "lora" and f"-lora-r{ent_args.r}-" in name
        assert ("comp_" in name) == (data_args.composition != "all")
        assert ("-noise" in name) == (data_args.label_noise > 0)
        assert ("softkl" in name) == (ent_args.loss == "soft_kl")
        seen.add(name)
    assert len(seen) == 184


def test_usage_errors_name_the_flag(tmp_path):
    for args, flag in (
        (["--matrix", "nope"], "--matrix"),
        (["--matrix", "main", "--jobs", "0"], "--jobs"),
        (["--matrix", "main", "--jobs", "2", "--gpus", "0,1"], "--gpus"),
        (["--matrix", "noise", "--task-index", "9"], "--task-index"),
        (["--matrix", "noise", "--only", "zzz*"], "--only"),
        (["--matrix", "main", "--models", "/a/x", "/b/x"], "--models"),
    ):
        proc = _runner(*args, "--out", str(tmp_path), "--dry-run")
        assert proc.returncode == 2 and flag in proc.stderr, (args, proc.stderr)


def test_slots():
    assert [s[1]["CUDA_VISIBLE_DEVICES"] for s in sweeps.make_slots(gpus=["0", "1"], jobs_per_gpu=2)] == [
        "0",
        "1",
        "0",
        "1",
    ]
    assert [s[1]["CUDA_VISIBLE_DEVICES"] for s in sweeps.make_slots(gpus=list("0123"), gpus_per_job=2)] == [
        "0,1",
        "2,3",
    ]
    torch_slots = sweeps.make_slots(jobs=2, launcher=["torchrun", "--nproc_per_node", "2", "--"])
    assert len({s[1]["PET_MASTER_PORT"] for s in torch_slots}) == 2
    with pytest.raises(ValueError, match="--gpus-per-job"):
        sweeps.make_slots(gpus=["0", "1", "2"], gpus_per_job=2)


def test_estimate_from_calibration(tmp_path):
    runs = sweeps.expand_runs(["rank_sweep"], out_dir=str(tmp_path), data_dir="/nowhere")
    cal = {
        "dev": {
            m: {
                meth: {"train_step_s": 1.0, "track_batch_s": 0.5, "tracking_batch_size": 64}
                for meth in ("lora", "full")
            }
            for m in ("roberta-base", "bert-base-uncased")
        }
    }
    lines = sweeps.estimate_lines(runs, ["rank_sweep"], data_dir="/nowhere", calibration=cal, device="dev")
    # study sizes: 1,211 tracked + 20,000 bulk, batch 32, 5 epochs -> 663 x 5 steps per run
    steps = sweeps.run_steps(runs[0], sweeps.data_sizes("/nowhere", "snli"))
    assert steps["steps"] == 663 * 5 and steps["n_tracked_total"] == 1211 + 303
    per_run = 3315 * 1.0 + steps["points"] * 24 * 0.5
    assert f"{14 * per_run / 3600:.1f} h" in lines[1]
    assert (
        "no estimate"
        in sweeps.estimate_lines(runs, ["rank_sweep"], data_dir="/nowhere", calibration=cal, device="other")[1]
    )


# ---- real tiny sweeps ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model and data in the layout of --data, under a path with a space."""
    root = tmp_path_factory.mktemp("sweep") / "with space"
    testing.save_tiny_model(str(root / "models" / "tiny-bert"), "bert")
    (root / "data" / "chaosnli").mkdir(parents=True)
    testing.write_synthetic_chaosnli(str(root / "data" / "chaosnli" / "chaosNLI_snli.jsonl"), n=60)
    testing.write_synthetic_bulk(str(root / "data" / "snli" / "snli_train_subset.jsonl"), n=40)
    return root


def _args(tiny, out, *more, seeds=("1", "2")):
    return [
        "--matrix",
        "soft_label",
        "--models",
        str(tiny / "models" / "tiny-bert"),
        "--data",
        str(tiny / "data"),
        "--out",
        str(out),
        "--seeds",
        *seeds,
        *more,
    ]


def _status(out):
    with open(os.path.join(out, "sweep_status.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def swept(tiny):
    """2 conditions (CE, soft-label KL) x 2 seeds, 2 at a time, with the report."""
    out = tiny / "out"
    proc = _runner(*_args(tiny, out, "--jobs", "2", "--extra", "--preset", "smoke"))
    return out, proc


def test_tiny_sweep_runs_in_parallel_and_reports(swept):
    out, proc = swept
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = _status(out)
    assert status["counts"] == {"done": 4}
    runs = status["runs"]
    for r in runs:
        assert os.path.isfile(r["log"]) and sweeps.folder_state(r["output_dir"]) == "finished"
        assert r["command"][-2:] == ["--preset", "smoke"]
    # --jobs 2: two runs were in flight at the same time
    a, b = sorted(runs, key=lambda r: r["start_unix"])[:2]
    assert b["start_unix"] < a["end_unix"]
    assert {r["slot"] for r in runs} == {"cpu0", "cpu1"}
    assert "4 runs: 4 done" in proc.stdout and "tiny-bert-snli-lora-r8-softkl-s2" in proc.stdout
    assert os.path.isfile(out / "report" / "index.md")
    with open(out / "report" / "index.md") as fh:
        assert "tiny-bert" in fh.read()


def test_second_invocation_skips_all(swept, tiny):
    out, _ = swept
    before = os.path.getmtime(out / "tiny-bert-snli-lora-r8-s1" / "run_fingerprint.json")
    proc = _runner(*_args(tiny, out, "--no-report", "--extra", "--preset", "smoke"))
    assert proc.returncode == 0, proc.stderr
    status = _status(out)
    assert status["counts"] == {"skipped": 4} and all(r["attempts"] == 0 for r in status["runs"])
    assert os.path.getmtime(out / "tiny-bert-snli-lora-r8-s1" / "run_fingerprint.json") == before
    # Without the runner's record, the script itself says "already done": still skipped, nothing rewritten.
    os.unlink(out / ".sweep" / "tiny-bert-snli-lora-r8-s1.json")
    proc = _runner(*_args(tiny, out, "--no-report", "--only", "*-lora-r8-s1", "--extra", "--preset", "smoke"))
    assert proc.returncode == 0, proc.stderr
    [r] = _status(out)["runs"]
    assert r["status"] == "skipped" and r["attempts"] == 1


def test_failed_runs_are_reported_and_others_finish(tiny, tmp_path):
    runs = sweeps.expand_runs(
        ["soft_label"],
        out_dir=str(tmp_path),
        data_dir=str(tiny / "data"),
        seeds=[1],
        models=sweeps.resolve_models([str(tiny / "models" / "tiny-bert")]),
        extra=["--preset", "smoke"],
    )
    runs[0].flags.append("--no_such_flag")
    lines = []
    results = sweeps.run_sweep(
        runs, out_dir=str(tmp_path), slots=sweeps.make_slots(jobs=2), retries=2, echo=lines.append
    )
    bad, good = results
    assert bad.status == "failed" and bad.exit_code != 0 and bad.attempts == 1  # a usage error is not retried
    assert "not retried" in bad.note
    assert good.status == "done"
    with open(bad.log) as fh:
        assert "no_such_flag" in fh.read()
    failed = [x for x in lines if x.startswith("[FAILED]")]
    assert len(failed) == 1 and bad.log in failed[0] and "--no_such_flag" in failed[0]
    table = sweeps.format_summary_table(results)
    assert "1 done, 1 failed" in table and f"log: {bad.log}" in table
    # the command line: a failing sweep exits non-zero and says which run failed and where its log is
    proc = _runner(*_args(tiny, tmp_path / "cli", "--no-report", seeds=("1",)), "--extra", "--no_such_flag")
    assert proc.returncode == 1
    assert _status(tmp_path / "cli")["counts"] == {"failed": 2}
    assert proc.stdout.count("FAILED tiny-bert") == 2 and "logs/tiny-bert-snli-lora-r8-s1.log" in proc.stdout


def test_interrupted_run_resumes(tiny, tmp_path):
    """A run cut off after its first checkpoint (what a kill leaves: checkpoint-2 with its trajectory, no later
    checkpoint, no final outputs, the fingerprint still "running") is resumed by the next invocation.

    The folder is cut back after a full run rather than killed live: a smoke run takes seconds, so a kill
    timed on a checkpoint's appearance raced with the run's end (and with checkpoint rotation).
    """
    out = tmp_path / "out"
    args = _args(tiny, out, "--no-report", "--only", "*-lora-r8-s1", seeds=("1",))
    args += [
        "--extra",
        "--preset",
        "smoke",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--save_total_limit",
        "10",
    ]
    assert _runner(*args).returncode == 0
    run_dir = out / "tiny-bert-snli-lora-r8-s1"
    assert (run_dir / "checkpoint-2" / "entropy_tracking" / "run_config.json").exists()
    for path in run_dir.iterdir():
        if (path.name.startswith("checkpoint-") and path.name != "checkpoint-2") or path.name == "entropy_tracking":
            shutil.rmtree(path)
        elif path.name.endswith("_results.json") or path.name == "trainer_state.json":
            path.unlink()
    fingerprint = json.loads((run_dir / "run_fingerprint.json").read_text())
    fingerprint["status"] = "running"
    (run_dir / "run_fingerprint.json").write_text(json.dumps(fingerprint))
    assert sweeps.folder_state(str(run_dir)) == "partial"
    done = _runner(*args)
    assert done.returncode == 0, done.stdout[-2000:]
    [r] = _status(out)["runs"]
    assert r["status"] == "done" and r["resumed"]
    with open(r["log"]) as fh:
        log = fh.read()
    assert log.count("===== attempt 1") == 2  # both invocations' output, one log
    assert "Resuming training from the last complete checkpoint" in log
    assert sweeps.folder_state(str(run_dir)) == "finished"


def test_slurm_script_runs_a_task_by_index(swept, tiny):
    out, _ = swept
    proc = _runner(
        *_args(
            tiny,
            out,
            "--slurm",
            "--slurm-throttle",
            "2",
            "--slurm-partition",
            "gpu",
            "--slurm-time",
            "02:00:00",
            "--slurm-gpus",
            "1",
            "--slurm-cpus",
            "4",
            "--slurm-mem",
            "16G",
            seeds=("1", "2", "3"),
        ),
        "--extra",
        "--preset",
        "smoke",
    )
    assert proc.returncode == 0, proc.stderr
    script = out / "slurm" / "hf-entropy-soft_label.sbatch"
    assert f"sbatch --parsable {shlex.quote(str(script))}" in proc.stdout
    text = script.read_text()
    for line in (
        "#SBATCH --array=0-5%2",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=02:00:00",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=16G",
        f"#SBATCH --output={out}/slurm/logs/%A_%a.out",
        "#   4 tiny-bert-snli-lora-r8-s3",
    ):
        assert line in text.splitlines(), line
    assert text.rstrip().endswith('--task-index "$SLURM_ARRAY_TASK_ID" --extra --preset smoke')
    report_script = (out / "slurm" / "hf-entropy-soft_label-report.sbatch").read_text()
    assert "--collect" in report_script
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="4")
    task = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert task.returncode == 0, task.stdout[-2000:] + task.stderr[-2000:]
    assert sweeps.folder_state(str(out / "tiny-bert-snli-lora-r8-s3")) == "finished"
    with open(out / ".sweep" / "task-4.json") as fh:
        assert [r["status"] for r in json.load(fh)["runs"]] == ["done"]
    # a resubmitted array's task of a finished run skips it
    env["SLURM_ARRAY_TASK_ID"] = "0"
    task = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert task.returncode == 0 and "[skipped] tiny-bert-snli-lora-r8-s1" in task.stdout
    # the report job: collects the records, writes the status file
    rep = subprocess.run(
        [
            "bash",
            "-c",
            report_script.replace("exec ", "")
            .replace("set -euo pipefail", "")
            .replace("--collect", "--collect --no-report"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 1  # seed 3's softkl run never ran
    counts = _status(out)["counts"]
    assert counts["not started"] == 1 and counts.get("done", 0) + counts.get("skipped", 0) == 5


def test_report_compares_methods_at_matched_learning_rates(tmp_path):
    """The report's matched-LR section: one row per model x dataset x rate x method, its rho the mean of
    the per-seed table's."""
    import pandas as pd

    from hf_entropy_callback.study.report import build_report
    from hf_entropy_callback.synthetic_runs import write_synthetic_run

    for method, rank in (("full", None), ("lora", 8)):
        for lr in (1e-5, 5e-5):
            for seed in (1, 2):
                write_synthetic_run(
                    str(tmp_path / "runs" / f"{method}-{lr:g}-s{seed}"),
                    {"method": method, "rank": rank, "learning_rate": lr, "seed": seed},
                    n_train=60,
                    n_val=20,
                )
    build_report([str(tmp_path / "runs")], str(tmp_path / "report"), progress=False)
    table = pd.read_csv(tmp_path / "report" / "tables" / "matched_lr.csv")
    assert len(table) == 4 and set(table["learning_rate"]) == {1e-5, 5e-5}
    per_seed = pd.read_csv(tmp_path / "report" / "tables" / "per_seed.csv")
    row = table[(table["method"].str.startswith("LoRA")) & (table["learning_rate"] == 5e-5)].iloc[0]
    lora = per_seed[per_seed["run_id"].str.startswith("lora-5e-05")]
    assert row["n_runs"] == 2 and row["rho_mean"] == pytest.approx(lora["rho"].mean())
    assert len(per_seed) == 8 and per_seed["condition"].nunique() == 4  # each rate x method its own condition
    assert "18. Matched learning rates" in (tmp_path / "report" / "index.md").read_text()
