"""The tiny, fast arguments the script tests train with (a tiny BERT, 48 + 40 generated examples)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_glue_entropy  # noqa: E402


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
