"""Cost of per-example tracking: one tracking pass vs one training step, length-sorted vs unsorted
batches, and the overhead of the callback on a short Trainer run.

    python benchmarks/bench_tracking.py [--examples 1211] [--layers 4] [--hidden 256]

Uses a randomly initialised BERT of the given size and generated NLI pairs (no network). Prints the
figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import datasets
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, Trainer, TrainingArguments

from hf_entropy_callback import AnnotationEntropyCallback, EntropyTracker, annotation_entropy
from hf_entropy_callback.testing import make_tokenizer, synthetic_nli


def _model(tok, layers, hidden):
    cfg = AutoConfig.for_model(
        "bert",
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_labels=3,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg)


def _data(tok, n, seed=0):
    d = synthetic_nli(n, seed)
    # vary lengths as real NLI pairs do, so sorting by length matters
    rng = np.random.default_rng(seed)
    d["premise"] = [p + " in the park" * int(k) for p, k in zip(d["premise"], rng.integers(0, 8, n))]
    raw = datasets.Dataset.from_dict(d)
    raw = raw.add_column("entropy", annotation_entropy(np.asarray(d["label_counts"])).tolist())
    train = raw.map(lambda b: tok(b["premise"], b["hypothesis"]), batched=True)
    return raw, train.remove_columns(["uid", "premise", "hypothesis", "entropy", "label_counts"])


def _time(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1211)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=64)
    a = ap.parse_args()

    tok = make_tokenizer(model_max_length=128)
    model = _model(tok, a.layers, a.hidden)
    raw, train = _data(tok, a.examples)
    print(
        f"model: BERT {a.layers} layers x {a.hidden}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{a.examples} tracked examples; torch threads {torch.get_num_threads()}"
    )

    model.eval()
    tracker = EntropyTracker(raw, tok, batch_size=a.batch_size).prepare(model)
    sorted_s = _time(lambda: tracker.compute_logprobs(model, "train"))
    unsorted_tracker = EntropyTracker(raw, tok, batch_size=a.batch_size).prepare(model)
    tset = unsorted_tracker.sets["train"]
    tset.order = np.arange(len(tset.labels))  # before the first pass: batches are built once, then cached
    unsorted_s = _time(lambda: unsorted_tracker.compute_logprobs(model, "train"))
    print(
        f"one tracking pass: {sorted_s:.2f} s length-sorted ({a.examples / sorted_s:.0f} examples/s), "
        f"{unsorted_s:.2f} s in dataset order; sorted/unsorted = {sorted_s / unsorted_s:.2f}"
    )

    model.train()
    batch = tok.pad(
        [{k: train[i][k] for k in ("input_ids", "attention_mask", "token_type_ids")} for i in range(32)],
        return_tensors="pt",
    )
    labels = torch.tensor(train["label"][:32])

    def step():
        model(**batch, labels=labels).loss.backward()
        model.zero_grad()

    step_s = _time(step)
    print(f"one training step (batch 32): {step_s:.3f} s; a tracking pass costs {sorted_s / step_s:.1f} steps")

    with tempfile.TemporaryDirectory() as out:

        def run(track):
            m = _model(tok, a.layers, a.hidden)
            args = TrainingArguments(
                os.path.join(out, str(track)),
                per_device_train_batch_size=32,
                num_train_epochs=1,
                report_to=[],
                save_strategy="no",
                logging_strategy="no",
                use_cpu=True,
                disable_tqdm=True,
                max_steps=40,
            )
            cbs = [AnnotationEntropyCallback(raw, tokenizer=tok, track_every=10, log_metrics=False)] if track else []
            t = time.perf_counter()
            Trainer(model=m, args=args, train_dataset=train, processing_class=tok, callbacks=cbs).train()
            return time.perf_counter() - t

        plain, tracked = run(False), run(True)
    print(
        f"40 training steps: {plain:.1f} s without the callback, {tracked:.1f} s tracking every 10 steps "
        f"(5 points incl. step 0); overhead {tracked / plain:.2f}x"
    )
    lp_bytes = a.examples * 3 * 4
    print(
        f"stored per tracking point: {lp_bytes / 1024:.1f} KiB of float32 log-probabilities; "
        f"a 5-epoch study run (39 points) keeps {39 * lp_bytes / 2**20:.2f} MiB"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
