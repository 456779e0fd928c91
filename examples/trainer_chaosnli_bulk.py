#!/usr/bin/env python
"""The study's setup in your own `Trainer` script: ChaosNLI (tracked) + a bulk corpus, LoRA, the callback.

A complete script, about what `run_glue_entropy.py` does without its command-line machinery:

    python examples/trainer_chaosnli_bulk.py --output_dir runs/my-first \\
        --chaosnli_file ../shared/data/chaosnli/chaosNLI_snli.jsonl \\
        --train_file ../shared/data/snli/snli_train_subset.jsonl
    python -m analysis runs/my-first --out report/my-first

Without `--model_name_or_path` it uses the library's default model (all-MiniLM-L6-v2, fetched once
from the package index; `hf_entropy_callback.models.default_model_path`).

Building the training set: the ChaosNLI part's `label` is a `ClassLabel` and a bulk corpus's is a
plain integer, so `datasets.concatenate_datasets([chaos_train, bulk])` fails on the differing
features. `build_training_set` combines them into one set with plain integer labels, stable
`example_id`s ("chaosnli:<uid>" / "bulk:<id>") and a `tracked` column; tokenize that set.
"""

import argparse

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_entropy_callback import NLI_LABELS, AnnotationEntropyCallback, RunConfig, load_chaosnli, load_run
from hf_entropy_callback.data import build_training_set, load_bulk, sample_bulk, split_chaosnli
from hf_entropy_callback.dynamics import format_summary, run_summary
from hf_entropy_callback.models import default_model_path
from hf_entropy_callback.peft_setup import apply_peft


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chaosnli_file", required=True, help="ChaosNLI jsonl (or the v1.0 zip, or 'official')")
    parser.add_argument(
        "--train_file", required=True, help="bulk corpus: jsonl/json/csv with premise, hypothesis, label"
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", help="local model folder or hub id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--task", default="snli", choices=["snli", "mnli"])
    parser.add_argument("--bulk_size", type=int, default=2000)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max_steps", type=int, default=-1, help="stop after this many steps (-1: all epochs)")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--track_every", type=int, default=40)
    args = parser.parse_args(argv)
    model_path = args.model_name_or_path or default_model_path()

    # 1. Data: ChaosNLI split 80/20 by entropy category; a seeded bulk sample; one training set.
    split = split_chaosnli(load_chaosnli(args.chaosnli_file, subset=args.task), val_fraction=0.2, seed=42)
    bulk = sample_bulk(load_bulk(args.train_file), args.bulk_size, seed=42)
    train = build_training_set(split["train"], bulk)  # not concatenate_datasets: see the module docstring
    tracked = train.filter(lambda row: row["tracked"])  # the ChaosNLI part, with entropy and label counts

    # 2. Model with the library's label order (0=entailment, 1=neutral, 2=contradiction), LoRA on it.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(NLI_LABELS),
        id2label=dict(enumerate(NLI_LABELS)),
        label2id={name: i for i, name in enumerate(NLI_LABELS)},
        ignore_mismatched_sizes=True,
    )
    model = apply_peft(model, "lora", r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05)

    # 3. Tokenize the combined set; keep only the model's inputs and `label`.
    def encode(batch):
        return tokenizer(batch["premise"], batch["hypothesis"], truncation=True, max_length=args.max_length)

    train_tok = train.map(encode, batched=True, remove_columns=[c for c in train.column_names if c != "label"])
    val_tok = split["validation"].map(
        encode, batched=True, remove_columns=[c for c in split["validation"].column_names if c != "label"]
    )

    # 4. The callback: the tracked sets by name, the training truncation, and what the callback cannot
    #    read itself (`run_config=`: the model's path, the dataset, the data sizes), so that the report
    #    groups this run under its model and dataset. Method, rank, alpha, learning rate and seed are read
    #    from the model's peft_config and the TrainingArguments (`RunConfig.for_training`).
    callback = AnnotationEntropyCallback(
        {"train": tracked, "validation": split["validation"]},
        tokenizer=tokenizer,
        track_every=args.track_every,
        max_length=args.max_length,
        run_config=RunConfig(model_name_or_path=model_path, dataset=args.task, bulk_size=len(bulk)),
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=32,
            lr_scheduler_type="cosine",
            logging_steps=25,
            save_strategy="no",
            report_to="none",
            seed=42,
        ),
        train_dataset=train_tok,
        eval_dataset=val_tok,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    # Added after the Trainer's own progress callback, so that the step-0 tracking metrics are printed too.
    trainer.add_callback(callback)
    trainer.train()

    # 5. The run directory (args.output_dir/entropy_tracking): summary here, report with `python -m analysis`.
    summary = run_summary(load_run(args.output_dir))
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
