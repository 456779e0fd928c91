"""What the callback adds to a real training run, against the floor of the passes it makes.

    python benchmarks/bench_training_overhead.py [--model DIR] [--steps 80] [--track_every 20] [--repeats 3] [--threads 1]

The same short training twice, with and without `AnnotationEntropyCallback`, alternately (`--repeats`
pairs, the order swapped every pair): all-MiniLM-L6-v2 + LoRA r8 (`peft_setup.apply_peft`, alpha as the
script sets it), `ClassWeightedTrainer`, the study's batch 32, learning rate 1e-4, cosine schedule, on the
study's training set (the ChaosNLI-SNLI train part + 20,000 SNLI bulk examples from `../shared/data`);
tracking the ChaosNLI-SNLI train (1,211) and validation (303) parts every `--track_every` steps, 128 tokens
max. Every run starts from the same weights; the Trainer and the callback are built outside the timing,
which covers `trainer.train()` (the callback's tokenization, passes, metrics, logging and save included).

The floor of one tracking point is `bench_tracking_pass.py`'s: the same examples grouped by exact length (no
padding), batches of at most 64, a plain forward under `torch.inference_mode`, measured in this process once
per pair. Prints the added time (tracked - plain, per pair: median, min, max), where the callback's own time
went, and

    ratio = median added time / (points x median floor time)      (goal: <= 1.1)

in wall time and in CPU time (`time.process_time`). On a machine shared with other work the wall times move
with the other processes' load; with `--threads 1` this process's CPU time barely does, so its ratio is the
steadier figure there (with several threads, threads spinning under contention count as CPU time too).
Nothing is asserted; quote ratios measured within one run.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _data_dir() -> str:
    return os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def _default_model() -> str:
    local = os.path.join(ROOT, ".cache", "models", "all-MiniLM-L6-v2")
    if os.path.isdir(local):
        return local
    from hf_entropy_callback.models import default_model_path

    return default_model_path(fetch=False)


def floor_batches(tracker, batch_size: int):
    """`bench_tracking_pass.py`'s floor: the tracked tokens in exact-length groups (no padding), <= batch_size each."""
    by_len = defaultdict(list)
    for tset in tracker.sets.values():
        for f in tset.features:
            by_len[len(f["input_ids"])].append(f)
    batches = []
    for feats in by_len.values():
        for i in range(0, len(feats), batch_size):
            chunk = feats[i : i + batch_size]
            batches.append(
                {k: torch.tensor([f[k] for f in chunk]) for k in ("input_ids", "token_type_ids") if k in chunk[0]}
            )
    return batches


class Clock:
    """Wall and CPU seconds of a block: `with Clock() as c: ...`, then `c.wall`, `c.cpu`."""

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


class Timed:
    """Wraps a bound method and adds up the wall and CPU time of its calls."""

    def __init__(self, fn):
        self.fn, self.wall, self.cpu = fn, 0.0, 0.0

    def __call__(self, *args, **kwargs):
        clock = Clock().__enter__()
        try:
            return self.fn(*args, **kwargs)
        finally:
            clock.__exit__()
            self.wall += clock.wall
            self.cpu += clock.cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 in the cache)")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--track_every", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bulk_size", type=int, default=20000)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--tracking_batch_size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    model_dir = a.model or _default_model()
    chaos_file = os.path.join(_data_dir(), "chaosnli", "chaosNLI_snli.jsonl")
    bulk_file = os.path.join(_data_dir(), "snli", "snli_train_subset.jsonl")
    if not os.path.isdir(model_dir) or not os.path.isfile(chaos_file) or not os.path.isfile(bulk_file):
        sys.exit(f"needs the model folder {model_dir} (bash sweeps/demo.sh fetches it), {chaos_file} and {bulk_file}")
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from hf_entropy_callback import AnnotationEntropyCallback, ClassWeightedTrainer, EntropyTracker, load_chaosnli
    from hf_entropy_callback.chaosnli import NLI_LABELS
    from hf_entropy_callback.data import build_training_set, load_bulk, sample_bulk, split_chaosnli
    from hf_entropy_callback.peft_setup import apply_peft, lora_alpha_for
    from hf_entropy_callback.runs import load_run

    transformers.utils.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=3, id2label=dict(enumerate(NLI_LABELS)), label2id={n: i for i, n in enumerate(NLI_LABELS)}
    )
    base = apply_peft(base, "lora", r=8, lora_alpha=lora_alpha_for(8))
    split = split_chaosnli(load_chaosnli(chaos_file), 0.2, seed=42)
    tracked = {"train": split["train"], "validation": split["validation"]}
    train = build_training_set(split["train"], sample_bulk(load_bulk(bulk_file), a.bulk_size, seed=42))
    train = train.map(
        lambda b: tok(b["premise"], b["hypothesis"], truncation=True, max_length=a.max_length),
        batched=True,
        remove_columns=[c for c in train.column_names if c != "label"],
    )

    floor_model = copy.deepcopy(base).eval()
    floor_tracker = EntropyTracker(tracked, tok, batch_size=a.tracking_batch_size, max_length=a.max_length)
    floor_set = floor_batches(floor_tracker.prepare(floor_model), a.tracking_batch_size)

    @torch.inference_mode()
    def floor() -> Clock:
        with Clock() as c:
            for b in floor_set:
                floor_model(**b)
        return c

    print(f"  data and model ready; floor warm-up: {floor().wall:.2f} s", flush=True)

    def run(with_callback: bool, out: str):
        model = copy.deepcopy(base)
        args = TrainingArguments(
            out,
            per_device_train_batch_size=32,
            max_steps=a.steps,
            learning_rate=1e-4,
            lr_scheduler_type="cosine",
            warmup_steps=0.06,
            logging_steps=50,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=42,
            disable_tqdm=True,
        )
        callbacks = []
        if with_callback:
            cb = AnnotationEntropyCallback(
                tracked,
                tokenizer=tok,
                track_every=a.track_every,
                batch_size=a.tracking_batch_size,
                max_length=a.max_length,
            )
            callbacks.append(cb)
        trainer = ClassWeightedTrainer(
            model=model, args=args, train_dataset=train, processing_class=tok, callbacks=callbacks
        )
        for printer in (PrinterCallback, ProgressCallback):  # no log lines on the console, in either arm
            trainer.remove_callback(printer)
        parts = {}
        if with_callback:
            cb.set_trainer(trainer)
            for name in ("prepare", "track", "save"):
                parts[name] = Timed(getattr(cb.tracker, name))
                setattr(cb.tracker, name, parts[name])
        with Clock() as c:
            trainer.train()
        return c, parts

    times = {clock: {"plain": [], "tracked": [], "floor": []} for clock in ("wall", "cpu")}
    own = {clock: defaultdict(list) for clock in ("wall", "cpu")}
    points = None
    with tempfile.TemporaryDirectory() as out:
        for r in range(a.repeats):
            measured = {"floor": floor()}
            order = ("plain", "tracked") if r % 2 == 0 else ("tracked", "plain")
            for arm in order:
                measured[arm], parts = run(arm == "tracked", os.path.join(out, f"{arm}-{r}"))
                for name, timer in parts.items():
                    own["wall"][name].append(timer.wall)
                    own["cpu"][name].append(timer.cpu)
            for clock in ("wall", "cpu"):
                for arm, c in measured.items():
                    times[clock][arm].append(getattr(c, clock))
            if points is None:
                points = len(load_run(os.path.join(out, f"tracked-{r}")).points)
            print(
                f"  pair {r + 1}: "
                + ", ".join(f"{arm} {c.wall:.1f} s ({c.cpu:.1f} s CPU)" for arm, c in measured.items()),
                flush=True,
            )

    n = sum(len(s) for s in tracked.values())
    print(
        f"{os.path.basename(model_dir)} + LoRA r8, {a.steps} steps of batch 32, tracking {n} examples every "
        f"{a.track_every} steps ({points} points); torch threads {torch.get_num_threads()}; {a.repeats} interleaved pairs"
    )
    ratios = {}
    for clock in ("wall", "cpu"):
        t = times[clock]
        added = [x - y for x, y in zip(t["tracked"], t["plain"])]
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f" {clock} time:")
        for k in ("plain", "tracked", "floor"):
            print(f"  {k:<8} median {med[k]:7.2f} s   min {min(t[k]):7.2f}   max {max(t[k]):7.2f}")
        print(
            f"  added    median {statistics.median(added):7.2f} s   min {min(added):7.2f}   max {max(added):7.2f}"
            f"   ({points} x floor = {points * med['floor']:.2f} s)"
        )
        mine = {name: statistics.median(v) for name, v in own[clock].items()}
        print(
            "  the callback's own time (median): "
            + ", ".join(f"{name} {v:.2f} s" for name, v in mine.items())
            + f"; the rest of the added time {statistics.median(added) - sum(mine.values()):.2f} s"
        )
        ratios[clock] = statistics.median(added) / (points * med["floor"])
        per_pair = ", ".join(f"{d / (points * f):.3f}" for d, f in zip(added, t["floor"]))
        print(f"  added / (points x floor) = {ratios[clock]:.3f}   (per pair: {per_pair}; goal <= 1.1)")
    return ratios


if __name__ == "__main__":
    main()
