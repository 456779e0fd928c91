"""Build the study's report from run directories.

    hf-entropy-report RUNS_DIR [RUNS_DIR ...] --out REPORT_DIR     (or, in the repository: python -m analysis ...)

Finds every run below the given folders (``entropy_tracking/run_config.json``), groups them into
conditions (every setting that changes the numbers; seeds as replicates; see hf_entropy_callback.study.conditions) and writes REPORT_DIR
with index.md (and index.html) linking every table (markdown + CSV) and figure (PNG).

REPORT_DIR must be new, empty or a report written earlier by this command (it holds the marker
file .hf_entropy_report and is replaced as a whole); it may not be, hold or lie inside a run
folder given as input. Errors (no runs, an unreadable run, a refused or unwritable REPORT_DIR)
are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from hf_entropy_callback.runs import RunFormatError

from .conditions import MAIN_RANKS, NoRunsFoundError
from .loading import DEFAULT_BOOTSTRAP, DEFAULT_BOOTSTRAP_SEED, DEFAULT_CARTOGRAPHY_POINTS, DEFAULT_ECE_BINS, Options
from .report import build_report
from .tables import ALPHA, FAMILIES


def main(argv=None, prog: str = "hf-entropy-report") -> int:
    """Run the command with `argv` (default: the command line); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="folders holding run directories (recursive)")
    parser.add_argument(
        "--out",
        required=True,
        metavar="REPORT_DIR",
        help="report folder to write (new, empty, or an earlier report, which is replaced)",
    )
    parser.add_argument("--alpha", type=float, default=ALPHA, help="significance level (default %(default)s)")
    parser.add_argument("--train-set", default="train", help="tracked set with trajectories (default %(default)s)")
    parser.add_argument(
        "--validation-set", default="validation", help="tracked set for validation accuracy (default %(default)s)"
    )
    parser.add_argument("--no-html", action="store_true", help="write index.md only")
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip (and list in the report) runs that cannot be read instead of stopping",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="main",
        help="correction family of the condition test: the study's main-matrix conditions present "
        "(base variant, LoRA at --main-ranks, IA3, full FT) or all conditions (default %(default)s)",
    )
    parser.add_argument(
        "--main-ranks",
        default=",".join(map(str, MAIN_RANKS)),
        metavar="R1,R2",
        help="LoRA ranks of the main matrix (default %(default)s)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_BOOTSTRAP,
        metavar="N",
        help="bootstrap resamples of the examples for the CIs of rho and ECE; 0 disables (default %(default)s)",
    )
    parser.add_argument("--bootstrap-seed", type=int, default=DEFAULT_BOOTSTRAP_SEED, help="(default %(default)s)")
    parser.add_argument(
        "--ece-bins", type=int, default=DEFAULT_ECE_BINS, help="equal-width ECE bins (default %(default)s)"
    )
    parser.add_argument(
        "--cartography-points",
        choices=("epoch_end", "all"),
        default=DEFAULT_CARTOGRAPHY_POINTS,
        help="tracking points of Dataset Cartography: one per epoch end, as Swayamdipta et al. (default), or all",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="processes that load the runs: 0 one per CPU for large studies (at least 32 runs each), 1 none "
        "(default %(default)s; the numbers do not depend on it)",
    )
    args = parser.parse_args(argv)
    if args.bootstrap < 0 or args.ece_bins < 1 or args.workers < 0:
        parser.error("--bootstrap and --workers must be >= 0 and --ece-bins >= 1")
    try:
        main_ranks = tuple(int(r) for r in args.main_ranks.split(",") if r.strip())
    except ValueError:
        parser.error(f"--main-ranks: expected integers separated by commas, got {args.main_ranks!r}")
    options = Options(
        n_boot=args.bootstrap,
        boot_seed=args.bootstrap_seed,
        ece_bins=args.ece_bins,
        cartography_points=args.cartography_points,
    )
    start = time.perf_counter()
    try:
        report = build_report(
            args.runs,
            args.out,
            alpha=args.alpha,
            train_set=args.train_set,
            validation_set=args.validation_set,
            html_index=not args.no_html,
            progress=False if args.quiet else None,
            skip_invalid=args.skip_invalid,
            options=options,
            family=args.family,
            main_ranks=main_ranks,
            workers=args.workers,
        )
    except (NoRunsFoundError, RunFormatError, OSError) as err:
        # OSError covers the refused REPORT_DIR (ReportFolderError), missing inputs, and a folder that cannot
        # be written (read-only, name too long): the user's mistake, so a message and no traceback.
        text = str(err) if err.args and not isinstance(err.args[0], int) else f"{err.filename}: {err.strerror}"
        print(f"error: {text}", file=sys.stderr)
        return 2
    n_fig = sum(len(v) for v in report.figures.values())
    print(f"wrote {report.index}: {len(report.tables)} tables, {n_fig} figures ({time.perf_counter() - start:.1f} s)")
    for note in report.notes:
        print(f"warning: {note}", file=sys.stderr)
    return 0


def console_main() -> None:
    """Entry point of the `hf-entropy-report` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
