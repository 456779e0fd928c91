"""Benchmark: build the full report from synthetic runs of the study's size (54 runs, and 10x that).

    python benchmarks/bench_report.py [--replicas 1 10] [--workers N] [--runs-dir DIR] [--reuse] [--keep] [--cli]
                                      [--instruments]

Each run has 1,211 tracked train and 303 validation examples (ChaosNLI-SNLI split 80/20), 3
classes, and the tracking points of a 5-epoch run at batch size 32 over 21,211 training examples
with track_every = 100 (step 0, every 100 steps, every epoch end at 663-step epochs, the final
step): 39 points. The runs follow `hf_entropy_callback.synthetic_runs.study_configs(replicas)`:
``replicas`` copies of the 54-run matrix (main matrix, rank sweep, IA3, label noise, soft labels,
compositions), copy j with seed s + 1000 j for each seed s of the matrix, so 10 replicas are 540
runs in the same 22 conditions with ten times the seeds (30 per main-matrix cell).

The report runs with its defaults (1,000 bootstrap resamples per run for the rho and ECE
intervals, agreement metrics at every tracking point; `--workers` as the CLI's, default 0: load
worker processes for 32+ runs each) in a fresh child process per size. Prints, per phase (loading,
tables, figures, table files), the wall seconds, the CPU seconds of the report's process and its
peak RSS by the end of the phase; the total; the load workers' CPU seconds and peak RSS when
there are workers; and the load average, since wall times on a shared machine depend on it.
Target: 540 runs under 60 s and 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hf_entropy_callback.synthetic_runs import (  # noqa: E402
    STUDY_TRACKED_TRAIN,
    STUDY_TRACKED_VALIDATION,
    STUDY_TRAIN_SIZE,
    study_configs,
    tracking_points,
    write_runs,
)

# Runs in the child: build the report and print its timings as one JSON line.
_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from hf_entropy_callback.study import report as R
t_import = time.perf_counter() - t0
import resource
cpu, rss = {}, {}
def timed(name, f):  # CPU seconds of this process in each phase, and its peak RSS (KiB on Linux) by the end of it
    def g(*a, **k):
        c = time.process_time()
        try:
            return f(*a, **k)
        finally:
            cpu[name] = cpu.get(name, 0.0) + time.process_time() - c
            rss[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return g
R.load_study, R.compute_tables = timed("load", R.load_study), timed("tables", R.compute_tables)
R.F.all_figures, R._write_tables = timed("figures", R.F.all_figures), timed("write", R._write_tables)
t0, c0 = time.perf_counter(), time.process_time()
report = R.build_report([sys.argv[1]], sys.argv[2], progress=False, workers=int(sys.argv[3]))
total, cpu["total"] = time.perf_counter() - t0, time.process_time() - c0
from hf_entropy_callback.study.loading import _worker_count
n_runs = len(report.tables["runs"])
kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker processes, if any
print(json.dumps({"import": t_import, "total": total, "n_figures": sum(len(v) for v in report.figures.values()),
                  "n_runs": n_runs, "cpu": cpu, "rss": rss, **report.timings, "workers": _worker_count(int(sys.argv[3]), n_runs),
                  "workers_cpu": kids.ru_utime + kids.ru_stime, "workers_maxrss_kib": kids.ru_maxrss}))
"""


def peak_rss_mib(who=resource.RUSAGE_SELF) -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(who).ru_maxrss * scale / 2**20


def run_report(runs_dir: str, report_dir: str, workers: int):
    """Build the report in a child process; (timings dict, the child's peak RSS in MiB, its CPU seconds)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, runs_dir, report_dir, str(workers)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"report failed (exit {proc.returncode})")
    scale = 1 if sys.platform == "darwin" else 1024
    cpu = usage.ru_utime + usage.ru_stime
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * scale / 2**20, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=[1, 10], help="sizes, in copies of the 54-run matrix"
    )
    parser.add_argument("--runs-dir", help="where to write the runs (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="reuse runs already written under --runs-dir")
    parser.add_argument("--keep", action="store_true", help="keep the runs and the reports")
    parser.add_argument("--instruments", action="store_true", help="runs carry instruments (sections 12, 13, 13b)")
    parser.add_argument("--cli", action="store_true", help="also time `python -m analysis` end to end (subprocess)")
    parser.add_argument(
        "--workers", type=int, default=0, help="load processes, as the CLI's --workers (default 0: one per CPU)"
    )
    args = parser.parse_args(argv)

    work = args.runs_dir or tempfile.mkdtemp(prefix="bench_report_")
    points = tracking_points(STUDY_TRAIN_SIZE, batch_size=32, num_epochs=5, track_every=100)
    print(
        f"runs of {STUDY_TRACKED_TRAIN} train + {STUDY_TRACKED_VALIDATION} validation examples, "
        f"{len(points)} tracking points (steps {points.step.iloc[0]}..{points.step.iloc[-1]}), 3 classes; "
        f"{os.cpu_count()} CPUs"
    )
    try:
        for replicas in args.replicas:
            configs = study_configs(replicas)
            runs_dir = os.path.join(work, f"runs_x{replicas}" + ("_instruments" if args.instruments else ""))
            report_dir = os.path.join(work, f"report_x{replicas}")
            print(f"\n== {len(configs)} runs ({replicas} x the 54-run matrix) ==")
            if args.reuse and os.path.isdir(runs_dir) and len(os.listdir(runs_dir)) == len(configs):
                print(f"generate runs:  reused {runs_dir}")
            else:
                t0 = time.perf_counter()
                write_runs(
                    runs_dir, configs, steps=points["step"].tolist(), instruments=True if args.instruments else None
                )
                print(f"generate runs:  {time.perf_counter() - t0:6.1f} s")
            load0 = os.getloadavg()[0]
            tm, rss, cpu = run_report(runs_dir, report_dir, args.workers)
            c = tm["cpu"]
            mib = {k: v * (1 if sys.platform == "darwin" else 1024) / 2**20 for k, v in tm["rss"].items()}
            print(
                f"load runs:      {tm['load']:6.1f} s  (CPU {c['load']:.1f} s; peak RSS by then {mib['load']:.0f} MiB)"
            )
            print(f"tables:         {tm['tables']:6.1f} s  (CPU {c['tables']:.1f} s; {mib['tables']:.0f} MiB)")
            print(
                f"figures:        {tm['figures']:6.1f} s  (CPU {c['figures']:.1f} s; {mib['figures']:.0f} MiB; "
                f"{tm['n_figures']} files)"
            )
            print(
                f"write:          {tm['write']:6.1f} s  (CPU {c['write']:.1f} s in the table files; {mib['write']:.0f} MiB)"
            )
            print(
                f"report total:   {tm['total']:6.1f} s  (CPU {c['total']:.1f} s; imports {tm['import']:.1f} s more; "
                "target < 60 s)"
            )
            print(
                f"process CPU:    {cpu:6.1f} s  (imports included; load average {load0:.1f} before, "
                f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs)"
            )
            if tm["workers"] > 1:
                wrss = tm["workers_maxrss_kib"] * (1 if sys.platform == "darwin" else 1024) / 2**20
                print(
                    f"load workers:   {tm['workers']} processes, CPU {tm['workers_cpu']:.1f} s, peak RSS "
                    f"{wrss:.0f} MiB the largest (the report process's own figures are above and below)"
                )
                print(
                    f"peak RSS:       {rss:6.0f} MiB the report's process; with its workers at most "
                    f"{rss + tm['workers'] * wrss:.0f} MiB (target < 2048 MiB)"
                )
            else:
                print(f"peak RSS:       {rss:6.0f} MiB (the report's process; target < 2048 MiB)")
            if args.cli:
                t0 = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "analysis", runs_dir, "--out", report_dir + "_cli", "--quiet"]
                    + ["--workers", str(args.workers)],
                    check=True,
                    cwd=ROOT,
                )
                print(f"CLI end to end: {time.perf_counter() - t0:6.1f} s  (imports included)")
        if args.keep:
            print(f"kept: {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
