"""The study's matrices as data, and one fault-tolerant, parallel runner for them (local, GPUs, Slurm).

    python -m hf_entropy_callback.sweeps --matrix main --models-dir /models --out runs --jobs 2
    hf-entropy-sweep --matrix all --dry-run                   # commands, run counts, estimated compute
    hf-entropy-sweep --matrix matched_lr --models /models/roberta-base --gpus 0,1,2,3
    hf-entropy-sweep --matrix main --slurm --slurm-partition gpu --slurm-gpus 1 --slurm-throttle 8
    hf-entropy-sweep --matrix main --extra --bf16 true        # everything after --extra goes to every run

**Matrices** (`MATRICES`; seeds 42, 123, 456 unless said otherwise; LoRA ranks 8 and 64 in the main
matrix):

- `main`: encoders (roberta-base, bert-base-uncased, distilbert-base-uncased: SNLI and MNLI;
  microsoft/deberta-v3-base: SNLI) x {LoRA low rank, LoRA high rank, full FT}; decoders
  (Qwen2.5-1.5B, Qwen2.5-3B) x {LoRA low, high} on SNLI; IA3 on roberta-base / SNLI: 26 x 3 = 78 runs.
- `rank_sweep`: roberta-base and bert-base-uncased on SNLI, seed 42, LoRA r in {2, 4, 8, 16, 32, 64}
  and full FT: 14 runs (6 of them are main-matrix runs: the same runs, run once).
- `composition`: roberta-base / SNLI / LoRA r=8, ChaosNLI part all / low / high / balanced: 12 runs.
- `noise`: the same with 0%, 30%, 60% of the clean examples relabelled at random: 9 runs.
- `soft_label`: the same with cross-entropy and soft-label KL: 6 runs.
- `ablations`: composition low / high / balanced, noise 30% / 60%, soft labels, without the
  baseline (composition all, no noise, CE: a main-matrix run): 18 runs.
- `matched_lr`: {full FT, LoRA r=8} x learning rate {1e-6, 5e-6, 1e-5, 5e-5} x seeds {42, 123, 456,
  789, 2024} x {SNLI, MNLI}: 80 runs per model (default model roberta-base).

**Runs** are named `<model>-<task>-<method>[-comp_<c>][-noise<p>][-softkl][-lr<lr>]-s<seed>` (e.g.
`roberta-base-snli-lora-r8-s42`); each writes `<out>/<name>`. A run that several matrices hold is one
run. `--models` takes local folders or hub ids; a folder's basename is the model's short name, which
picks its role in the matrices (a name that is not one of the study's models is an encoder, or a
decoder when its `config.json` says so).

**Fault tolerance.** The training script owns the output-folder contract
(`hf_entropy_callback.run_folder`): a finished run of the same settings exits 0 with "already
done", an unfinished one resumes from its last complete checkpoint, other settings exit 1 listing
the differences. The runner therefore simply starts the command again; it skips a run without
starting Python only when the folder's fingerprint says *finished* and the runner's record shows the
run was last launched with the identical command (anything else goes to the script, which decides).
A failed run is retried `--retries` times (not after a usage error, exit status 2 or an unknown flag,
or a refusal of the output folder, which would fail again), logged with its command and log file, and the other runs
go on. Files under `--out`:

    <out>/<run name>/              the run (the script's output folder)
    <out>/logs/<run name>.log      the run's output, every attempt appended under a header
    <out>/.sweep/<run name>.json   the runner's record of the run's last attempt
    <out>/sweep_status.json        status of the runs of the last invocation (JSON; see `write_status`)
    <out>/report/                  the analysis report over the finished runs (unless --no-report)
    <out>/slurm/                   with --slurm: the array job script, the report job script, task logs

Exit status: 0 when every run finished (done or skipped) and the report was built, 1 when a run
failed or the report failed, 2 for a usage error, 130 / 143 when interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import os
import platform
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .run_folder import RunFolderError, holds_run, is_finished, read_fingerprint
from .runs import write_json_atomic

__all__ = [
    "ModelSpec",
    "Condition",
    "Run",
    "Matrix",
    "MatrixOptions",
    "STUDY_MODELS",
    "MATRICES",
    "MATCHED_LEARNING_RATES",
    "resolve_models",
    "expand_runs",
    "run_command",
    "folder_state",
    "RunResult",
    "run_sweep",
    "write_status",
    "format_summary_table",
    "data_sizes",
    "estimate_run_seconds",
    "calibrate",
    "write_slurm_scripts",
    "main",
]

STUDY_SEEDS = (42, 123, 456)
#: Seeds of the matched-learning-rate grid (the study's three and two more).
MATCHED_LR_SEEDS = (42, 123, 456, 789, 2024)
MATCHED_LEARNING_RATES = (1e-6, 5e-6, 1e-5, 5e-5)
SWEEP_RANKS = (2, 4, 8, 16, 32, 64)
MAIN_RANKS = (8, 64)
ABLATION_RANK = 8
MATCHED_LR_RANK = 8

#: Where the study's files sit under `--data` (the layout of ../shared/data), per task.
DATA_FILES = {
    "snli": ("chaosnli/chaosNLI_snli.jsonl", "snli/snli_train_subset.jsonl"),
    "mnli": ("chaosnli/chaosNLI_mnli_m.jsonl", "mnli/mnli_train_subset.jsonl"),
}
#: Sizes used by the estimate when `--data` lacks the files: (ChaosNLI examples, bulk examples available).
STUDY_DATA_SIZES = {"snli": (1514, 31197), "mnli": (1599, 9999)}

STATUS_NAME = "sweep_status.json"
RECORDS_DIRNAME = ".sweep"
LOGS_DIRNAME = "logs"
STATUS_FORMAT_VERSION = 1


# ---- models ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model's role in the study's matrices.

    Args:
        name (`str`): short name used in run names (a folder's basename, or a hub id's last part).
        source (`str`): what `--model_name_or_path` gets (a local folder or a hub id).
        decoder (`bool`): decoder-only (LoRA only in the main matrix, SNLI only).
        tasks (`Tuple[str, ...]`): the main matrix's datasets for this model.
        full_ft (`bool`): full fine-tuning in the main matrix.
        ia3 (`bool`): IA3 in the main matrix (RoBERTa on SNLI in the study).
    """

    name: str
    source: str
    decoder: bool = False
    tasks: Tuple[str, ...] = ("snli", "mnli")
    full_ft: bool = True
    ia3: bool = False


STUDY_MODELS: Dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("roberta-base", "roberta-base", ia3=True),
        ModelSpec("bert-base-uncased", "bert-base-uncased"),
        ModelSpec("distilbert-base-uncased", "distilbert-base-uncased"),
        ModelSpec("deberta-v3-base", "microsoft/deberta-v3-base", tasks=("snli",)),
        ModelSpec("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B", decoder=True, tasks=("snli",), full_ft=False),
        ModelSpec("Qwen2.5-3B", "Qwen/Qwen2.5-3B", decoder=True, tasks=("snli",), full_ft=False),
    )
}


def _short_name(source: str) -> str:
    return os.path.basename(os.path.normpath(source))


def _config_says_decoder(folder: str) -> bool:
    from .peft_setup import DECODER_MODEL_TYPES

    try:
        with open(os.path.join(folder, "config.json")) as fh:
            return json.load(fh).get("model_type") in DECODER_MODEL_TYPES
    except (OSError, ValueError):
        return False


def resolve_models(
    models: Optional[Sequence[str]] = None, models_dir: Optional[str] = None
) -> Optional[List[ModelSpec]]:
    """The models given on the command line as `ModelSpec`s (`None` when none: each matrix's defaults).

    Args:
        models (`Sequence[str]`, *optional*): local folders or hub ids; the short name is the basename.
        models_dir (`str`, *optional*): a folder holding one sub-folder per model, named by short name;
            a model given by short name or hub id is taken from there.

    Raises:
        ValueError: two models with one short name (naming `--models`).
    """
    if not models:
        return None
    out, seen = [], {}
    for entry in models:
        name = _short_name(entry)
        if name in seen:
            raise ValueError(
                f"--models: {seen[name]!r} and {entry!r} have the same short name {name!r} "
                "(the basename names the runs); rename one folder"
            )
        seen[name] = entry
        source = entry
        if models_dir and not os.path.isdir(entry):
            source = os.path.join(models_dir, name)
        if os.path.isdir(source):
            source = os.path.abspath(source)
        if name in STUDY_MODELS:
            out.append(replace(STUDY_MODELS[name], source=source))
        else:
            decoder = os.path.isdir(source) and _config_says_decoder(source)
            out.append(
                ModelSpec(
                    name, source, decoder=decoder, tasks=("snli",) if decoder else ("snli", "mnli"), full_ft=not decoder
                )
            )
    return out


def _study_model(name: str, models_dir: Optional[str]) -> ModelSpec:
    spec = STUDY_MODELS[name]
    if models_dir:
        spec = replace(spec, source=os.path.abspath(os.path.join(models_dir, spec.name)))
    return spec


# ---- conditions and matrices -------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One cell of a matrix (a run without its seed).

    Args:
        model (`ModelSpec`): the model.
        task (`str`): `"snli"` or `"mnli"`.
        method (`str`): `"lora"`, `"full"` or `"ia3"`.
        rank (`int`, *optional*): the LoRA rank.
        composition (`str`, *optional*, defaults to `"all"`): the ChaosNLI training part.
        label_noise (`float`, *optional*, defaults to 0): share of clean examples relabelled.
        loss (`str`, *optional*, defaults to `"ce"`): `"ce"` or `"soft_kl"`.
        learning_rate (`float`, *optional*): `None` keeps the script's one learning rate.
    """

    model: ModelSpec
    task: str
    method: str
    rank: Optional[int] = None
    composition: str = "all"
    label_noise: float = 0.0
    loss: str = "ce"
    learning_rate: Optional[float] = None

    def tag(self) -> str:
        """The run name without the seed, e.g. `roberta-base-snli-lora-r8-comp_low`."""
        parts = [self.model.name, self.task, f"lora-r{self.rank}" if self.method == "lora" else self.method]
        if self.composition != "all":
            parts.append(f"comp_{self.composition}")
        if self.label_noise:
            parts.append(f"noise{self.label_noise:g}")
        if self.loss != "ce":
            parts.append(self.loss.replace("_", ""))
        if self.learning_rate is not None:
            parts.append(f"lr{self.learning_rate:g}")
        return "-".join(parts)

    def flags(self, data_dir: str) -> List[str]:
        """The script's flags for this condition (without seed, output folder and run name)."""
        chaos, bulk = DATA_FILES[self.task]
        out = [
            "--model_name_or_path",
            self.model.source,
            "--task",
            self.task,
            "--chaosnli_file",
            os.path.join(data_dir, chaos),
            "--train_file",
            os.path.join(data_dir, bulk),
        ]
        out += {"full": ["--peft", "none"], "ia3": ["--peft", "ia3"]}.get(
            self.method, ["--peft", "lora", "--lora_r", str(self.rank)]
        )
        if self.composition != "all":
            out += ["--composition", self.composition]
        if self.label_noise:
            out += ["--label_noise", f"{self.label_noise:g}"]
        if self.loss != "ce":
            out += ["--loss", self.loss]
        if self.learning_rate is not None:
            out += ["--learning_rate", f"{self.learning_rate:g}"]
        return out


@dataclass(frozen=True)
class MatrixOptions:
    """The study's open details that the matrices use (each a flag of the runner).

    Args:
        main_ranks (`Tuple[int, int]`): the main matrix's low and high LoRA rank.
        sweep_ranks (`Tuple[int, ...]`): the rank sweep's ranks.
        ablation_rank (`int`): the LoRA rank of the ablations (composition, noise, soft labels).
        matched_lr_rank (`int`): the LoRA rank of the matched-learning-rate grid.
        learning_rates (`Tuple[float, ...]`): the matched-learning-rate grid's rates.
    """

    main_ranks: Tuple[int, ...] = MAIN_RANKS
    sweep_ranks: Tuple[int, ...] = SWEEP_RANKS
    ablation_rank: int = ABLATION_RANK
    matched_lr_rank: int = MATCHED_LR_RANK
    learning_rates: Tuple[float, ...] = MATCHED_LEARNING_RATES


def _main_matrix(models: Sequence[ModelSpec], o: MatrixOptions) -> List[Condition]:
    out = []
    for m in models:
        for task in m.tasks:
            out += [Condition(m, task, "lora", r) for r in o.main_ranks]
            if m.full_ft and not m.decoder:
                out.append(Condition(m, task, "full"))
    out += [Condition(m, "snli", "ia3") for m in models if m.ia3]
    return out


def _rank_sweep(models, o):
    return [Condition(m, "snli", "lora", r) for m in models for r in o.sweep_ranks] + [
        Condition(m, "snli", "full") for m in models if m.full_ft
    ]


def _composition(models, o):
    return [
        Condition(m, "snli", "lora", o.ablation_rank, composition=c)
        for m in models
        for c in ("all", "low", "high", "balanced")
    ]


def _noise(models, o):
    return [Condition(m, "snli", "lora", o.ablation_rank, label_noise=p) for m in models for p in (0.0, 0.3, 0.6)]


def _soft_label(models, o):
    return [Condition(m, "snli", "lora", o.ablation_rank, loss=loss) for m in models for loss in ("ce", "soft_kl")]


def _ablations(models, o):
    return [
        c
        for c in _composition(models, o) + _noise(models, o) + _soft_label(models, o)
        if (c.composition, c.label_noise, c.loss) != ("all", 0.0, "ce")
    ]


def _matched_lr(models, o):
    return [
        Condition(m, task, method, o.matched_lr_rank if method == "lora" else None, learning_rate=lr)
        for m in models
        for task in ("snli", "mnli")
        for method in ("full", "lora")
        for lr in o.learning_rates
    ]


@dataclass(frozen=True)
class Matrix:
    """A matrix: conditions built from its models, run at each seed.

    Args:
        name (`str`): the `--matrix` name.
        description (`str`): one line.
        models (`Tuple[str, ...]`): the study's models it uses when `--models` is not given (short names).
        seeds (`Tuple[int, ...]`): its seeds when `--seeds` is not given.
        conditions (`Callable`): `(models, MatrixOptions) -> List[Condition]`.
    """

    name: str
    description: str
    models: Tuple[str, ...]
    seeds: Tuple[int, ...]
    conditions: Callable[[Sequence[ModelSpec], MatrixOptions], List[Condition]]


MATRICES: Dict[str, Matrix] = {
    m.name: m
    for m in (
        Matrix(
            "main",
            "model x method x dataset (table 2): LoRA low / high rank, full FT, IA3",
            tuple(STUDY_MODELS),
            STUDY_SEEDS,
            _main_matrix,
        ),
        Matrix(
            "rank_sweep",
            "RoBERTa and BERT on SNLI: six LoRA ranks and full FT, one seed",
            ("roberta-base", "bert-base-uncased"),
            (42,),
            _rank_sweep,
        ),
        Matrix(
            "composition",
            "ChaosNLI training part all / low / high / balanced (LoRA, RoBERTa, SNLI)",
            ("roberta-base",),
            STUDY_SEEDS,
            _composition,
        ),
        Matrix(
            "noise",
            "label noise on clean examples 0 / 30 / 60% (LoRA, RoBERTa, SNLI)",
            ("roberta-base",),
            STUDY_SEEDS,
            _noise,
        ),
        Matrix(
            "soft_label",
            "cross-entropy vs soft-label KL (LoRA, RoBERTa, SNLI)",
            ("roberta-base",),
            STUDY_SEEDS,
            _soft_label,
        ),
        Matrix(
            "ablations",
            "composition, noise and soft labels without their baseline (a main-matrix run)",
            ("roberta-base",),
            STUDY_SEEDS,
            _ablations,
        ),
        Matrix(
            "matched_lr",
            "full FT vs LoRA r=8 at matched learning rates 1e-6 .. 5e-5, SNLI and MNLI",
            ("roberta-base",),
            MATCHED_LR_SEEDS,
            _matched_lr,
        ),
    )
}


@dataclass
class Run:
    """One training run of a sweep.

    Args:
        name (`str`): the run name (also the output folder's name).
        condition (`Condition`): its condition.
        seed (`int`): the training seed.
        output_dir (`str`): `<out>/<name>`.
        flags (`List[str]`): the script's arguments (the `--extra` flags last).
        matrices (`List[str]`): the matrices holding it.
    """

    name: str
    condition: Condition
    seed: int
    output_dir: str
    flags: List[str]
    matrices: List[str] = field(default_factory=list)


def expand_runs(
    matrices: Sequence[str],
    *,
    out_dir: str,
    data_dir: str,
    models: Optional[Sequence[ModelSpec]] = None,
    models_dir: Optional[str] = None,
    seeds: Optional[Sequence[int]] = None,
    extra: Sequence[str] = (),
    only: Sequence[str] = (),
    options: MatrixOptions = MatrixOptions(),
) -> List[Run]:
    """Expand matrices into runs, in a deterministic order (seed, then the matrix's conditions).

    A run held by several matrices appears once (listing them all in `Run.matrices`).

    Args:
        matrices (`Sequence[str]`): names from `MATRICES`.
        out_dir (`str`): where run folders go.
        data_dir (`str`): the data folder (see `DATA_FILES`).
        models (`Sequence[ModelSpec]`, *optional*): replaces every matrix's default models.
        models_dir (`str`, *optional*): where the default models' folders are (`<dir>/<short name>`).
        seeds (`Sequence[int]`, *optional*): replaces every matrix's seeds.
        extra (`Sequence[str]`, *optional*): flags appended to every run's command, as given.
        only (`Sequence[str]`, *optional*): glob patterns on run names; a run matching any is kept.
        options (`MatrixOptions`, *optional*): ranks and learning rates.

    Returns:
        `List[Run]`
    """
    unknown = [m for m in matrices if m not in MATRICES]
    if unknown:
        raise ValueError(f"--matrix: unknown {', '.join(unknown)}; choose from {', '.join(MATRICES)} or all")
    out_dir, data_dir = os.path.abspath(out_dir), os.path.abspath(data_dir)
    runs: Dict[str, Run] = {}
    for mname in matrices:
        matrix = MATRICES[mname]
        specs = list(models) if models else [_study_model(n, models_dir) for n in matrix.models]
        conditions = matrix.conditions(specs, options)
        for seed in seeds or matrix.seeds:
            for cond in conditions:
                name = f"{cond.tag()}-s{seed}"
                out = os.path.join(out_dir, name)
                flags = (
                    cond.flags(data_dir) + ["--seed", str(seed), "--output_dir", out, "--run_name", name] + list(extra)
                )
                if name in runs:
                    if runs[name].flags != flags:
                        raise ValueError(f"run {name} is built two ways: {runs[name].flags} vs {flags}")
                    if mname not in runs[name].matrices:
                        runs[name].matrices.append(mname)
                    continue
                runs[name] = Run(name, cond, int(seed), out, flags, [mname])
    selected = list(runs.values())
    if only:
        selected = [r for r in selected if any(fnmatch.fnmatchcase(r.name, p) for p in only)]
    return selected


def run_command(run: Run, launcher: Sequence[str], script: str) -> List[str]:
    """The full command of a run: the launcher, the script, its flags (an argv list, no shell)."""
    return list(launcher) + [script] + list(run.flags)


def parse_launcher(text: str) -> List[str]:
    """`"python"`, `"accelerate launch --num_processes 2"` or `"torchrun --nproc_per_node 2 --"` as argv.

    `python` (alone) becomes this interpreter (`sys.executable`).
    """
    argv = shlex.split(text)
    if not argv:
        raise ValueError("--launcher is empty; use python, 'accelerate launch ...' or 'torchrun ... --'")
    if argv == ["python"]:
        return [sys.executable]
    return argv


# ---- the folder and the runner's records -----------------------------------------------------------


def folder_state(output_dir: str) -> str:
    """`"finished"`, `"partial"` (something there, not finished) or `"empty"`, from the run's fingerprint.

    Args:
        output_dir (`str`): the run's output folder.
    """
    if not os.path.isdir(output_dir):
        return "empty"
    try:
        fp = read_fingerprint(output_dir)
    except RunFolderError:
        return "partial"
    if is_finished(output_dir, fp):
        return "finished"
    return "partial" if fp is not None or holds_run(output_dir) else "empty"


def _record_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, RECORDS_DIRNAME, f"{name}.json")


def read_record(out_dir: str, name: str) -> Optional[Dict[str, Any]]:
    """The runner's record of a run's last attempt, or `None`."""
    try:
        with open(_record_path(out_dir, name)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


@dataclass
class RunResult:
    """What happened to one run in this invocation.

    `status` is `"done"` (trained to the end), `"skipped"` (finished before), `"failed"`,
    `"interrupted"` (the runner was stopped) or `"not started"`.
    """

    name: str
    status: str
    output_dir: str
    log: str
    command: List[str]
    matrices: List[str]
    exit_code: Optional[int] = None
    attempts: int = 0
    start: Optional[float] = None
    end: Optional[float] = None
    resumed: bool = False
    slot: Optional[str] = None
    pid: Optional[int] = None
    note: str = ""

    @property
    def duration(self) -> Optional[float]:
        return None if self.start is None or self.end is None else self.end - self.start

    def as_dict(self) -> Dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in (
                "name",
                "status",
                "exit_code",
                "attempts",
                "resumed",
                "slot",
                "pid",
                "output_dir",
                "log",
                "command",
                "matrices",
                "note",
            )
        }
        d["start"] = _iso(self.start)
        d["end"] = _iso(self.end)
        d["start_unix"], d["end_unix"] = self.start, self.end
        d["duration_s"] = None if self.duration is None else round(self.duration, 3)
        return d


def _iso(t: Optional[float]) -> Optional[str]:
    return None if t is None else datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


# ---- executing runs ---------------------------------------------------------------------------------


_ALREADY_DONE = "already done"


class _Runner:
    def __init__(
        self, runs, *, launcher, script, out_dir, slots, retries, status_file, invocation, matrices, echo=print
    ):
        self.runs = runs
        self.launcher, self.script = launcher, script
        self.out_dir = os.path.abspath(out_dir)
        self.slots = slots
        self.retries = retries
        self.status_file = status_file
        self.invocation = invocation
        self.matrices = matrices
        self.echo = echo
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.procs: Dict[str, subprocess.Popen] = {}
        self.results: Dict[str, RunResult] = {}
        self.started = time.time()
        for run in runs:
            self.results[run.name] = RunResult(
                run.name,
                "not started",
                run.output_dir,
                os.path.join(self.out_dir, LOGS_DIRNAME, f"{run.name}.log"),
                run_command(run, launcher, script),
                list(run.matrices),
            )

    # -- status
    def write(self) -> None:
        with self.lock:
            results = [self.results[r.name] for r in self.runs]
            write_status(
                self.status_file, results, started=self.started, matrices=self.matrices, invocation=self.invocation
            )

    def _say(self, text: str) -> None:
        with self.lock:
            self.echo(text)
            sys.stdout.flush()

    # -- one run
    def _can_skip(self, run: Run, res: RunResult) -> bool:
        if folder_state(run.output_dir) != "finished":
            return False
        rec = read_record(self.out_dir, run.name)
        return bool(rec and rec.get("status") in ("done", "skipped") and rec.get("flags") == run.flags)

    def _record(self, run: Run, res: RunResult) -> None:
        write_json_atomic(_record_path(self.out_dir, run.name), {**res.as_dict(), "flags": run.flags})

    def execute(self, run: Run, slot: Tuple[str, Dict[str, str]]) -> RunResult:
        res = self.results[run.name]
        label, env_extra = slot
        res.slot = label
        if self._can_skip(run, res):
            res.status, res.start, res.end, res.exit_code = "skipped", time.time(), time.time(), 0
            res.note = "finished earlier (checked by the runner)"
            self._say(f"[skipped] {run.name}: finished earlier")
            self._record(run, res)
            return res
        os.makedirs(os.path.dirname(res.log), exist_ok=True)
        env = {**os.environ, **env_extra}
        res.resumed = folder_state(run.output_dir) == "partial"
        res.start = time.time()
        while not self.stop.is_set():
            res.attempts += 1
            with open(res.log, "ab") as fh:
                head = (
                    f"\n===== attempt {res.attempts} of {run.name} on {socket.gethostname()} at {_iso(time.time())}"
                    f" (slot {label})\n===== command: {shlex.join(res.command)}\n"
                )
                fh.write(head.encode())
                fh.flush()
                offset = fh.tell()
                proc = subprocess.Popen(
                    res.command, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            res.pid = proc.pid
            with self.lock:
                self.procs[run.name] = proc
                res.status = "running"
            self._say(f"[start] {run.name} (slot {label}, attempt {res.attempts}{', resuming' if res.resumed else ''})")
            self.write()
            code = proc.wait()
            with self.lock:
                self.procs.pop(run.name, None)
            res.exit_code = code
            with open(res.log, "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
            if self.stop.is_set():
                res.status = "interrupted"
                break
            if code == 0:
                res.status = "skipped" if _ALREADY_DONE in text and "***** train metrics *****" not in text else "done"
                break
            res.status = "failed"
            refused = re.search(rf"^{re.escape(os.path.basename(self.script))}: error:", text, re.M) or (
                "are not used by the HfArgumentParser" in text
            )  # an unknown flag (ValueError, exit status 1)
            if code == 2 or refused or res.attempts > self.retries:
                res.note = (
                    "usage error (exit status 2): not retried"
                    if code == 2
                    else "usage error or refused output folder: not retried"
                    if refused
                    else ""
                )
                break
            self._say(f"[retry] {run.name}: exit status {code}, attempt {res.attempts + 1} of {self.retries + 1}")
            res.resumed = res.resumed or folder_state(run.output_dir) == "partial"
        res.end = time.time()
        dur = _fmt_duration(res.duration)
        if res.status == "failed":
            self._say(
                f"[FAILED] {run.name}: exit status {res.exit_code} after {res.attempts} attempt(s), {dur}\n"
                f"         log: {res.log}\n         command: {shlex.join(res.command)}"
            )
        else:
            self._say(f"[{res.status}] {run.name} ({dur})")
        self._record(run, res)
        self.write()
        return res

    # -- the pool
    def run(self) -> List[RunResult]:
        todo: "queue.Queue[Run]" = queue.Queue()
        for run in self.runs:
            todo.put(run)

        def worker(slot):
            while not self.stop.is_set():
                try:
                    run = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    self.execute(run, slot)
                except Exception as err:  # the runner's own error on one run must not stop the others
                    res = self.results[run.name]
                    res.status, res.end, res.note = "failed", time.time(), f"runner error: {err!r}"
                    self._say(f"[FAILED] {run.name}: runner error {err!r}")

        threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in self.slots]
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        self.write()
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.write()
        return [self.results[r.name] for r in self.runs]

    def _on_signal(self, signum, frame):
        if self.stop.is_set():
            return
        self.stop.set()
        self.signal = signum
        self._say(f"[stop] {signal.Signals(signum).name}: stopping the running jobs (they resume on the next run)")
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            _kill_group(proc, signal.SIGTERM)

        def reaper():
            time.sleep(15)
            for proc in procs:
                if proc.poll() is None:
                    _kill_group(proc, signal.SIGKILL)

        threading.Thread(target=reaper, daemon=True).start()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def make_slots(
    jobs: int = 1,
    gpus: Optional[Sequence[str]] = None,
    jobs_per_gpu: int = 1,
    gpus_per_job: int = 1,
    launcher: Sequence[str] = (),
) -> List[Tuple[str, Dict[str, str]]]:
    """The parallel slots: `(label, environment overrides)` each; one job runs per slot at a time.

    With `gpus`, each slot sees its own GPUs through `CUDA_VISIBLE_DEVICES` (`gpus_per_job` of them,
    `jobs_per_gpu` slots on each group); otherwise `jobs` CPU slots, each with `OMP_NUM_THREADS` set to
    its share of the cores (unless set already). With several slots and `torchrun`, each slot gets its
    own rendezvous port (`PET_MASTER_PORT`).

    Args:
        jobs (`int`): CPU slots (without `gpus`).
        gpus (`Sequence[str]`, *optional*): GPU ids.
        jobs_per_gpu (`int`): slots per GPU group.
        gpus_per_job (`int`): GPUs per slot (for multi-process launchers).
        launcher (`Sequence[str]`): the launcher argv (for the port).
    """
    slots = []
    if gpus:
        if len(gpus) % gpus_per_job:
            raise ValueError(f"--gpus-per-job {gpus_per_job} does not divide the {len(gpus)} GPUs of --gpus")
        groups = [",".join(gpus[i : i + gpus_per_job]) for i in range(0, len(gpus), gpus_per_job)]
        for k in range(jobs_per_gpu):
            for g in groups:
                slots.append((f"gpu{g}" + (f"#{k}" if jobs_per_gpu > 1 else ""), {"CUDA_VISIBLE_DEVICES": g}))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        for k in range(jobs):
            env = {} if "OMP_NUM_THREADS" in os.environ or jobs == 1 else {"OMP_NUM_THREADS": str(threads)}
            slots.append((f"cpu{k}", env))
    if len(slots) > 1 and launcher and os.path.basename(launcher[0]) == "torchrun":
        for k, (_, env) in enumerate(slots):
            env["PET_MASTER_PORT"] = str(29500 + 11 * (k + 1))
    return slots


def run_sweep(
    runs: Sequence[Run],
    *,
    out_dir: str,
    launcher: Sequence[str] = ("python",),
    script: str = "run_glue_entropy.py",
    slots: Optional[List[Tuple[str, Dict[str, str]]]] = None,
    retries: int = 0,
    status_file: Optional[str] = None,
    matrices: Sequence[str] = (),
    invocation: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> List[RunResult]:
    """Run `runs` (skipping finished ones, resuming interrupted ones), `len(slots)` at a time.

    Each run's output goes to `<out_dir>/logs/<name>.log`; the status file is rewritten after every
    run (atomically). A failed run is retried up to `retries` times and does not stop the others.

    Args:
        runs (`Sequence[Run]`): from `expand_runs`.
        out_dir (`str`): the sweep's output folder.
        launcher (`Sequence[str]`, *optional*): argv before the script; `("python",)` is this interpreter.
        script (`str`, *optional*): the training script.
        slots (`List[Tuple[str, Dict[str, str]]]`, *optional*): from `make_slots`; one CPU slot by default.
        retries (`int`, *optional*, defaults to 0): extra attempts for a failed run.
        status_file (`str`, *optional*): defaults to `<out_dir>/sweep_status.json`.
        matrices, invocation: recorded in the status file.
        echo (`Callable[[str], None]`, *optional*): where progress lines go.

    Returns:
        `List[RunResult]`, in the order of `runs`.
    """
    launcher = [sys.executable] if list(launcher) == ["python"] else list(launcher)
    runner = _Runner(
        list(runs),
        launcher=launcher,
        script=script,
        out_dir=out_dir,
        slots=slots or make_slots(),
        retries=retries,
        status_file=status_file or os.path.join(out_dir, STATUS_NAME),
        invocation=list(invocation),
        matrices=list(matrices),
        echo=echo,
    )
    results = runner.run()
    if runner.stop.is_set():
        raise KeyboardInterrupt(getattr(runner, "signal", signal.SIGINT))
    return results


def write_status(
    path: str,
    results: Sequence[RunResult],
    *,
    started: Optional[float] = None,
    matrices: Sequence[str] = (),
    invocation: Sequence[str] = (),
) -> None:
    """Write the machine-readable status file (atomically).

    Format: `{"format_version": 1, "host", "started", "updated", "matrices", "invocation", "counts":
    {status: n}, "runs": [RunResult.as_dict() ...]}`; each run has `name`, `status`, `exit_code`,
    `attempts`, `resumed`, `slot`, `pid`, `output_dir`, `log`, `command` (argv), `matrices`, `note`,
    `start` / `end` (ISO 8601), `start_unix` / `end_unix` and `duration_s`.
    """
    counts: Dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    write_json_atomic(
        os.path.abspath(path),
        {
            "format_version": STATUS_FORMAT_VERSION,
            "host": socket.gethostname(),
            "started": _iso(started),
            "updated": _iso(time.time()),
            "matrices": list(matrices),
            "invocation": list(invocation),
            "counts": counts,
            "runs": [r.as_dict() for r in results],
        },
    )


def _fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_summary_table(results: Sequence[RunResult]) -> str:
    """The end-of-sweep table: one row per run (status, attempts, duration), counts, then each failure."""
    width = max([len("run")] + [len(r.name) for r in results])
    lines = [
        f"{'run':<{width}}  {'status':<11}  {'attempts':>8}  {'duration':>8}  resumed",
        f"{'-' * width}  {'-' * 11}  {'-' * 8}  {'-' * 8}  -------",
    ]
    for r in results:
        lines.append(
            f"{r.name:<{width}}  {r.status:<11}  {r.attempts:>8}  {_fmt_duration(r.duration):>8}  "
            f"{'yes' if r.resumed else 'no'}"
        )
    counts: Dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    order = ["done", "skipped", "failed", "interrupted", "not started", "running", "pending"]
    total = sum(r.duration or 0.0 for r in results)
    lines.append(
        f"{len(results)} runs: "
        + ", ".join(f"{counts[s]} {s}" for s in order if s in counts)
        + f" (run time {_fmt_duration(total)})"
    )
    for r in results:
        if r.status == "failed":
            lines.append(
                f"FAILED {r.name}: exit status {r.exit_code}{'; ' + r.note if r.note else ''}\n"
                f"  log: {r.log}\n  command: {shlex.join(r.command)}"
            )
    return "\n".join(lines)


def collect_results(runs: Sequence[Run], out_dir: str, launcher: Sequence[str], script: str) -> List[RunResult]:
    """Results from the runner's records and the run folders (for `--collect`, e.g. after a Slurm array)."""
    out = []
    for run in runs:
        rec = read_record(out_dir, run.name) or {}
        state = folder_state(run.output_dir)
        status = rec.get("status") or {"finished": "skipped", "partial": "not started", "empty": "not started"}[state]
        if state == "finished" and status not in ("done", "skipped"):
            status = "done"
        res = RunResult(
            run.name,
            status,
            run.output_dir,
            rec.get("log") or os.path.join(out_dir, LOGS_DIRNAME, f"{run.name}.log"),
            rec.get("command") or run_command(run, launcher, script),
            list(run.matrices),
            exit_code=rec.get("exit_code"),
            attempts=rec.get("attempts") or 0,
            start=rec.get("start_unix"),
            end=rec.get("end_unix"),
            resumed=bool(rec.get("resumed")),
            slot=rec.get("slot"),
            note=rec.get("note") or "",
        )
        out.append(res)
    return out


# ---- the report ---------------------------------------------------------------------------------------


def build_report(run_dirs: Sequence[str], report_dir: str, log: str) -> int:
    """Build the analysis report over `run_dirs` with `hf-entropy-report ... --out report_dir`.

    The analysis' output goes to `log`. Returns its exit status (0 when built).
    """
    os.makedirs(os.path.dirname(log), exist_ok=True)
    cmd = [sys.executable, "-m", "hf_entropy_callback.study.cli", *run_dirs, "--out", report_dir, "--quiet"]
    with open(log, "wb") as fh:
        fh.write(f"===== command: {shlex.join(cmd)}\n".encode())
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode


# ---- cost estimate ------------------------------------------------------------------------------------


def _count_lines(path: str, labelled: bool = False) -> Optional[int]:
    if not os.path.isfile(path):
        return None
    names = {"entailment", "neutral", "contradiction", 0, 1, 2, "0", "1", "2"}
    n = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            if labelled:
                try:
                    if json.loads(line).get("label") not in names:
                        continue
                except ValueError:
                    continue
            n += 1
    return n


def data_sizes(data_dir: str, task: str, val_fraction: float = 0.2) -> Dict[str, Any]:
    """Sizes that set a run's length: tracked ChaosNLI train part, its validation part, bulk available.

    Read from the files under `data_dir` when they exist (bulk lines without a gold label are not
    counted, as the script drops them), else the study's (`STUDY_DATA_SIZES`).

    Returns:
        `Dict[str, Any]`: `tracked`, `validation`, `bulk_available`, `source` ("files" or "study").
    """
    chaos_rel, bulk_rel = DATA_FILES[task]
    chaos = _count_lines(os.path.join(data_dir, chaos_rel))
    bulk = _count_lines(os.path.join(data_dir, bulk_rel), labelled=True)
    source = "files" if chaos is not None and bulk is not None else "study"
    chaos = chaos if chaos is not None else STUDY_DATA_SIZES[task][0]
    bulk = bulk if bulk is not None else STUDY_DATA_SIZES[task][1]
    val = int(math.floor(chaos * val_fraction + 0.5))
    return {"tracked": chaos - val, "validation": val, "bulk_available": bulk, "source": source}


def _flag(flags: Sequence[str], name: str, default: Any, kind=float):
    value = default
    for i, f in enumerate(flags[:-1]):
        if f == f"--{name}":
            value = kind(flags[i + 1])
    return value


def run_steps(run: Run, sizes: Mapping[str, Any]) -> Dict[str, int]:
    """Optimizer steps and tracking points of a run (study defaults: batch 32, 5 epochs, bulk 20,000).

    `--bulk_size`, `--num_train_epochs`, `--per_device_train_batch_size`, `--max_steps` and
    `--track_every` in the run's flags (e.g. from `--extra`) are taken into account; one process.
    """
    from .schedule import tracking_schedule

    bulk = int(_flag(run.flags, "bulk_size", 20000, int))
    n_train = sizes["tracked"] + min(bulk, sizes["bulk_available"])
    batch = int(_flag(run.flags, "per_device_train_batch_size", 32, int))
    epochs = _flag(run.flags, "num_train_epochs", 5.0)
    max_steps = int(_flag(run.flags, "max_steps", -1, int))
    track_every = int(_flag(run.flags, "track_every", 100, int))
    steps = math.ceil(n_train / batch) * epochs
    if max_steps > 0:
        steps = max_steps
    points = (
        len(tracking_schedule(n_train, batch, epochs, track_every=track_every))
        if max_steps <= 0
        else max_steps // max(track_every, 1) + 2
    )
    return {
        "steps": int(math.ceil(steps)),
        "points": points,
        "n_train": n_train,
        "n_tracked_total": sizes["tracked"] + sizes["validation"],
    }


def device_key() -> str:
    """This machine's compute device, as calibrations are keyed: `cuda:<GPU name>` or `cpu:<cpu> x<threads>`."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{cpu} x{torch.get_num_threads()} threads"


def _calibration_batches(source: str, data_dir: str, n: int, batch_size: int, seq_len: int):
    import torch

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
    except Exception:
        tok = None
    path = os.path.join(data_dir, DATA_FILES["snli"][1])
    if tok is not None and os.path.isfile(path):
        pairs = []
        with open(path) as fh:
            for line in fh:
                ex = json.loads(line)
                pairs.append((ex["premise"], ex["hypothesis"]))
                if len(pairs) >= n * batch_size:
                    break
        if len(pairs) >= n * batch_size:
            out = []
            for i in range(n):
                p, h = zip(*pairs[i * batch_size : (i + 1) * batch_size])
                enc = tok(list(p), list(h), truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
                out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")})
            return out, "SNLI batches"
    return [
        {
            "input_ids": torch.randint(5, 100, (batch_size, seq_len)),
            "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        }
        for _ in range(n)
    ], f"random tokens, length {seq_len}"


def calibrate_model(
    source: str,
    method: str,
    *,
    data_dir: str,
    steps: int = 3,
    batch_size: int = 32,
    tracking_batch_size: int = 64,
    seq_len: int = 128,
    rank: int = 8,
) -> Dict[str, Any]:
    """Time training steps and tracking forward passes of a model on this machine (GPU if there is one).

    The model is built from its configuration with random weights (same cost as the trained one; no
    weights are downloaded), wrapped for `method` as the script does, and trained with AdamW on
    batches of SNLI text tokenized by the model's tokenizer (random tokens of length `seq_len` when the
    tokenizer or the data is not there). One warm-up step, then `steps` timed.

    Returns:
        `Dict[str, Any]`: `train_step_s`, `track_batch_s` (a no-grad forward of `tracking_batch_size`
        examples), `batches`, `steps`, `measured`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .peft_setup import apply_peft

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.from_pretrained(source, num_labels=3)
    if getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        config.pad_token_id = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos:
        seq_len = min(seq_len, max_pos - 2)  # RoBERTa's positions start after the padding index
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model = apply_peft(model, method={"full": "none"}.get(method, method), r=rank).to(device)
    batches, kind = _calibration_batches(source, data_dir, steps + 1, batch_size, seq_len)
    vocab = getattr(config, "vocab_size", None) or 100
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    labels = torch.randint(0, 3, (batch_size,), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    model.train()
    times = []
    for i, batch in enumerate(batches):
        batch = {k: (v % vocab if k == "input_ids" else v).to(device) for k, v in batch.items()}
        sync()
        t0 = time.perf_counter()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    model.eval()
    big = {
        k: torch.cat([v, v])[:tracking_batch_size].to(device) % (vocab if k == "input_ids" else 2**62)
        for k, v in batches[0].items()
    }
    ftimes = []
    with torch.no_grad():
        for i in range(3):
            sync()
            t0 = time.perf_counter()
            model(**big)
            sync()
            if i:
                ftimes.append(time.perf_counter() - t0)
    return {
        "train_step_s": sum(times) / len(times),
        "track_batch_s": sum(ftimes) / len(ftimes),
        "batches": kind,
        "steps": steps,
        "batch_size": batch_size,
        "tracking_batch_size": tracking_batch_size,
        "measured": _iso(time.time()),
    }


def default_calibration_file() -> str:
    """`$HF_ENTROPY_CACHE/sweep_calibration.json` (the cache folder of `sweeps/demo.sh`, default `.cache`)."""
    return os.path.join(os.environ.get("HF_ENTROPY_CACHE", ".cache"), "sweep_calibration.json")


def load_calibration(path: str) -> Dict[str, Any]:
    """The calibration cache: `{device: {model short name: {method: measurement}}}` (empty when absent)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def calibrate(runs: Sequence[Run], *, data_dir: str, path: str, steps: int = 3, echo=print) -> Dict[str, Any]:
    """Measure each (model, method) of `runs` on this machine and store it in the JSON cache `path`."""
    cache = load_calibration(path)
    key = device_key()
    entry = cache.setdefault(key, {})
    done = set()
    for run in runs:
        c = run.condition
        pair = (c.model.name, c.method)
        if pair in done:
            continue
        done.add(pair)
        echo(f"calibrating {c.model.name} ({c.method}) on {key} ...")
        try:
            m = calibrate_model(c.model.source, c.method, data_dir=data_dir, steps=steps, rank=c.rank or 8)
        except Exception as err:
            raise RuntimeError(
                f"--calibrate: cannot time {c.model.name} ({c.method}) from {c.model.source}: "
                f"{type(err).__name__}: {err}"
            ) from err
        entry.setdefault(c.model.name, {})[c.method] = m
        echo(
            f"  {m['train_step_s']:.3f} s / training step of {m['batch_size']}, {m['track_batch_s']:.3f} s / "
            f"tracking batch of {m['tracking_batch_size']} ({m['batches']})"
        )
        write_json_atomic(os.path.abspath(path), cache)
    return cache


def estimate_run_seconds(run: Run, measurement: Mapping[str, Any], sizes: Mapping[str, Any]) -> float:
    """Estimated compute of a run: steps x step time + tracking points x tracking batches x forward time."""
    s = run_steps(run, sizes)
    tbs = int(_flag(run.flags, "tracking_batch_size", measurement.get("tracking_batch_size", 64), int))
    fwd = measurement["track_batch_s"] * tbs / measurement.get("tracking_batch_size", 64)
    return s["steps"] * measurement["train_step_s"] + s["points"] * math.ceil(s["n_tracked_total"] / tbs) * fwd


def _fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def estimate_lines(
    runs: Sequence[Run], matrices: Sequence[str], *, data_dir: str, calibration: Mapping[str, Any], device: str
) -> List[str]:
    """The dry run's compute estimate, one line per matrix and a total (or why there is none)."""
    sizes = {t: data_sizes(data_dir, t) for t in DATA_FILES}
    measured = calibration.get(device, {})
    lines = []
    desc = ", ".join(
        f"{t.upper()} {s['tracked']} tracked + {min(20000, s['bulk_available'])} bulk "
        f"({'from --data' if s['source'] == 'files' else 'study sizes'})"
        for t, s in sizes.items()
    )
    lines.append(f"estimated compute on {device} (one process per run, measured step times; {desc}):")
    missing_all = set()
    for mname in list(matrices) + ["all selected"]:
        mruns = [r for r in runs if mname in r.matrices] if mname != "all selected" else list(runs)
        secs, missing = 0.0, set()
        for r in mruns:
            m = measured.get(r.condition.model.name, {}).get(r.condition.method)
            if m is None:
                missing.add(f"{r.condition.model.name} ({r.condition.method})")
                continue
            secs += estimate_run_seconds(r, m, sizes[r.condition.task])
        missing_all |= missing
        steps = sum(run_steps(r, sizes[r.condition.task])["steps"] for r in mruns)
        text = f"no estimate (not calibrated here: {', '.join(sorted(missing))})" if missing else _fmt_hours(secs)
        lines.append(f"  {mname:<14} {len(mruns):>4} runs  {steps:>9,} steps  {text}")
    if missing_all:
        others = [d for d in calibration if d != device]
        lines.append(
            "  run with --calibrate to measure the missing models on this machine"
            + (f" (calibrations exist for: {'; '.join(others)}; --calibration-device picks one)" if others else "")
        )
    return lines


# ---- Slurm --------------------------------------------------------------------------------------------


def write_slurm_scripts(
    runs: Sequence[Run],
    task_argv: Sequence[str],
    *,
    out_dir: str,
    job_name: str,
    throttle: Optional[int] = None,
    partition: Optional[str] = None,
    time_limit: Optional[str] = None,
    gpus: Optional[int] = None,
    cpus: Optional[int] = None,
    mem: Optional[str] = None,
    account: Optional[str] = None,
    setup: Sequence[str] = (),
    report_argv: Optional[Sequence[str]] = None,
    extra: Sequence[str] = (),
) -> Dict[str, str]:
    """Write `<out>/slurm/<job>.sbatch` (an array job, one task per run) and `<job>-report.sbatch`.

    Task i runs `task_argv` followed by `--task-index i` and `extra` (`["--extra", ...]`): the same runner, which picks the i-th run of
    the same expansion, so resubmitting the array skips the runs that finished. Task logs go to
    `<out>/slurm/logs/<job id>_<task>.out`, each run's own log to `<out>/logs/`.

    Returns:
        `Dict[str, str]`: `array`, `report` (the script paths) and `submit` (the shell commands).
    """
    out_dir = os.path.abspath(out_dir)
    folder = os.path.join(out_dir, "slurm")
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    n = len(runs)
    array = f"0-{n - 1}" + (f"%{throttle}" if throttle else "")

    def header(name, extra_lines):
        lines = ["#!/bin/bash", f"#SBATCH --job-name={name}"] + extra_lines
        for flag, value in (
            ("partition", partition),
            ("account", account),
            ("time", time_limit),
            ("cpus-per-task", cpus),
            ("mem", mem),
        ):
            if value:
                lines.append(f"#SBATCH --{flag}={value}")
        return lines

    lines = header(job_name, [f"#SBATCH --array={array}", f"#SBATCH --output={folder}/logs/%A_%a.out"])
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    lines += [f"# Written by hf_entropy_callback.sweeps: {n} runs, task index -> run:"]
    lines += [f"#   {i} {r.name}" for i, r in enumerate(runs)]
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        *setup,
        ': "${SLURM_ARRAY_TASK_ID:?run this script with sbatch (or set SLURM_ARRAY_TASK_ID)}"',
        f'exec {shlex.join(task_argv)} --task-index "$SLURM_ARRAY_TASK_ID" {shlex.join(extra)}'.rstrip(),
        "",
    ]
    array_path = os.path.join(folder, f"{job_name}.sbatch")
    with open(array_path, "w") as fh:
        fh.write("\n".join(lines))
    paths = {"array": array_path}
    if report_argv is not None:
        rlines = header(f"{job_name}-report", [f"#SBATCH --output={folder}/logs/%j-report.out"])
        rlines += ["set -euo pipefail", f"cd {shlex.quote(os.getcwd())}", *setup, f"exec {shlex.join(report_argv)}", ""]
        report_path = os.path.join(folder, f"{job_name}-report.sbatch")
        with open(report_path, "w") as fh:
            fh.write("\n".join(rlines))
        paths["report"] = report_path
        paths["submit"] = (
            f"jid=$(sbatch --parsable {shlex.quote(array_path)}) && "
            f"sbatch --dependency=afterany:${{jid%%;*}} {shlex.quote(report_path)}"
        )
    else:
        paths["submit"] = f"sbatch {shlex.quote(array_path)}"
    return paths


# ---- command line -------------------------------------------------------------------------------------


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The runner's argument parser (`--extra` and what follows it are split off before parsing)."""
    p = argparse.ArgumentParser(
        prog="hf-entropy-sweep",
        description="Run the study's matrices (fault-tolerant, parallel, Slurm).",
        epilog="Everything after --extra is passed, as given, to every run of run_glue_entropy.py "
        "(e.g. --extra --bf16 true --cache_dir '/my models'). Matrices: "
        + "; ".join(f"{m.name}: {m.description}" for m in MATRICES.values()),
    )
    p.add_argument(
        "--matrix", nargs="+", required=True, metavar="NAME", help=f"one or several of {', '.join(MATRICES)}, or all"
    )
    p.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="local folders or hub ids (short name = basename); replace every matrix's models",
    )
    p.add_argument("--models-dir", metavar="DIR", help="folder with one sub-folder per model, named by short name")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="data folder (chaosnli/, snli/, mnli/); default "
        "$HF_ENTROPY_SHARED_DATA or ../shared/data beside the script",
    )
    p.add_argument(
        "--out", default="runs", metavar="DIR", help="where run folders, logs and the report go (default runs)"
    )
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="replace every matrix's seeds")
    p.add_argument("--only", nargs="+", default=[], metavar="PATTERN", help="keep runs whose name matches a glob")
    p.add_argument("--dry-run", action="store_true", help="print the commands, the counts and the estimate")
    p.add_argument("--script", default="run_glue_entropy.py", help="the training script (default %(default)s)")
    p.add_argument(
        "--launcher",
        default="python",
        help="python (default), 'accelerate launch ...' or 'torchrun --nproc_per_node N --'",
    )
    p.add_argument("--jobs", type=_positive("--jobs"), default=None, help="runs at once on CPU (default 1)")
    p.add_argument("--gpus", metavar="IDS", help="comma-separated GPU ids: one job per GPU (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--jobs-per-gpu", type=_positive("--jobs-per-gpu"), default=1, help="jobs sharing one GPU")
    p.add_argument(
        "--gpus-per-job",
        type=_positive("--gpus-per-job"),
        default=1,
        help="GPUs per job (with a multi-process --launcher)",
    )
    p.add_argument("--retries", type=int, default=0, help="extra attempts of a failed run (default 0)")
    p.add_argument("--no-report", action="store_true", help="do not build <out>/report at the end")
    p.add_argument("--status-file", help="status JSON (default <out>/sweep_status.json)")
    p.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: summarise the runs' records, write the "
        "status file and build the report (e.g. after a Slurm array)",
    )
    p.add_argument("--task-index", type=int, help="run only the run at this index (a Slurm array task)")
    p.add_argument("--main-ranks", nargs=2, type=int, default=list(MAIN_RANKS), metavar=("LOW", "HIGH"))
    p.add_argument("--sweep-ranks", nargs="+", type=int, default=list(SWEEP_RANKS), metavar="R")
    p.add_argument("--ablation-rank", type=int, default=ABLATION_RANK)
    p.add_argument(
        "--learning-rates",
        nargs="+",
        type=float,
        default=list(MATCHED_LEARNING_RATES),
        metavar="LR",
        help="the matched-learning-rate grid's rates",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="time a few training steps of each model here, "
        "store them in the calibration file, then go on (with --dry-run: print the estimate)",
    )
    p.add_argument("--calibrate-steps", type=_positive("--calibrate-steps"), default=3)
    p.add_argument("--calibration-file", help="calibration cache (default $HF_ENTROPY_CACHE/sweep_calibration.json)")
    p.add_argument("--calibration-device", help="use another device's calibration for the estimate")
    s = p.add_argument_group("Slurm")
    s.add_argument("--slurm", action="store_true", help="write an array job script and print the sbatch command")
    s.add_argument("--slurm-job-name", default=None, help="default hf-entropy-<matrices>")
    s.add_argument("--slurm-throttle", type=_positive("--slurm-throttle"), help="at most M tasks at once (%%M)")
    s.add_argument("--slurm-partition")
    s.add_argument("--slurm-account")
    s.add_argument("--slurm-time", help="time limit per task, e.g. 12:00:00")
    s.add_argument("--slurm-gpus", type=int, help="GPUs per task (--gres=gpu:N)")
    s.add_argument("--slurm-cpus", type=int, help="CPUs per task")
    s.add_argument("--slurm-mem", help="memory per task, e.g. 64G")
    s.add_argument(
        "--slurm-setup",
        action="append",
        default=[],
        metavar="CMD",
        help="a shell line run before the runner in each task (e.g. 'source venv/bin/activate')",
    )
    return p


def _split_extra(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--extra" in argv:
        i = argv.index("--extra")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _task_argv(args, extra: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The runner's command line for one Slurm task, and its `--extra` tail (absolute paths, no Slurm flags)."""
    out = [sys.executable, "-m", "hf_entropy_callback.sweeps", "--matrix", *args.matrix]
    if args.models:
        out += ["--models", *[os.path.abspath(m) if os.path.isdir(m) else m for m in args.models]]
    if args.models_dir:
        out += ["--models-dir", os.path.abspath(args.models_dir)]
    out += [
        "--data",
        os.path.abspath(args.data),
        "--out",
        os.path.abspath(args.out),
        "--script",
        os.path.abspath(args.script),
        "--launcher",
        args.launcher,
        "--retries",
        str(args.retries),
    ]
    if args.seeds:
        out += ["--seeds", *map(str, args.seeds)]
    if args.only:
        out += ["--only", *args.only]
    out += [
        "--main-ranks",
        *map(str, args.main_ranks),
        "--sweep-ranks",
        *map(str, args.sweep_ranks),
        "--ablation-rank",
        str(args.ablation_rank),
        "--learning-rates",
        *[f"{x:g}" for x in args.learning_rates],
    ]
    return out, (["--extra", *extra] if extra else [])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `hf-entropy-sweep` command (see the module docstring); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = _split_extra(argv)
    parser = build_parser()
    args = parser.parse_args(own)
    matrices = list(MATRICES) if "all" in args.matrix else list(dict.fromkeys(args.matrix))
    if args.gpus and args.jobs:
        parser.error("--jobs and --gpus exclude each other: --gpus runs one job per GPU (--jobs-per-gpu for more)")
    if args.retries < 0:
        parser.error(f"--retries must be >= 0, got {args.retries}")
    if not os.path.isfile(args.script):
        parser.error(f"--script {args.script}: no such file (run from the repository, or pass --script PATH)")
    if args.data is None:
        args.data = os.environ.get("HF_ENTROPY_SHARED_DATA") or os.path.join(
            os.path.dirname(os.path.abspath(args.script)), "..", "shared", "data"
        )
    args.data = os.path.normpath(os.path.abspath(args.data))
    try:
        launcher = parse_launcher(args.launcher)
        models = resolve_models(args.models, args.models_dir)
        options = MatrixOptions(
            main_ranks=tuple(args.main_ranks),
            sweep_ranks=tuple(args.sweep_ranks),
            ablation_rank=args.ablation_rank,
            learning_rates=tuple(args.learning_rates),
        )
        runs = expand_runs(
            matrices,
            out_dir=args.out,
            data_dir=args.data,
            models=models,
            models_dir=args.models_dir,
            seeds=args.seeds,
            extra=extra,
            only=args.only,
            options=options,
        )
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        slots = make_slots(args.jobs or 1, gpus, args.jobs_per_gpu, args.gpus_per_job, launcher)
    except ValueError as err:
        parser.error(str(err))
    if not runs:
        parser.error(f"no runs: --only {' '.join(args.only)} matches none of the {', '.join(matrices)} runs")
    out_dir = os.path.abspath(args.out)
    if args.task_index is not None:
        if not 0 <= args.task_index < len(runs):
            parser.error(
                f"--task-index {args.task_index} is out of range: the selection has {len(runs)} runs (0-{len(runs) - 1})"
            )
        runs = [runs[args.task_index]]
        args.no_report = True

    cal_path = args.calibration_file or default_calibration_file()
    if args.calibrate:
        try:
            calibrate(runs, data_dir=args.data, path=cal_path, steps=args.calibrate_steps)
        except RuntimeError as err:
            print(f"hf-entropy-sweep: error: {err}", file=sys.stderr)
            return 1

    if args.dry_run:
        for run in runs:
            print(shlex.join(run_command(run, launcher, args.script)))
        counts = {m: sum(m in r.matrices for r in runs) for m in matrices}
        print(f"{len(runs)} runs (" + ", ".join(f"{m}: {n}" for m, n in counts.items()) + ")", file=sys.stderr)
        device = args.calibration_device or device_key()
        for line in estimate_lines(
            runs, matrices, data_dir=args.data, calibration=load_calibration(cal_path), device=device
        ):
            print(line, file=sys.stderr)
        return 0

    if args.slurm:
        job = args.slurm_job_name or "hf-entropy-" + "-".join(matrices)
        task, tail = _task_argv(args, extra)
        report_argv = None if args.no_report else task + ["--collect"] + tail
        paths = write_slurm_scripts(
            runs,
            task,
            extra=tail,
            out_dir=out_dir,
            job_name=job,
            throttle=args.slurm_throttle,
            partition=args.slurm_partition,
            time_limit=args.slurm_time,
            gpus=args.slurm_gpus,
            cpus=args.slurm_cpus,
            mem=args.slurm_mem,
            account=args.slurm_account,
            setup=args.slurm_setup,
            report_argv=report_argv,
        )
        print(
            f"wrote {paths['array']} ({len(runs)} array tasks)"
            + (f" and {paths['report']}" if "report" in paths else "")
        )
        print(f"submit with:\n  {paths['submit']}")
        return 0

    status_file = args.status_file or (
        os.path.join(out_dir, RECORDS_DIRNAME, f"task-{args.task_index}.json")
        if args.task_index is not None
        else os.path.join(out_dir, STATUS_NAME)
    )
    if args.collect:
        results = collect_results(runs, out_dir, launcher, args.script)
        write_status(status_file, results, matrices=matrices, invocation=[sys.argv[0], *argv])
    else:
        print(
            f"{len(runs)} runs ({', '.join(matrices)}), {len(slots)} at a time; logs in {os.path.join(out_dir, LOGS_DIRNAME)}"
        )
        try:
            results = run_sweep(
                runs,
                out_dir=out_dir,
                launcher=launcher,
                script=args.script,
                slots=slots,
                retries=args.retries,
                status_file=status_file,
                matrices=matrices,
                invocation=[sys.argv[0], *argv],
            )
        except KeyboardInterrupt as stop:
            sig = stop.args[0] if stop.args else signal.SIGINT
            print(f"interrupted; status in {status_file}; run the same command again to resume", file=sys.stderr)
            return 128 + int(sig)
    print()
    print(format_summary_table(results))
    print(f"status: {status_file}")
    code = 1 if any(r.status not in ("done", "skipped") for r in results) else 0
    if not args.no_report:
        finished = [r.output_dir for r in results if folder_state(r.output_dir) == "finished"]
        if finished:
            report = os.path.join(out_dir, "report")
            log = os.path.join(out_dir, LOGS_DIRNAME, "report.log")
            rc = build_report(finished, report, log)
            if rc == 0:
                print(f"report: {os.path.join(report, 'index.md')} ({len(finished)} runs)")
            else:
                print(f"report FAILED (exit status {rc}); log: {log}", file=sys.stderr)
                code = 1
        else:
            print("no finished runs: no report")
    return code


def _cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _cli()
