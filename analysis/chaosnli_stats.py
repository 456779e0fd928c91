"""Print the entropy-category counts and shares of ChaosNLI files.

    python -m analysis.chaosnli_stats [FILE_ZIP_OR_FOLDER ...]

With no argument it reads both ChaosNLI NLI subsets from ``$HF_ENTROPY_SHARED_DATA/chaosnli``, else
from ``<repository>/../shared/data/chaosnli`` (relative to this file, as the training script and
the tests resolve it), whatever the current folder. A folder argument stands for its ChaosNLI files.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

from hf_entropy_callback import DEFAULT_THRESHOLDS, category_table, load_chaosnli

DEFAULT_FILES = ("chaosNLI_snli.jsonl", "chaosNLI_mnli_m.jsonl")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data_dir() -> str:
    """The shared data folder: ``$HF_ENTROPY_SHARED_DATA``, else ``<repository>/../shared/data``.

    The same rule as `run_glue_entropy.py` and `tests/conftest.py`, so the result does not depend
    on the folder the command is run from.
    """
    return os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.normpath(os.path.join(_REPO, "..", "shared", "data")))


def resolve_sources(sources: List[str]) -> List[str]:
    """Files to read: the given files, zips and URLs as they are; each folder's ChaosNLI files; by
    default those of ``default_data_dir()/chaosnli``.

    Raises
    ------
    FileNotFoundError
        When a folder (or the default one) holds no ChaosNLI file; the message says where it looked
        and how to point elsewhere.
    """
    default = not sources
    if default:
        sources = [os.path.join(default_data_dir(), "chaosnli")]
    where = " (from $HF_ENTROPY_SHARED_DATA)" if default and "HF_ENTROPY_SHARED_DATA" in os.environ else ""
    out = []
    for src in sources:
        remote = src == "official" or src.startswith(("http://", "https://"))
        if not default and not remote and not os.path.exists(src):
            raise FileNotFoundError(f"{src}: no such file or folder")
        if remote or os.path.isfile(src):
            out.append(src)
            continue
        found = [os.path.join(src, f) for f in DEFAULT_FILES if os.path.isfile(os.path.join(src, f))]
        if not found:
            raise FileNotFoundError(
                f"no ChaosNLI file ({', '.join(DEFAULT_FILES)}) in {os.path.abspath(src)}{where}; pass the files "
                f"or their folder as arguments, or set HF_ENTROPY_SHARED_DATA to the folder holding chaosnli/"
            )
        out += found
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.chaosnli_stats", description=__doc__.splitlines()[0])
    parser.add_argument(
        "sources",
        nargs="*",
        help="ChaosNLI jsonl files, the v1.0 zip, URLs, or folders holding the jsonl files "
        "(default: $HF_ENTROPY_SHARED_DATA/chaosnli, else <repository>/../shared/data/chaosnli)",
    )
    parser.add_argument("--thresholds", nargs=2, type=float, default=DEFAULT_THRESHOLDS, metavar=("LOW", "HIGH"))
    args = parser.parse_args(argv)
    try:
        sources = resolve_sources(args.sources)
    except FileNotFoundError as err:
        parser.error(str(err))  # exit status 2 with the usage line, no traceback
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
