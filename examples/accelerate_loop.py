#!/usr/bin/env python
"""Track per-example learning dynamics in a custom training loop (accelerate, no Trainer).

Runs offline as it is (tiny random BERT, generated ChaosNLI-format data), on one process or several:

    python examples/accelerate_loop.py --output_dir /tmp/ex-loop
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --output_dir /tmp/ex-loop2 --cpu
    accelerate launch examples/accelerate_loop.py --output_dir /tmp/ex-loop --model_name_or_path MODEL_DIR \\
        --chaosnli_file ../shared/data/chaosnli/chaosNLI_snli.jsonl

Checkpoints are written at every epoch end (`accelerator.save_state` plus the tracker's state); run
the same command again after an interruption and it continues from the last one (`--stop_after_epoch`
simulates the interruption). The tracked sets are sharded over the processes and gathered, as under
the Trainer.
"""

import argparse
import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_entropy_callback import EntropyTracker, load_chaosnli
from hf_entropy_callback.data import split_chaosnli
from hf_entropy_callback.testing import save_tiny_model, write_synthetic_chaosnli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", help="local model folder (default: a tiny random BERT)")
    parser.add_argument("--chaosnli_file", help="ChaosNLI jsonl (default: generated synthetic data)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=16, help="total batch size, over all processes")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--track_every", type=int, default=5)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop_after_epoch", type=int, help="exit after this epoch's checkpoint (to test resuming)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    parser.add_argument(
        "--no_dropout",
        action="store_true",
        help="switch dropout off (runs on 1 and N processes then give the same numbers)",
    )
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu)
    set_seed(args.seed)
    inputs = os.path.join(args.output_dir, "inputs")
    with accelerator.main_process_first():  # one process writes the offline defaults, the others read them
        if accelerator.is_main_process:
            os.makedirs(inputs, exist_ok=True)
            if not args.model_name_or_path and not os.path.isdir(os.path.join(inputs, "tiny-bert")):
                save_tiny_model(os.path.join(inputs, "tiny-bert"), "bert", seed=args.seed)
            if not args.chaosnli_file and not os.path.isfile(os.path.join(inputs, "chaosnli.jsonl")):
                write_synthetic_chaosnli(os.path.join(inputs, "chaosnli.jsonl"), n=160)
    model_path = args.model_name_or_path or os.path.join(inputs, "tiny-bert")
    split = split_chaosnli(load_chaosnli(args.chaosnli_file or os.path.join(inputs, "chaosnli.jsonl")), 0.2, seed=42)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3)
    if args.no_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            for attr in ("dropout_prob", "attention_dropout"):  # attention dropout some versions keep as a float
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, 0.0)
    train = (
        split["train"]
        .map(
            lambda b: tokenizer(b["premise"], b["hypothesis"], truncation=True, max_length=args.max_length),
            batched=True,
            remove_columns=["uid", "premise", "hypothesis", "label_counts", "entropy", "category", "subset"],
        )
        .rename_column("label", "labels")
    )

    # The tracker: the ChaosNLI examples, tokenized as the training data is.
    tracker = EntropyTracker(
        {"train": split["train"], "validation": split["validation"]},
        tokenizer,
        track_every=args.track_every,
        max_length=args.max_length,
    )

    per_process = args.batch_size // accelerator.num_processes
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    collate = DataCollatorWithPadding(tokenizer)

    ckpt = os.path.join(args.output_dir, "checkpoint")
    first_epoch = 0
    if os.path.isfile(os.path.join(ckpt, "tracker.pt")):
        accelerator.load_state(ckpt)
        state = torch.load(os.path.join(ckpt, "tracker.pt"), weights_only=False)
        tracker.prepare(model)
        tracker.load_state_dict(state)
        first_epoch = round(state["epochs"][-1])
        accelerator.print(f"resumed after epoch {first_epoch} (step {tracker.steps[-1]})")
    else:
        accelerator.print(tracker.track(model, step=0, epoch=0.0, reason="step0"))

    step = first_epoch * steps_per_epoch
    for epoch in range(first_epoch, args.epochs):
        # A fixed shuffle per epoch, so a resumed run sees the same batches as an uninterrupted one.
        loader = accelerator.prepare(
            DataLoader(train.shuffle(seed=args.seed + epoch), batch_size=per_process, collate_fn=collate)
        )
        model.train()
        for i, batch in enumerate(loader):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            metrics = tracker.maybe_track(
                model,
                step,
                epoch + (i + 1) / len(loader),
                epoch_end=i + 1 == len(loader),
                final=(epoch + 1 == args.epochs and i + 1 == len(loader)),
            )
            if metrics:
                accelerator.log(metrics, step=step)  # any tracker set up with Accelerator(log_with=...)
                accelerator.print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        accelerator.save_state(ckpt)
        if accelerator.is_main_process:
            torch.save(tracker.state_dict(), os.path.join(ckpt, "tracker.pt"))
        accelerator.wait_for_everyone()
        if args.stop_after_epoch is not None and epoch + 1 == args.stop_after_epoch:
            accelerator.print(f"stopping after epoch {epoch + 1} as asked")
            return None

    if accelerator.is_main_process:
        path = tracker.save(os.path.join(args.output_dir, "entropy_tracking"))
        accelerator.print(f"run directory written: {path}")
    accelerator.end_training()
    return tracker


if __name__ == "__main__":
    main()
