"""The output-folder contract of a training run: fingerprint, lock and resumable checkpoints.

A run's output folder (`--output_dir`) may be reused: a rerun of the same configuration must not
redo or rewrite a finished run, a rerun with another configuration must not mix two runs under one
label, two writers must not share a folder, and a crash at any moment must leave something that
the next attempt either resumes exactly or ignores. This module holds the pieces, so that the
script, the sweeps and users' own scripts apply the same rules:

    <output_dir>/run_fingerprint.json   what the run is (the settings that change its numbers), and
                                        whether it finished: {"format_version", "config", "status",
                                        "started", "finished"}; written atomically
    <output_dir>/.lock                  {"pid", "hostname", "started"} while a process writes the folder
    <output_dir>/checkpoint-N/          the Trainer's checkpoints; one is *complete* when its Trainer
                                        state parses, its weights are whole and the tracker's trajectory
                                        (`entropy_tracking/run_config.json`) sits inside it

Decisions (see `prepare_output_dir`):

- finished run, same fingerprint           -> `"finished"`: the caller exits without writing
- any run (finished or partial), other fingerprint -> `RunConfigMismatchError` listing each
  differing key with its old and new value
- partial run, same fingerprint             -> `"resume"` (continue from `last_complete_checkpoint`)
- empty or new folder                       -> `"new"`
- a folder with checkpoints or a trajectory but no fingerprint (an older version, another script)
  cannot be checked -> `RunConfigMismatchError`
- `overwrite=True` (`--overwrite_output_dir`) and the folder holds any run -> `"new"`: the old run's
  files are *moved aside* into the sibling folder `<output_dir>.old-<YYYYmmdd-HHMMSS>` (nothing
  is deleted; remove it yourself), as transformers 4.x's flag started over whatever the folder held.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import zipfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .models import MODEL_WEIGHT_FILES
from .runs import TRACKING_DIRNAME, write_json_atomic

logger = logging.getLogger(__name__)

FINGERPRINT_NAME = "run_fingerprint.json"
FINGERPRINT_FORMAT_VERSION = 1
LOCK_NAME = ".lock"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Files of a checkpoint that hold the model (a whole model's, or a PEFT adapter's); one of them must be
#: present (and whole).
WEIGHT_FILES = MODEL_WEIGHT_FILES + ("adapter_model.safetensors", "adapter_model.bin")

__all__ = [
    "FINGERPRINT_NAME",
    "LOCK_NAME",
    "RunFolderError",
    "RunConfigMismatchError",
    "RunLockedError",
    "RunLock",
    "library_major_versions",
    "read_fingerprint",
    "write_fingerprint",
    "mark_finished",
    "config_differences",
    "check_writable",
    "holds_run",
    "is_finished",
    "prepare_output_dir",
    "checkpoint_problems",
    "last_complete_checkpoint",
    "remove_incomplete_checkpoints",
]


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked; the message says why and what to do."""


class RunConfigMismatchError(RunFolderError):
    """The output folder holds a run of another configuration."""

    def __init__(self, message: str, differences: List[Tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences


class RunLockedError(RunFolderError):
    """Another live process writes into the output folder."""


# ---- fingerprint ---------------------------------------------------------------------------------


def library_major_versions() -> Dict[str, Optional[str]]:
    """`major.minor` of torch, transformers and peft: releases whose numbers may differ.

    Patch releases are left out on purpose (they fix bugs, they rarely move numbers), so that a
    resumed run is not refused after a patch upgrade.

    Returns:
        `Dict[str, Optional[str]]`: e.g. `{"torch": "2.13", "transformers": "5.24", "peft": "0.21"}`;
        `None` for a library that is not installed.
    """
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "peft"):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
            continue
        out[name] = ".".join(re.split(r"[.+]", version)[:2])
    return out


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def read_fingerprint(output_dir: str) -> Optional[Dict[str, Any]]:
    """The folder's `run_fingerprint.json`, or `None` when there is none.

    Args:
        output_dir (`str`): the run's output folder.

    Raises:
        RunFolderError: the file exists but is not a fingerprint (names the file).
    """
    path = os.path.join(output_dir, FINGERPRINT_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise RunFolderError(
            f"{path}: unreadable run fingerprint ({err}); move the folder aside or pass --overwrite_output_dir"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise RunFolderError(f"{path}: not a run fingerprint (no 'config' object)")
    return data


def write_fingerprint(output_dir: str, config: Mapping[str, Any], status: str = "running") -> str:
    """Write `<output_dir>/run_fingerprint.json` atomically.

    Args:
        output_dir (`str`): the run's output folder (created if missing).
        config (`Mapping[str, Any]`): the settings that change the run's numbers (JSON values).
        status (`str`, *optional*, defaults to `"running"`): `"running"` or `"finished"`.

    Returns:
        `str`: the path written.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FINGERPRINT_NAME)
    old = read_fingerprint(output_dir) if os.path.isfile(path) else None
    payload = {
        "format_version": FINGERPRINT_FORMAT_VERSION,
        "config": json.loads(json.dumps(dict(config))),
        "status": status,
        "started": (old or {}).get("started") if status == "finished" else _now(),
        "finished": _now() if status == "finished" else None,
    }
    write_json_atomic(path, payload, sort_keys=True)
    return path


def mark_finished(output_dir: str) -> None:
    """Record in the fingerprint that the run finished (its last step: later reruns skip it).

    Args:
        output_dir (`str`): the run's output folder.
    """
    fp = read_fingerprint(output_dir)
    if fp is None:
        raise RunFolderError(f"{output_dir}: no {FINGERPRINT_NAME} to mark as finished")
    write_fingerprint(output_dir, fp["config"], status="finished")


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """The keys whose values differ between two fingerprints, as `(key, old, new)`, sorted by key.

    A key present on one side only counts as a difference (its missing value shown as `<absent>`),
    so a fingerprint written by a version with more keys is never taken for an equal one.

    Args:
        old (`Mapping[str, Any]`): the fingerprint found in the folder.
        new (`Mapping[str, Any]`): this run's fingerprint.

    Returns:
        `List[Tuple[str, Any, Any]]`: `(key, old value, new value)` per differing key.
    """
    absent = "<absent>"
    # Compare through JSON so that a tuple and a list, or 5 and 5.0 read back from the file, are equal.
    a = json.loads(json.dumps(dict(old)))
    b = json.loads(json.dumps(dict(new)))
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, absent), b.get(key, absent)
        if va != vb and not (isinstance(va, (int, float)) and isinstance(vb, (int, float)) and float(va) == float(vb)):
            out.append((key, va, vb))
    return out


# ---- the folder ----------------------------------------------------------------------------------


def check_writable(output_dir: str) -> None:
    """Make sure `output_dir` can be created and written, before any work is done.

    Args:
        output_dir (`str`): the run's output folder.

    Raises:
        RunFolderError: naming the folder and the cause (read-only, name too long, not a folder, ...).
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        cause = os.strerror(err.errno) if err.errno else str(err)
        raise RunFolderError(f"--output_dir {output_dir!r} is not a writable folder: {cause}") from None


def _checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def holds_run(output_dir: str) -> bool:
    """Whether `output_dir` holds a run, finished or not (a checkpoint or a tracking directory)."""
    return bool(_checkpoints(output_dir)) or os.path.isdir(os.path.join(output_dir, TRACKING_DIRNAME))


def is_finished(output_dir: str, fingerprint: Optional[Mapping[str, Any]]) -> bool:
    """Whether the run in `output_dir` finished: its `fingerprint` says so and its run directory is there."""
    return (
        fingerprint is not None
        and fingerprint.get("status") == "finished"
        and os.path.isfile(os.path.join(output_dir, TRACKING_DIRNAME, "run_config.json"))
    )


def _move_aside(output_dir: str, keep: Iterable[str]) -> Optional[str]:
    keep = set(keep) | {LOCK_NAME}
    entries = [e for e in os.listdir(output_dir) if e not in keep]
    if not entries:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{os.path.abspath(output_dir).rstrip(os.sep)}.old-{stamp}"
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f"{base}-{n}"
    os.makedirs(target)
    for entry in entries:
        os.replace(os.path.join(output_dir, entry), os.path.join(target, entry))
    return target


def prepare_output_dir(
    output_dir: str,
    config: Mapping[str, Any],
    *,
    overwrite: bool = False,
    keep: Iterable[str] = (),
) -> str:
    """Decide what a run with `config` does in `output_dir`; call it holding the folder's `RunLock`.

    Nothing is written except, with `overwrite=True`, the old run being moved aside. The caller
    writes the new fingerprint (`write_fingerprint`) once it decides to train.

    Args:
        output_dir (`str`): the run's output folder.
        config (`Mapping[str, Any]`): the new run's fingerprint (settings that change its numbers).
        overwrite (`bool`, *optional*, defaults to `False`):
            Start over when the folder holds a run (of any configuration): its files move into the sibling folder
            `<output_dir>.old-<YYYYmmdd-HHMMSS>` (the lock and the names in `keep` stay).
        keep (`Iterable[str]`, *optional*):
            Entries of the folder that are inputs, not results, and stay in place on overwrite (the
            smoke preset's `smoke_inputs`).

    Returns:
        `str`: `"finished"` (same configuration, done: do nothing), `"resume"` (same configuration,
        unfinished: continue from `last_complete_checkpoint`, or from step 0 when there is none) or
        `"new"` (nothing there, or the old run was moved aside).

    Raises:
        RunConfigMismatchError: the folder holds a run of another configuration (or one without a
            fingerprint) and `overwrite` is false; the message lists each differing key.
    """
    if not os.path.isdir(output_dir):
        return "new"
    try:
        fingerprint = read_fingerprint(output_dir)
        unreadable = None
    except RunFolderError as err:
        fingerprint, unreadable = None, str(err)
    if fingerprint is None and unreadable is None and not holds_run(output_dir):
        return "new"
    if overwrite:
        # Like transformers 4.x's flag: start over, whatever the folder holds (same settings included).
        moved = _move_aside(output_dir, keep)
        logger.warning(f"--overwrite_output_dir: starting over in {output_dir}; the old run moved to {moved}")
        return "new"
    if unreadable is not None:
        raise RunConfigMismatchError(f"{unreadable}; pass --overwrite_output_dir to start over", [])
    if fingerprint is None:
        raise RunConfigMismatchError(
            f"--output_dir {output_dir} holds a run (checkpoints or {TRACKING_DIRNAME}/) without {FINGERPRINT_NAME} "
            "(an older version or another script), so its configuration cannot be compared with this one. Use "
            "another --output_dir, or pass --overwrite_output_dir to start over (the old run is moved to "
            f"{os.path.abspath(output_dir)}.old-<timestamp>).",
            [],
        )
    diffs = config_differences(fingerprint["config"], config)
    finished = is_finished(output_dir, fingerprint)
    if not diffs:
        return "finished" if finished else "resume"
    lines = "\n".join(f"  {k}: {old!r} (in the folder) -> {new!r} (now)" for k, old, new in diffs)
    raise RunConfigMismatchError(
        f"--output_dir {output_dir} holds {'a finished' if finished else 'an unfinished'} run with another "
        f"configuration:\n{lines}\nUse another --output_dir, rerun with the folder's settings, or pass "
        f"--overwrite_output_dir to start over (the old run is moved to {os.path.abspath(output_dir)}.old-<timestamp>).",
        diffs,
    )


# ---- checkpoints ---------------------------------------------------------------------------------


def _safetensors_problem(path: str) -> Optional[str]:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return "truncated (header longer than the file)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) > size:
        return "truncated (tensor data missing)"
    return None


def _file_problem(path: str) -> Optional[str]:
    if os.path.getsize(path) == 0:
        return "empty (0 bytes)"
    if path.endswith(".safetensors"):
        return _safetensors_problem(path)
    if path.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; one cut short has no central directory.
        return "truncated (not a complete torch archive)"
    return None


def checkpoint_problems(checkpoint: str, *, require_tracking: bool = True) -> List[str]:
    """Why `checkpoint` cannot be resumed from; an empty list means it is complete.

    A checkpoint is complete when `trainer_state.json` is present and parses, the model or adapter
    weights are present, no file in it is empty or cut short (weights, optimizer, scheduler, RNG
    state: checked cheaply, from their headers), and, with `require_tracking`, the tracker's
    trajectory `entropy_tracking/run_config.json` is inside it (written right after the checkpoint).

    Args:
        checkpoint (`str`): a `checkpoint-N` folder.
        require_tracking (`bool`, *optional*, defaults to `True`): require the saved trajectory.

    Returns:
        `List[str]`: one short reason per problem.
    """
    problems = []
    state = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(state):
        problems.append("trainer_state.json is missing")
    else:
        try:
            with open(state) as fh:
                json.load(fh)
        except (OSError, ValueError) as err:
            problems.append(f"trainer_state.json does not parse ({err})")
    if not any(os.path.isfile(os.path.join(checkpoint, w)) for w in WEIGHT_FILES):
        problems.append(f"no model weights ({' / '.join(WEIGHT_FILES)})")
    for name in sorted(os.listdir(checkpoint)):
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path):
            why = _file_problem(path)
            if why:
                problems.append(f"{name} is {why}")
    if require_tracking and not os.path.isfile(os.path.join(checkpoint, TRACKING_DIRNAME, "run_config.json")):
        problems.append(f"{TRACKING_DIRNAME}/run_config.json is missing (the trajectory was not saved)")
    return problems


def last_complete_checkpoint(output_dir: str, *, require_tracking: bool = True) -> Optional[str]:
    """The newest complete `checkpoint-N` of `output_dir` (see `checkpoint_problems`), or `None`.

    Unlike `transformers.trainer_utils.get_last_checkpoint`, which returns the newest folder whatever
    it holds, incomplete checkpoints (a kill while the Trainer wrote it, or before the trajectory was
    saved beside it) are skipped, each with a logged warning naming it and why.

    Args:
        output_dir (`str`): the run's output folder.
        require_tracking (`bool`, *optional*, defaults to `True`): require the saved trajectory.

    Returns:
        `Optional[str]`: the checkpoint's path.
    """
    for step, path in reversed(_checkpoints(output_dir)):
        problems = checkpoint_problems(path, require_tracking=require_tracking)
        if not problems:
            return path
        logger.warning(f"Skipping incomplete checkpoint {path}: {'; '.join(problems)}")
    return None


def remove_incomplete_checkpoints(output_dir: str, resume_from: Optional[str]) -> List[str]:
    """Delete the checkpoints newer than `resume_from` (all of them when it is `None`).

    Training from `resume_from` writes those steps again; left in place, a half-written folder
    would make the Trainer's rotation (`save_total_limit`) delete a good checkpoint instead, and
    the next resume skip to it again. They hold nothing that can be resumed from.

    Args:
        output_dir (`str`): the run's output folder.
        resume_from (`Optional[str]`): the checkpoint training resumes from.

    Returns:
        `List[str]`: the folders removed.
    """
    start = -1
    if resume_from is not None:
        m = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(resume_from)))
        start = int(m.group(1)) if m else -1
    removed = []
    for step, path in _checkpoints(output_dir):
        if step > start:
            logger.warning(f"Removing {path}: newer than the checkpoint training resumes from, so it is rewritten")
            shutil.rmtree(path)
            removed.append(path)
    return removed


# ---- lock ----------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on an output folder: the file `<output_dir>/.lock` with pid, host and start time.

    The file is created atomically and whole (written under a temporary name, then hard-linked to
    `.lock`, which fails if it exists; on filesystems without hard links, `O_CREAT | O_EXCL`). A lock
    whose pid is dead on this host is stale (a killed run) and is taken over with a warning; a lock
    held by a live process, or by another host (whose pids cannot be checked), stops the caller with
    `RunLockedError` naming the owner. Use as a context manager; the lock is released on exit, also
    on exceptions.

    Args:
        output_dir (`str`): the run's output folder (created if missing).

    Example:

    ```python
    >>> with RunLock("runs/x"):  # doctest: +SKIP
    ...     train()
    ```
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.owner = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": _now()}
        self.held = False

    def _create(self) -> bool:
        payload = json.dumps(self.owner)
        fd, tmp = tempfile.mkstemp(dir=self.output_dir, prefix=".lock.tmp-")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(payload)
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
            try:  # no hard links here: exclusive create (a reader may briefly see it empty)
                fd2 = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "w") as fh:
                fh.write(payload)
            return True
        finally:
            os.unlink(tmp)

    def _read(self) -> Tuple[Optional[Dict[str, Any]], str]:
        try:
            with open(self.path) as fh:
                text = fh.read()
        except FileNotFoundError:
            return None, ""
        try:
            data = json.loads(text)
            return (data if isinstance(data, dict) else None), text
        except ValueError:
            return None, text

    def acquire(self) -> "RunLock":
        """Take the lock, or raise `RunLockedError` naming its owner."""
        os.makedirs(self.output_dir, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                return self
            owner, text = self._read()
            if owner is None and text == "":
                continue  # released meanwhile (or being written without hard links): try again
            if owner is None:
                raise RunLockedError(
                    f"{self.path} exists but is not a lock file written by this tool: {text[:80]!r}; "
                    "remove it if no run is writing into this folder"
                )
            who = f"pid {owner.get('pid')} on {owner.get('hostname')}, started {owner.get('started')}"
            same_host = owner.get("hostname") == socket.gethostname()
            if same_host and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"]):
                # Stale: move it to a private name first, so that of two processes taking it over
                # at once only one removes it (the other finds it gone and retries the create).
                grabbed = f"{self.path}.stale-{os.getpid()}"
                try:
                    os.replace(self.path, grabbed)
                except FileNotFoundError:
                    continue
                with open(grabbed) as fh:
                    if fh.read() != text:  # a fresh lock slipped in between: put it back
                        try:
                            os.link(grabbed, self.path)
                        except OSError:
                            pass
                        os.unlink(grabbed)
                        continue
                os.unlink(grabbed)
                logger.warning(f"Taking over the stale lock {self.path} of a dead process ({who})")
                continue
            raise RunLockedError(
                f"--output_dir {self.output_dir} is in use by another run ({who}; lock file {self.path}). "
                "Wait for it to finish or use another --output_dir"
                + ("" if same_host else "; if that host's run is dead, remove the lock file")
                + "."
            )
        raise RunLockedError(f"could not take the lock {self.path}: it keeps changing hands")

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if not self.held:
            return
        owner, _ = self._read()
        if (
            owner is not None
            and owner.get("pid") == self.owner["pid"]
            and owner.get("started") == self.owner["started"]
        ):
            os.unlink(self.path)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
