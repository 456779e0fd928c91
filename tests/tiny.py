"""Shared helpers for tests that train tiny random models (no network, no shared data)."""

import datasets
import numpy as np
import torch
from transformers import TrainingArguments

from hf_entropy_callback import annotation_entropy
from hf_entropy_callback.testing import make_tokenizer, synthetic_nli, tiny_model


def tracked_and_train(tok, n=50, seed=0):
    """(raw tracked set with entropy, tokenized training set) of `n` synthetic NLI examples."""
    data = synthetic_nli(n, seed)
    raw = datasets.Dataset.from_dict(data)
    raw = raw.add_column("entropy", annotation_entropy(np.asarray(data["label_counts"])).tolist())
    train = raw.map(lambda b: tok(b["premise"], b["hypothesis"], truncation=True), batched=True)
    return raw, train.remove_columns(["uid", "premise", "hypothesis", "entropy", "label_counts"])


def no_dropout(model):
    """Switch every dropout off, including attention dropout that some versions keep as a float attribute
    (transformers 4.x BERT passes `self.dropout_prob` to SDPA)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


def setup(arch="bert", n=50, seed=0):
    tok = make_tokenizer(padding_side="left" if arch == "qwen2" else "right")
    model = tiny_model(arch, tok, seed=seed)
    raw, train = tracked_and_train(tok, n, seed)
    return tok, model, raw, train


def args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        num_train_epochs=3,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def validation_copy(raw, n=12):
    """The first `n` examples of `raw` under their own ids (an example is tracked in one set only)."""
    rows = {k: v[:n] for k, v in raw.to_dict().items()}
    rows["uid"] = [f"val-{u}" for u in rows["uid"]]
    return datasets.Dataset.from_dict(rows)
