"""Memory and time per tracking point over a long trajectory: does the cost stay linear?

    python benchmarks/bench_tracking_memory.py [--examples 100000] [--points 100] [--threads 1]

A tiny random BERT built from a config (1 layer, 8 wide: the forward need not be realistic, the
trajectory's bookkeeping is what is measured; one torch thread by default, which on a small shared
machine is faster for so small a model than two) tracks `--examples` generated NLI pairs (word-level
tokenizer built here, as `tests/tiny.py` does) over `--points` tracking points with
`EntropyTracker.track`; the weights are nudged between points so every point holds new numbers.
At the end the tracker's `state_dict()` is taken and the run directory is saved, as a checkpoint does.

Prints:
- the RSS of the process once the model and the raw tracked dataset exist (the baseline: what the
  user's own objects cost), and the peak RSS above it over the tracking, the state_dict and the save
  (goal: < 1 GB for 100,000 examples x 100 points), next to the trajectory's own size;
- the mean wall and CPU time per point of the first and the last 10 points (their ratio near 1 = flat =
  the cost per point does not grow with the history), and the save's time.

The peak is read from /proc/self/status (VmHWM, reset through /proc/self/clear_refs after the
baseline), where Linux has them; elsewhere from `resource.getrusage` (peak since the process started).
Nothing is asserted; the machine may be shared, so compare runs made the same way.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def _status_kib(field: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mib() -> float:
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(tok, layers: int, hidden: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(
        "bert",
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_labels=3,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100_000)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.points < 2 or a.examples < 10:
        sys.exit("needs --points >= 2 and --examples >= 10")

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    import datasets

    from hf_entropy_callback import EntropyTracker, annotation_entropy
    from hf_entropy_callback.testing import make_tokenizer, synthetic_nli

    tok = make_tokenizer(model_max_length=64)
    model = _model(tok, a.layers, a.hidden)
    data = synthetic_nli(a.examples, seed=0)
    data["entropy"] = annotation_entropy(np.asarray(data["label_counts"])).tolist()
    raw = datasets.Dataset.from_dict(data)
    del data
    gc.collect()
    base = _rss_mib()
    exact_peak = _reset_peak()

    tracker = EntropyTracker(raw, tok, batch_size=a.batch_size, track_every=10)
    t = time.perf_counter()
    tracker.prepare(model)
    prepare_s = time.perf_counter() - t
    times, cpu = [], []
    gen = torch.Generator().manual_seed(1)
    for p in range(a.points):
        with torch.no_grad():  # new numbers at every point, as training would give
            model.classifier.weight.add_(0.01 * torch.randn(model.classifier.weight.shape, generator=gen))
        t, c = time.perf_counter(), time.process_time()
        tracker.track(model, step=10 * p, epoch=p / a.points, reason="step0" if p == 0 else "interval")
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    track_peak = _peak_mib()
    t = time.perf_counter()
    state = tracker.state_dict()
    state_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        tracker.save(os.path.join(out, "entropy_tracking"))
        save_s = time.perf_counter() - t
        size = os.path.getsize(os.path.join(out, "entropy_tracking", "logprobs.npz"))
    peak = _peak_mib()
    del state

    k = min(10, a.points // 2)
    first, last = statistics.mean(times[:k]), statistics.mean(times[-k:])
    cpu_first, cpu_last = statistics.mean(cpu[:k]), statistics.mean(cpu[-k:])
    traj = a.points * a.examples * 3 * 4 / 2**20
    print(
        f"{a.examples:,} tracked examples x {a.points} points, BERT {a.layers} layer(s) x {a.hidden}, "
        f"tracking batch {a.batch_size}, torch threads {torch.get_num_threads()}"
    )
    print(f"  RSS with the model and the raw dataset (baseline): {base:,.0f} MiB")
    print(
        f"  peak RSS above the baseline: {peak - base:,.0f} MiB over tracking + state_dict + save "
        f"({track_peak - base:,.0f} MiB by the last point){'' if exact_peak else ' (peak since process start)'}; "
        f"the trajectory itself: {traj:,.0f} MiB float32 (logprobs.npz {size / 2**20:,.0f} MiB)"
    )
    print(
        f"  wall time per point: first {k} {first:.3f} s, last {k} {last:.3f} s, last/first {last / first:.3f} "
        f"(median of all {statistics.median(times):.3f} s); prepare {prepare_s:.1f} s"
    )
    print(
        f"  CPU time per point (less sensitive to other processes): first {k} {cpu_first:.3f} s, last {k} "
        f"{cpu_last:.3f} s, last/first {cpu_last / cpu_first:.3f}"
    )
    print(f"  state_dict {state_s * 1000:.1f} ms, save {save_s:.2f} s")
    return {
        "base": base,
        "peak_above": peak - base,
        "first": first,
        "last": last,
        "cpu_first": cpu_first,
        "cpu_last": cpu_last,
        "save": save_s,
    }


if __name__ == "__main__":
    main()
