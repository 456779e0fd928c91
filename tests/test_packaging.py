"""What `pip install` puts on a user's machine: the library and its console scripts, no top-level `analysis`."""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_no_top_level_analysis_and_has_the_report_command(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(tmp_path),
            ROOT,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as zf:
        names = zf.namelist()
        top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert top == {"hf_entropy_callback"}
    assert "hf_entropy_callback/study/report.py" in names and "hf_entropy_callback/synthetic_runs.py" in names
    assert "hf-entropy-report = hf_entropy_callback.study.cli:console_main" in entry_points


def test_report_command_and_repository_entry_point_agree(tmp_path):
    for cmd in (
        [sys.executable, "-m", "hf_entropy_callback.study.cli", "--help"],
        [sys.executable, "-m", "analysis", "--help"],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "--bootstrap" in proc.stdout and "RUNS_DIR" in proc.stdout
