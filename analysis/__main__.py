"""`python -m analysis RUNS_DIR ... --out REPORT_DIR`: the study's report (see `hf_entropy_callback.study.cli`)."""

import sys

from hf_entropy_callback.study.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m analysis"))
