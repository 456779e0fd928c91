"""The tiny, fast arguments the script tests train with (a tiny BERT, 48 + 40 generated examples)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_glue_entropy  # noqa: E402
from hf_entropy_callback.testing import save_tiny_model, write_synthetic_bulk, write_synthetic_chaosnli  # noqa: E402


def write_script_inputs(root, archs=("bert",)):
    """Generated inputs under `root`: a 60-example ChaosNLI file, 40 bulk examples, a tiny model per arch."""
    inputs = {
        "chaosnli": write_synthetic_chaosnli(str(root / "chaos.jsonl"), n=60),
        "bulk": write_synthetic_bulk(str(root / "bulk.jsonl"), n=40),
    }
    inputs.update({arch: save_tiny_model(str(root / arch), arch) for arch in archs})
    return inputs


def script_values(model, chaosnli, bulk, out, **extra):
    """`run_glue_entropy` argument values: 2 epochs of 6 steps, tracking every 2 steps, no checkpoints."""
    values = dict(
        model_name_or_path=model,
        chaosnli_file=chaosnli,
        train_file=bulk,
        bulk_size=40,
        output_dir=str(out),
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=5e-3,
        track_every=2,
        max_seq_length=32,
        r=4,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    values.update(extra)
    return values


def script_argv(model, chaosnli, bulk, out, **extra):
    """The same as command-line flags."""
    return run_glue_entropy._as_argv(script_values(model, chaosnli, bulk, out, **extra))
