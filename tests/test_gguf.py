"""run_glue_entropy.py on a GGUF checkpoint (`--gguf_file`), as a user runs it on SmolLM2's.

The checkpoint is written here with the `gguf` package: a tiny random Llama whose linear weights are
stored quantized (Q4_1 like the SmolLM2 file, the embedding as Q8_0), with a byte-level BPE tokenizer
in its metadata. transformers 5 marks any model loaded from a GGUF file as quantized, and its
Trainer then refuses to train it; the script asks for a dense load (`_gguf_dense`), which these tests
check from the outside: a run finishes, trains, and writes a normal run directory.
"""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the `gguf` package is not installed (pip install gguf, or the [gguf] extra)")

import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from hf_entropy_callback import load_run  # noqa: E402
from hf_entropy_callback.testing import synthetic_vocab, write_synthetic_bulk, write_synthetic_chaosnli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from script_args import script_values  # noqa: E402

import run_glue_entropy  # noqa: E402

GGUF_NAME = "tiny-llama-q4_1.gguf"
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
N_CHAOSNLI, N_BULK, MAX_STEPS = 25, 20, 4
EOS = "<|endoftext|>"
# llama.cpp's token types: what tells the loader that EOS is a special token, not text.
NORMAL, CONTROL = 1, 3


def _byte_level_vocab():
    """(tokens, merges) of a byte-level BPE that covers any text and has the test words as tokens.

    Every byte is a token (GPT-2's byte alphabet, the spelling transformers reads GGUF vocabularies
    in), so nothing is ever unknown; each word of the synthetic data is then built up by merges, and
    its space-prefixed form ("Ġman") is one more merge of "Ġ" with the word.
    """
    tokens = [EOS] + list(bytes_to_unicode().values())
    known, merges = set(tokens), []

    def merge(left, right):
        merges.append(f"{left} {right}")
        if left + right not in known:
            known.add(left + right)
            tokens.append(left + right)

    for word in synthetic_vocab():
        for k in range(1, len(word)):
            if word[: k + 1] not in known:
                merge(word[:k], word[k])
        merge("\u0120", word)
    return tokens, merges


def write_tiny_llama_gguf(path, seed=0):
    """Write a random 2-layer Llama as llama.cpp lays it out; returns the vocabulary size."""
    tokens, merges = _byte_level_vocab()
    head_dim = HIDDEN // HEADS
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    # The llama.* keys transformers turns into a LlamaConfig (integrations/ggml.py, GGUF_CONFIG_MAPPING).
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL] + [NORMAL] * (len(tokens) - 1))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    # No padding token, as in many decoder checkpoints: the script has to fall back to EOS.

    rng = np.random.default_rng(seed)

    def dense(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    def quantized(name, weight, qtype):
        # Blocks as llama.cpp stores them; the writer works out the float shape from the byte shape.
        writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)

    q4_1, q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    quantized("token_embd.weight", dense(len(tokens), HIDDEN), q8_0)
    # llama.cpp permutes q/k rows for its rope and transformers undoes it on load; on random weights
    # the order does not matter, only the shapes do.
    shapes = {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (KV_HEADS * head_dim, HIDDEN),
        "attn_v": (KV_HEADS * head_dim, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    for layer in range(LAYERS):
        for part, shape in shapes.items():
            quantized(f"blk.{layer}.{part}.weight", dense(*shape), q4_1)
        # llama.cpp keeps 1-D tensors (the norms) in float32 whatever the file type, so this does too.
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    # The LM head, unused by a sequence classifier, which must load without it all the same.
    writer.add_tensor("output.weight", dense(len(tokens), HIDDEN).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(tokens)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_inputs")
    model_dir = root / "model"
    model_dir.mkdir()
    vocab_size = write_tiny_llama_gguf(str(model_dir / GGUF_NAME))
    return {
        "model": str(model_dir),
        "vocab_size": vocab_size,
        "chaosnli": write_synthetic_chaosnli(str(root / "chaos.jsonl"), n=N_CHAOSNLI),
        "bulk": write_synthetic_bulk(str(root / "bulk.jsonl"), n=N_BULK),
    }


def test_gguf_file_is_quantized_and_tokenizes_the_data(inputs):
    """The fixture is a file like the real one: quantized weights, and a tokenizer that reads the data."""
    reader = gguf.GGUFReader(os.path.join(inputs["model"], GGUF_NAME))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_1
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    tok = AutoTokenizer.from_pretrained(inputs["model"], gguf_file=GGUF_NAME)
    assert len(tok) == inputs["vocab_size"] and tok.eos_token == EOS
    text = "a man runs in the park ."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(ids) == [
        "a",
        "\u0120man",
        "\u0120runs",
        "\u0120in",
        "\u0120the",
        "\u0120park",
        "\u0120.",
    ]


def _run(inputs, out, peft, monkeypatch):
    """Run the script in-process; returns (summary, the tokenizer it trained and tracked with)."""
    used = {}
    load = run_glue_entropy.load_model_and_tokenizer

    def spy(*args, **kwargs):
        used["loaded"] = load(*args, **kwargs)
        return used["loaded"]

    monkeypatch.setattr(run_glue_entropy, "load_model_and_tokenizer", spy)
    values = script_values(
        inputs["model"],
        inputs["chaosnli"],
        inputs["bulk"],
        out,
        gguf_file=GGUF_NAME,
        peft=peft,
        r=4,
        bulk_size=N_BULK,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
    )
    summary = run_glue_entropy.main(run_glue_entropy._as_argv(values))
    return summary, used["loaded"][1]


@pytest.mark.parametrize("peft", ["lora", "none"])
def test_script_trains_on_a_gguf_checkpoint(inputs, tmp_path, peft, monkeypatch):
    summary, tokenizer = _run(inputs, tmp_path, peft, monkeypatch)

    # A complete run directory, as for any other model.
    for name in ("entropy_tracking/summary.json", "eval_results.json", "train_results.json"):
        assert os.path.isfile(tmp_path / name), name
    run = load_run(str(tmp_path))
    n_train, n_val = len(run.set_examples("train")), len(run.set_examples("validation"))
    assert n_train + n_val == N_CHAOSNLI and summary["n_examples"] == n_train
    with open(tmp_path / "entropy_tracking" / "summary.json") as fh:
        assert json.load(fh)["n_examples"] == n_train
    assert list(run.points["step"]) == [0, 2, 4]
    for name in ("train", "validation"):
        assert np.isfinite(run.logprobs[name]).all()

    # What the run says about itself: the GGUF file, and that it was handled as a decoder.
    cfg = run.config
    assert cfg["gguf_file"] == GGUF_NAME
    assert cfg["architecture"] == "decoder" and cfg["method"] == ("full" if peft == "none" else "lora")
    assert cfg["n_train"] == n_train + N_BULK
    # Decoders classify from the last token, so the run pads on the left, with EOS (the file has no
    # padding token); the saved tokenizer keeps that padding token.
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == EOS
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token == EOS

    with open(tmp_path / "train_results.json") as fh:
        assert math.isfinite(json.load(fh)["train_loss"])
    if peft == "lora":
        # PEFT starts every lora_B at zero: a non-zero one was trained.
        adapter = load_file(str(tmp_path / "adapter_model.safetensors"))
        lora_b = [w for k, w in adapter.items() if "lora_B" in k]
        assert lora_b and any(w.abs().max() > 0 for w in lora_b)
    else:
        # A full fine-tune is saved as a plain dense model (no GGUF, no quantization config) that
        # reloads by itself, with weights moved away from the file's.
        with open(tmp_path / "config.json") as fh:
            assert "quantization_config" not in json.load(fh)
        tuned = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
        start = _load(inputs, run_glue_entropy._gguf_dense(GGUF_NAME))
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.allclose(tuned.state_dict()[name], start.state_dict()[name])


def _load(inputs, extra):
    return AutoModelForSequenceClassification.from_pretrained(
        inputs["model"], gguf_file=GGUF_NAME, num_labels=3, **extra
    )


def test_script_loads_gguf_dense_and_trainable(inputs, tmp_path):
    """The script's load: a plain float model the Trainer accepts, set up as a decoder."""
    model_args = run_glue_entropy.ModelArguments(model_name_or_path=inputs["model"], gguf_file=GGUF_NAME)
    ent_args = run_glue_entropy.EntropyArguments(peft="none")
    model, tokenizer, decoder = run_glue_entropy.load_model_and_tokenizer(model_args, ent_args)
    assert decoder and tokenizer.padding_side == "left"
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype.is_floating_point and p.requires_grad for p in model.parameters())
    transformers.Trainer(model=model, args=_trainer_args(tmp_path))  # no "quantized" refusal


def _trainer_args(out):
    return transformers.TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[])


def test_saved_tokenizer_keeps_left_padding(inputs, tmp_path):
    # The run folder's tokenizer is what a reloaded run is scored with: it must pad on the left too.
    model_args = run_glue_entropy.ModelArguments(model_name_or_path=inputs["model"], gguf_file=GGUF_NAME)
    _, tokenizer, _ = run_glue_entropy.load_model_and_tokenizer(
        model_args, run_glue_entropy.EntropyArguments(peft="none")
    )
    tokenizer.save_pretrained(str(tmp_path))  # what the Trainer does with it at the end of a run
    assert AutoTokenizer.from_pretrained(str(tmp_path)).padding_side == "left"


@pytest.mark.skipif(
    not hasattr(transformers, "GgufConfig"),
    reason="transformers without GgufConfig (4.x) dequantises GGUF files and does not mark them quantized",
)
def test_plain_gguf_load_is_quantized_and_refused_by_the_trainer(inputs, tmp_path):
    """Why `_gguf_dense` exists: without it transformers 5 marks the model quantized, and the
    Trainer will not fine-tune it (whether or not adapters are added)."""
    model = _load(inputs, {})
    assert model.is_quantized and model.hf_quantizer is not None and not model.hf_quantizer.is_trainable
    with pytest.raises(ValueError, match="quantized"):
        transformers.Trainer(model=model, args=_trainer_args(tmp_path))
    dense = _load(inputs, run_glue_entropy._gguf_dense(GGUF_NAME))
    assert not dense.is_quantized and getattr(dense, "hf_quantizer", None) is None
    # Dequantised the same way: the dense load holds the same weights as the quantized-marked one.
    torch.testing.assert_close(dense.model.embed_tokens.weight, model.model.embed_tokens.weight)
    torch.testing.assert_close(dense.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
