"""Training time with and without `record_train_dynamics`, on a real model and real data.

    python benchmarks/bench_train_dynamics.py [--model DIR] [--steps 20] [--repeats 3]

all-MiniLM-L6-v2 with LoRA r8 (by default the library's model folder, which `bash sweeps/demo.sh`
fills; `--model` names another copy), `ClassWeightedTrainer`, batch 32, on the first `--steps` x 32 examples
of the SNLI training subset in `../shared/data` (128 tokens max): one epoch, so every run also
gathers and writes one epoch file. In one process, `--repeats` times each, interleaved in ABBA order (off,
on, on, off, ...), every run from the same initial weights and seed.

Prints per mode the median, min and max of the Trainer's `train_runtime`, the overhead
(median on / median off - 1, and min / min - 1), and the time spent inside the recording itself
(per-batch records, the gather and the file write, timed around those calls), as a share of the
recording runs' training time: the wall-clock ratio of a short run on a shared machine is noisy,
the directly timed share is not. Nothing is asserted; quote figures measured in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the repository's library, the one being measured


def _data_dir() -> str:
    return os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the library's default model folder, if present")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_length", type=int, default=128)
    a = ap.parse_args(argv)
    from hf_entropy_callback.models import default_model_path

    a.model = a.model or default_model_path(fetch=False)
    bulk_file = os.path.join(_data_dir(), "snli", "snli_train_subset.jsonl")
    if not os.path.isdir(a.model) or not os.path.isfile(bulk_file):
        sys.exit(f"needs the model folder {a.model} (bash sweeps/demo.sh fetches it) and {bulk_file}")

    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
    )

    from hf_entropy_callback import ClassWeightedTrainer
    from hf_entropy_callback import train_dynamics as td
    from hf_entropy_callback.data import load_bulk
    from hf_entropy_callback.peft_setup import apply_peft

    tok = AutoTokenizer.from_pretrained(a.model)
    n = a.steps * a.batch_size
    raw = load_bulk(bulk_file).select(range(n))
    data = raw.map(
        lambda b: tok(b["premise"], b["hypothesis"], truncation=True, max_length=a.max_length),
        batched=True,
        remove_columns=[c for c in raw.column_names if c != "label"],
    )

    # Time spent inside the recording, timed around the recorder's calls (only recording runs make them).
    spent = {"seconds": 0.0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - t0

        return wrapper

    for name in ("add", "gather", "write_epoch"):
        setattr(td._Recorder, name, timed(getattr(td._Recorder, name)))

    times = {False: [], True: [], "recording": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            # ABBA order (off, on, on, off, ...) so that a drift in the machine's load hits both modes alike
            for record in (False, True) if rep % 2 == 0 else (True, False):
                torch.manual_seed(0)  # the same classifier head and LoRA initialisation in every run
                model = apply_peft(
                    AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=3), "lora", r=8
                )
                spent["seconds"] = 0.0
                trainer = ClassWeightedTrainer(
                    model=model,
                    args=TrainingArguments(
                        output_dir=os.path.join(tmp, f"{record}-{rep}"),
                        per_device_train_batch_size=a.batch_size,
                        num_train_epochs=1,
                        learning_rate=3e-3,
                        save_strategy="no",
                        logging_strategy="no",
                        report_to=[],
                        use_cpu=True,
                        seed=42,
                        disable_tqdm=True,
                    ),
                    train_dataset=data,
                    processing_class=tok,
                    data_collator=DataCollatorWithPadding(tok),
                    record_train_dynamics=record,
                )
                seconds = trainer.train().metrics["train_runtime"]
                times[record].append(seconds)
                if record:
                    times["recording"].append(spent["seconds"] / seconds)
                print(f"repeat {rep + 1}: recording {'on ' if record else 'off'} {seconds:7.2f} s", flush=True)

    def line(label, xs, unit="s"):
        return f"{label:<14} median {statistics.median(xs):7.2f} {unit}  min {min(xs):7.2f}  max {max(xs):7.2f}"

    print(f"\nall-MiniLM-L6-v2 + LoRA r8, batch {a.batch_size}, {a.steps} steps (1 epoch of {n} SNLI examples)")
    print(f"torch threads {torch.get_num_threads()}, {a.repeats} interleaved repeats per mode")
    print(line("off", times[False]))
    print(line("on", times[True]))
    med = statistics.median(times[True]) / statistics.median(times[False]) - 1
    low = min(times[True]) / min(times[False]) - 1
    print(f"overhead (wall): median/median {100 * med:+.2f}%, min/min {100 * low:+.2f}%")
    share = [100 * s for s in times["recording"]]
    print(line("in recording", share, "%"))


if __name__ == "__main__":
    main()
