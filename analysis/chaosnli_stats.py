"""Print the entropy-category counts and shares of ChaosNLI files.

    python -m analysis.chaosnli_stats [FILE_OR_ZIP ...]

With no argument it reads both ChaosNLI NLI subsets from ../shared/data/chaosnli (or
$HF_ENTROPY_SHARED_DATA/chaosnli).
"""

from __future__ import annotations

import argparse
import os
import sys

from hf_entropy_callback import DEFAULT_THRESHOLDS, category_table, load_chaosnli

DEFAULT_DIR = os.path.join(os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.join("..", "shared", "data")), "chaosnli")
DEFAULT_FILES = ("chaosNLI_snli.jsonl", "chaosNLI_mnli_m.jsonl")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", help="ChaosNLI jsonl files, the v1.0 zip, or URLs")
    parser.add_argument("--thresholds", nargs=2, type=float, default=DEFAULT_THRESHOLDS, metavar=("LOW", "HIGH"))
    args = parser.parse_args(argv)
    sources = args.sources or [os.path.join(DEFAULT_DIR, f) for f in DEFAULT_FILES]
    for src in sources:
        subsets = ("snli", "mnli") if src.endswith(".zip") else (None,)
        for subset in subsets:
            ds = load_chaosnli(src, subset=subset, thresholds=tuple(args.thresholds))
            table = category_table(ds)
            table["share"] = (100 * table["share"]).map("{:.1f}%".format)
            print(f"\n{src}{' [' + subset + ']' if subset else ''}: {len(ds)} examples")
            print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
