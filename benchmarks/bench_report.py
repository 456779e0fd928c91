"""Benchmark: build the full report from 54 synthetic runs of the study's size.

    python benchmarks/bench_report.py [--runs-dir DIR] [--keep] [--cli] [--instruments]

Each run has 1,211 tracked train and 303 validation examples (ChaosNLI-SNLI split 80/20), 3
classes, and the tracking points of a 5-epoch run at batch size 32 over 21,211 training examples
with track_every = 100 (step 0, every 100 steps, every epoch end at 663-step epochs, the final
step). The 54 runs follow `hf_entropy_callback.synthetic_runs.study_configs` (main matrix, rank sweep, IA3, label
noise, soft labels, compositions). The report runs with its defaults (1,000 bootstrap resamples
per run for the rho and ECE intervals, agreement metrics at every tracking point). Prints the
seconds spent generating, loading, computing the tables, drawing the figures and writing, and
the process's peak RSS. Target: report under 60 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_entropy_callback.synthetic_runs import (  # noqa: E402
    STUDY_TRACKED_TRAIN,
    STUDY_TRACKED_VALIDATION,
    STUDY_TRAIN_SIZE,
    study_configs,
    tracking_points,
    write_runs,
)


def peak_rss_mib(who=resource.RUSAGE_SELF) -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(who).ru_maxrss * scale / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", help="where to write the runs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs and the report")
    parser.add_argument("--cli", action="store_true", help="also time `python -m analysis` end to end (subprocess)")
    parser.add_argument("--instruments", action="store_true", help="runs carry instruments (sections 12, 13, 13b)")
    args = parser.parse_args(argv)

    work = args.runs_dir or tempfile.mkdtemp(prefix="bench_report_")
    runs_dir, report_dir = os.path.join(work, "runs"), os.path.join(work, "report")
    points = tracking_points(STUDY_TRAIN_SIZE, batch_size=32, num_epochs=5, track_every=100)
    configs = study_configs()
    print(
        f"{len(configs)} runs x {STUDY_TRACKED_TRAIN} train + {STUDY_TRACKED_VALIDATION} validation examples, "
        f"{len(points)} tracking points (steps {points.step.iloc[0]}..{points.step.iloc[-1]}), 3 classes"
        + (", instruments at every point" if args.instruments else "")
    )
    try:
        t0 = time.perf_counter()
        write_runs(runs_dir, configs, steps=points["step"].tolist(), instruments=True if args.instruments else None)
        t_gen = time.perf_counter() - t0
        rss_gen = peak_rss_mib()
        print(f"generate runs:  {t_gen:6.1f} s  (peak RSS so far {rss_gen:.0f} MiB)")

        from hf_entropy_callback.study.report import build_report

        t0 = time.perf_counter()
        report = build_report([runs_dir], report_dir, progress=False)
        t_report = time.perf_counter() - t0
        tm = report.timings
        print(f"load runs:      {tm['load']:6.1f} s")
        print(f"tables:         {tm['tables']:6.1f} s")
        print(f"figures:        {tm['figures']:6.1f} s  ({sum(len(v) for v in report.figures.values())} files)")
        print(f"write:          {tm['write']:6.1f} s")
        print(f"report total:   {t_report:6.1f} s  (target < 60 s)")
        print(f"peak RSS:       {peak_rss_mib():6.0f} MiB (whole process, generation included)")
        if args.cli:
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "analysis", runs_dir, "--out", report_dir + "_cli", "--quiet"],
                check=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            print(
                f"CLI end to end: {time.perf_counter() - t0:6.1f} s  (imports included; "
                f"peak RSS {peak_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB)"
            )
        if args.keep:
            print(f"kept: {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
