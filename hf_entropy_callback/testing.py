"""Tiny random models, a word-level tokenizer and synthetic NLI data, for tests and the smoke preset.

Nothing here touches the network: the tokenizer is built from a generated vocabulary and the models
from small configs with random weights.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: Architectures `tiny_model` can build; the last one is a decoder (left padding).
TINY_ARCHS = ("bert", "roberta", "distilbert", "deberta-v2", "qwen2")
DECODER_ARCHS = ("qwen2", "llama")

_SUBJECTS = ["man", "woman", "dog", "child", "group", "player", "cook", "rider"]
_VERBS = ["runs", "sleeps", "eats", "jumps", "sings", "reads", "swims", "waits"]
_PLACES = ["park", "street", "kitchen", "beach", "field", "room", "stage", "shop"]


def synthetic_vocab() -> List[str]:
    """Every word the synthetic NLI generator uses."""
    extra = ["a", "the", "in", "is", "not", "maybe", "outside", "someone", "."]
    return sorted(set(_SUBJECTS + _VERBS + _PLACES + extra))


def make_tokenizer(vocab: Optional[Sequence[str]] = None, padding_side: str = "right", model_max_length: int = 64):
    """A word-level `PreTrainedTokenizerFast` ([CLS] a [SEP] b [SEP], token type ids for pairs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS) + [w for w in (vocab or synthetic_vocab()) if w not in SPECIAL_TOKENS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cls, sep = words.index("[CLS]"), words.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side=padding_side,
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def tiny_config(arch: str, vocab_size: int, num_labels: int = 3, pad_token_id: int = 0):
    """A 2-layer, 32-wide config of `arch` for sequence classification."""
    from transformers import AutoConfig

    common = dict(num_labels=num_labels, pad_token_id=pad_token_id, vocab_size=vocab_size)
    if arch == "distilbert":
        return AutoConfig.for_model(
            arch, dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=64, **common
        )
    dims = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64
    )
    if arch in DECODER_ARCHS:
        dims.update(num_key_value_heads=2, tie_word_embeddings=False)
    else:
        dims["type_vocab_size"] = 2  # our word-level tokenizer emits token type ids for pairs
    if arch == "roberta":
        dims["max_position_embeddings"] = 72  # RoBERTa's positions start after the padding index
    return AutoConfig.for_model(arch, **dims, **common)


def tiny_model(arch: str, tokenizer, num_labels: int = 3, seed: int = 0):
    """A randomly initialised tiny `AutoModelForSequenceClassification` of `arch`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), num_labels, tokenizer.pad_token_id)
    return AutoModelForSequenceClassification.from_config(config)


def save_tiny_model(path: str, arch: str = "bert", padding_side: Optional[str] = None, seed: int = 0) -> str:
    """Write a tiny random model and its tokenizer to `path` (loadable with `from_pretrained`)."""
    side = padding_side or ("left" if arch in DECODER_ARCHS else "right")
    tok = make_tokenizer(padding_side=side)
    model = tiny_model(arch, tok, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def synthetic_nli(n: int, seed: int = 0, with_annotations: bool = True) -> Dict[str, list]:
    """Generated NLI pairs whose label follows from the words, with annotator counts of varied entropy.

    Returns columns `uid`, `premise`, `hypothesis`, `label` and, with annotations, `label_counts`
    (100 votes, majority = `label`).
    """
    rng = np.random.default_rng(seed)
    rows: Dict[str, list] = {"uid": [], "premise": [], "hypothesis": [], "label": []}
    if with_annotations:
        rows["label_counts"] = []
    shapes = [(100, 0, 0), (94, 3, 3), (80, 12, 8), (62, 25, 13), (50, 30, 20), (40, 33, 27)]
    for i in range(n):
        s, v, p = (str(rng.choice(x)) for x in (_SUBJECTS, _VERBS, _PLACES))
        label = int(rng.integers(0, 3))
        premise = f"a {s} {v} in the {p} ."
        if label == 0:
            hyp = f"someone {v} ."
        elif label == 1:
            hyp = f"a {s} {v} maybe outside ."
        else:
            hyp = f"the {s} is not {v} ."
        rows["uid"].append(f"syn{seed}-{i}")
        rows["premise"].append(premise)
        rows["hypothesis"].append(hyp)
        rows["label"].append(label)
        if with_annotations:
            top, *rest = shapes[int(rng.integers(0, len(shapes)))]
            others = [c for c in range(3) if c != label]
            counts = [0, 0, 0]
            counts[label], counts[others[0]], counts[others[1]] = top, rest[0], rest[1]
            rows["label_counts"].append(counts)
    return rows


def write_synthetic_chaosnli(path: str, n: int = 120, seed: int = 0) -> str:
    """Write a ChaosNLI-v1.0-format jsonl of `synthetic_nli` examples."""
    data = synthetic_nli(n, seed)
    with open(path, "w") as fh:
        for uid, prem, hyp, counts in zip(data["uid"], data["premise"], data["hypothesis"], data["label_counts"]):
            letters = "enc"
            record = {
                "uid": uid,
                "label_counter": {letters[k]: c for k, c in enumerate(counts) if c},
                "majority_label": letters[int(np.argmax(counts))],
                "label_dist": [c / 100 for c in counts],
                "label_count": counts,
                "example": {"uid": uid, "premise": prem, "hypothesis": hyp, "source": "synthetic"},
            }
            fh.write(json.dumps(record) + "\n")
    return path


def write_synthetic_bulk(path: str, n: int = 200, seed: int = 1) -> str:
    """Write a bulk-corpus jsonl (id, premise, hypothesis, label name) of `synthetic_nli` examples."""
    data = synthetic_nli(n, seed, with_annotations=False)
    names = ("entailment", "neutral", "contradiction")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        for uid, prem, hyp, label in zip(data["uid"], data["premise"], data["hypothesis"], data["label"]):
            fh.write(json.dumps({"id": uid, "premise": prem, "hypothesis": hyp, "label": names[label]}) + "\n")
    return path
