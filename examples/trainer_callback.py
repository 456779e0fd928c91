#!/usr/bin/env python
"""Track per-example learning dynamics in your own `Trainer` script: the callback in a few lines.

Runs offline as it is (a tiny random BERT and generated ChaosNLI-format data); point it at a real
model folder and ChaosNLI file to use it for real:

    python examples/trainer_callback.py --output_dir /tmp/ex-trainer
    python examples/trainer_callback.py --model_name_or_path .cache/all-MiniLM-L6-v2 \\
        --chaosnli_file ../shared/data/chaosnli/chaosNLI_snli.jsonl --output_dir /tmp/ex-trainer

The model here orders its labels alphabetically (contradiction=0, entailment=1, neutral=2), as
transformers' run_glue.py does; the tracked ChaosNLI examples use 0=entailment. The callback sees
both label lists and remaps the tracked labels to the model's ids.
"""

import argparse
import os
import tempfile

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_entropy_callback import AnnotationEntropyCallback, load_chaosnli, load_run
from hf_entropy_callback.data import split_chaosnli
from hf_entropy_callback.dynamics import format_summary, run_summary
from hf_entropy_callback.testing import save_tiny_model, write_synthetic_chaosnli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", help="local model folder (default: a tiny random BERT)")
    parser.add_argument("--chaosnli_file", help="ChaosNLI jsonl (default: generated synthetic data)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--learning_rate", type=float, default=5e-3)
    parser.add_argument("--max_length", type=int, default=64)
    args = parser.parse_args(argv)

    scratch = tempfile.mkdtemp(prefix="hf-entropy-example-")
    model_path = args.model_name_or_path or save_tiny_model(os.path.join(scratch, "tiny-bert"), "bert")
    chaos_file = args.chaosnli_file or write_synthetic_chaosnli(os.path.join(scratch, "chaosnli.jsonl"), n=160)

    # 1. The tracked examples: ChaosNLI with annotation entropy (label 0=entailment, 1=neutral, 2=contradiction).
    split = split_chaosnli(load_chaosnli(chaos_file), val_fraction=0.2, seed=42)

    # 2. Your own model and training data, with your own label order (alphabetical here).
    names = sorted(split["train"].features["label"].names)  # contradiction, entailment, neutral
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=3,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    to_model_id = {i: names.index(n) for i, n in enumerate(split["train"].features["label"].names)}

    def encode(batch):
        enc = tokenizer(batch["premise"], batch["hypothesis"], truncation=True, max_length=args.max_length)
        enc["labels"] = [to_model_id[y] for y in batch["label"]]
        return enc

    columns = split["train"].column_names
    train = split["train"].map(encode, batched=True, remove_columns=columns)
    val = split["validation"].map(encode, batched=True, remove_columns=columns)

    # 3. The callback: tracked sets by name, the same truncation as training.
    callback = AnnotationEntropyCallback(
        {"train": split["train"], "validation": split["validation"]}, track_every=10, max_length=args.max_length
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
            per_device_train_batch_size=16,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
        ),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[callback],
    )
    trainer.train()

    # 4. The run directory: per-example trajectories, ready for the analysis.
    summary = run_summary(load_run(args.output_dir))
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
