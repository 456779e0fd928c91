"""Instruments at tracking points: each value against an independent computation, storage, resume, no disturbance."""

import copy
import inspect
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny import args, no_dropout, setup, validation_copy
from transformers import Trainer, TrainerCallback

from hf_entropy_callback import AnnotationEntropyCallback, ClassWeightedTrainer, EntropyTracker, load_run
from hf_entropy_callback.entropy import CATEGORIES
from hf_entropy_callback.instruments import (
    InstrumentLoss,
    linear_cka,
    parse_instruments,
    readout_attention_entropy,
    stratified_sample,
)
from hf_entropy_callback.instruments import gradients as gradients_module
from hf_entropy_callback.instruments.drift import readout_index
from hf_entropy_callback.peft_setup import apply_peft
from hf_entropy_callback.runs import (
    INSTRUMENT_COLUMNS,
    INSTRUMENT_EXAMPLE_COLUMNS,
    INSTRUMENT_REFERENCE_FILE,
    RunFormatError,
    write_run,
)
from hf_entropy_callback.testing import TINY_ARCHS

ALL = ["grad_alignment", "grad_norms", "drift"]
WEIGHTS = (0.5, 2.0, 1.25)


def _inputs(model, tok, premise, hypothesis):
    """One example, unpadded, with only the inputs the model's forward names."""
    enc = tok(premise, hypothesis, return_tensors="pt")
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(target.forward).parameters
    return {k: v for k, v in enc.items() if k in params}


def _direct_grad(model, tok, raw, i, kind="class_weighted_ce"):
    """Flat float64 gradient of example i's loss over the trainable parameters: one unpadded backward pass."""
    logits = model(**_inputs(model, tok, raw["premise"][i], raw["hypothesis"][i])).logits.float()
    y = torch.tensor([raw["label"][i]])
    if kind == "soft_kl":
        q = torch.tensor(raw["label_counts"][i], dtype=torch.float64)
        q = q / q.sum()
        logp = F.log_softmax(logits.double(), -1)[0]
        nz = q > 0
        loss = (q[nz] * (torch.log(q[nz]) - logp[nz])).sum()
    else:
        loss = F.cross_entropy(logits, y) * (WEIGHTS[int(y)] if kind == "class_weighted_ce" else 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)]
    )


def _loss(kind):
    return {"kind": kind, "class_weights": WEIGHTS} if kind == "class_weighted_ce" else kind


def _rows(run, quantity, **match):
    frame = run.instruments[run.instruments["quantity"] == quantity]
    for k, v in match.items():
        frame = frame[frame[k] == v]
    return frame


# ---- gradient alignment -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,kind", [("none", "class_weighted_ce"), ("lora", "class_weighted_ce"), ("lora", "soft_kl")]
)
def test_alignment_and_group_norms_match_direct_autograd(method, kind):
    tok, model, raw, _ = setup("bert", n=30)
    model = apply_peft(model, method).eval()
    tracker = EntropyTracker(
        {"train": raw},
        tok,
        batch_size=8,
        instruments=["grad_alignment"],
        instrument_sample_per_category=None,
        instrument_loss=_loss(kind),
    )
    tracker.track(model, 0, 0.0, "step0")
    run = tracker.to_run()
    cats = tracker.sets["train"].categories
    assert set(cats) == set(CATEGORIES)
    sums = {c: sum(_direct_grad(model, tok, raw, i, kind) for i in np.flatnonzero(cats == c)) for c in CATEGORIES}
    for a, b in (("clean", "contested"), ("clean", "ambiguous"), ("ambiguous", "contested")):
        want = float(torch.dot(sums[a], sums[b]) / (sums[a].norm() * sums[b].norm()))
        got = _rows(run, "cosine", group=f"{a}~{b}")["value"].item()
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (a, b)
    for c in CATEGORIES:
        want = float(sums[c].norm()) / int((cats == c).sum())  # the norm of the category's mean gradient
        assert _rows(run, "group_grad_norm", group=c)["value"].item() == pytest.approx(want, rel=1e-4)
    assert run.config["instruments"]["loss"] == kind


# ---- per-example gradient norms ---------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", ["none", "lora"])
def test_per_example_norms_match_single_example_backward(arch, method):
    tok, model, raw, _ = setup(arch, n=30)
    model = apply_peft(model, method).eval()
    tracker = EntropyTracker(
        {"train": raw},
        tok,
        batch_size=8,
        instruments=["grad_norms"],
        instrument_sample_per_category=3,
        instrument_loss=_loss("class_weighted_ce"),
    )
    tracker.track(model, 0, 0.0, "step0")
    run = tracker.to_run()
    ex = run.instrument_examples
    assert len(ex) == 9 and ex["example_id"].is_unique and set(ex["set"]) == {"train"}
    for _, row in ex.iterrows():
        assert row["example_id"] == raw["uid"][row["index"]]
        want = float(_direct_grad(model, tok, raw, int(row["index"])).norm())
        assert row["value"] == pytest.approx(want, rel=1e-4), row["example_id"]
    # vectorised where the model allows (the strategy is checked against single-example passes)
    assert run.config["instruments"]["per_example_gradients"] in ("vmap_4d_mask", "vmap_2d_mask")
    cats = tracker.sets["train"].categories[ex["index"].to_numpy()]
    for c in CATEGORIES:
        vals = ex["value"].to_numpy()[cats == c]
        assert _rows(run, "grad_norm_mean", group=c)["value"].item() == pytest.approx(vals.mean())
        assert _rows(run, "grad_norm_median", group=c)["value"].item() == pytest.approx(np.median(vals))


def test_per_example_loop_when_vmap_fails(monkeypatch):
    """A model vmap cannot trace is measured one example at a time, with the same values."""
    tok, model, raw, _ = setup("qwen2", n=30)
    model.eval()

    def untraceable(*a, **k):
        raise RuntimeError("vmap: data-dependent control flow")

    monkeypatch.setattr(gradients_module, "_vmap_grads", untraceable)
    tracker = EntropyTracker(
        {"train": raw},
        tok,
        batch_size=8,
        instruments=["grad_norms", "grad_alignment"],
        instrument_sample_per_category=2,
        instrument_loss="ce",
    )
    tracker.track(model, 0, 0.0, "step0")
    run = tracker.to_run()
    assert run.config["instruments"]["per_example_gradients"] == "loop"
    for _, row in run.instrument_examples.iterrows():
        want = float(_direct_grad(model, tok, raw, int(row["index"]), "ce").norm())
        assert row["value"] == pytest.approx(want, rel=1e-4)
    assert len(_rows(run, "cosine")) == 3 and np.isfinite(_rows(run, "cosine")["value"]).all()


# ---- drift ------------------------------------------------------------------------------------


def test_linear_cka_identical_rotated_and_independent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    assert linear_cka(x, x) == pytest.approx(1.0)
    rotation = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    assert linear_cka(x, 5.0 * x @ rotation + 3.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert linear_cka(x, rng.normal(size=(400, 16))) < 0.1  # independent: near 0 (bias ~ d / n)
    wide = rng.normal(size=(20, 64))  # fewer examples than features: the Gram-matrix form
    assert linear_cka(wide, wide) == pytest.approx(1.0)
    assert math.isnan(linear_cka(np.ones((10, 3)), x[:10]))  # no variance


def test_readout_index_first_token_for_encoders_last_for_decoders():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert readout_index(mask, decoder=False).tolist() == [0, 2, 0]
    assert readout_index(mask, decoder=True).tolist() == [2, 4, 4]


def _hand_attention_entropy(model, tok, raw, positions):
    """Per layer: mean over examples and heads of the [CLS] row's entropy, from the q / k projections of ONE
    padded batch (padding keys left out by hand)."""
    bert = model.bert
    captured = {}
    hooks = []
    for i, layer in enumerate(bert.encoder.layer):
        for part in ("query", "key"):
            mod = getattr(layer.attention.self, part)
            hooks.append(mod.register_forward_hook(lambda m, a, out, key=(i, part): captured.__setitem__(key, out)))
    batch = tok(
        [raw["premise"][i] for i in positions],
        [raw["hypothesis"][i] for i in positions],
        padding=True,
        return_tensors="pt",
    )
    assert not bool(batch["attention_mask"].all())  # the batch has padding
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    heads = model.config.num_attention_heads
    per_layer = []
    for i in range(len(bert.encoder.layer)):
        q, k = captured[(i, "query")], captured[(i, "key")]
        b, t, width = q.shape
        dh = width // heads
        q = q.view(b, t, heads, dh).transpose(1, 2).double()
        k = k.view(b, t, heads, dh).transpose(1, 2).double()
        values = []
        for row in range(b):
            n = int(batch["attention_mask"][row].sum())  # right padding: the first n tokens are real
            scores = q[row, :, 0, :] @ k[row, :, :n, :].transpose(-1, -2) / math.sqrt(dh)  # (heads, n)
            p = torch.softmax(scores, -1)
            values.append(float((-(p * torch.log(p)).sum(-1)).mean()))
        per_layer.append(np.mean(values))
    return per_layer


def test_attention_entropy_by_hand_with_padding_sdpa_and_eager():
    tok, model, raw, _ = setup("bert", n=30)
    model.eval()
    assert model.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    got = {}
    for name, m in (("sdpa", model), ("eager", eager)):
        tracker = EntropyTracker(
            {"train": raw}, tok, batch_size=8, instruments=["drift"], instrument_sample_per_category=4
        )
        tracker.track(m, 0, 0.0, "step0")
        run = tracker.to_run()
        got[name] = _rows(run, "attention_entropy").sort_values("component")["value"].to_numpy()
        positions = tracker.instruments.sample
    # the training model's own implementation is back after the pass
    assert model.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    assert "restored" in run.config["instruments"]["attention"] or "eager" in run.config["instruments"]["attention"]
    hand = _hand_attention_entropy(model, tok, raw, positions)
    np.testing.assert_allclose(got["sdpa"], hand, rtol=1e-5)
    np.testing.assert_allclose(got["eager"], got["sdpa"], rtol=1e-6)


def test_attention_entropy_decoder_sdpa_equals_eager():
    tok, model, raw, _ = setup("qwen2", n=30)
    model.eval()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    values = []
    for m in (model, eager):
        tracker = EntropyTracker(
            {"train": raw}, tok, batch_size=8, instruments=["drift"], instrument_sample_per_category=4
        )
        tracker.track(m, 0, 0.0, "step0")
        values.append(_rows(tracker.to_run(), "attention_entropy").sort_values("component")["value"].to_numpy())
    assert model.config._attn_implementation == "sdpa"
    assert len(values[0]) == model.config.num_hidden_layers
    np.testing.assert_allclose(values[0], values[1], rtol=1e-5)


def test_readout_attention_entropy_leaves_padding_out():
    # two keys of weight 1/2 and a padded key: entropy ln 2 whatever weight the padding got
    att = torch.tensor([[[[0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]]]])
    mask = torch.tensor([[1, 1, 0]])
    assert readout_attention_entropy([att], mask, decoder=False)[0, 0].item() == pytest.approx(math.log(2))


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_update_norms_full_fine_tuning_equal_w_minus_w0():
    tok, model, raw, _ = setup("bert", n=30)
    model.eval()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker = EntropyTracker({"train": raw}, tok, batch_size=8, instruments=["drift"], instrument_sample_per_category=4)
    tracker.track(model, 0, 0.0, "step0")
    _perturb(model)
    tracker.track(model, 5, 1.0, "final")
    run = tracker.to_run()
    first = _rows(run, "update_norm", point=0)
    assert (first["value"] == 0).all()
    last = _rows(run, "update_norm", point=1).set_index("component")["value"]
    by_module = {}
    for n, p in model.named_parameters():
        by_module.setdefault(n.rsplit(".", 1)[0], []).append(float((p.detach() - w0[n]).double().pow(2).sum()))
    assert set(last.index) == set(by_module)
    for module, parts in by_module.items():
        assert last[module] == pytest.approx(math.sqrt(sum(parts)), rel=1e-6)
    total = math.sqrt(sum(sum(v) for v in by_module.values()))
    assert _rows(run, "update_norm_total", point=1)["value"].item() == pytest.approx(total, rel=1e-6)
    # CKA to the first point: 1 there, below 1 once the weights moved
    assert np.allclose(_rows(run, "cka", point=0)["value"], 1.0)
    assert (_rows(run, "cka", point=1)["value"] < 1.0 - 1e-6).any()


def test_update_norms_lora_are_of_b_a_scaling():
    tok, model, raw, _ = setup("bert", n=30)
    model = apply_peft(model, "lora", r=4, lora_alpha=8).eval()
    head0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    tracker = EntropyTracker({"train": raw}, tok, batch_size=8, instruments=["drift"], instrument_sample_per_category=4)
    tracker.track(model, 0, 0.0, "step0")
    _perturb(model)
    tracker.track(model, 5, 1.0, "final")
    last = _rows(tracker.to_run(), "update_norm", point=1).set_index("component")["value"]
    lora_modules = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert lora_modules
    for name in lora_modules:
        m = model.get_submodule(name)
        delta = m.lora_B["default"].weight.detach().double() @ m.lora_A["default"].weight.detach().double() * (8 / 4)
        assert last[name] == pytest.approx(float(delta.norm()), rel=1e-6)
    # the trained head (peft's modules_to_save copy) by W - W0; no row for the LoRA factors themselves
    for n, w in head0.items():
        owner = n.rsplit(".", 1)[0]
        assert owner in last.index
    assert not any(".lora_A" in c or ".lora_B" in c for c in last.index)
    assert set(last.index) == set(lora_modules) | {n.rsplit(".", 1)[0] for n in head0}


# ---- sample, names, loss ----------------------------------------------------------------------


def test_sample_is_stratified_seeded_and_fixed():
    cats = np.array(["clean"] * 50 + ["ambiguous"] * 7 + ["contested"] * 20)
    a = stratified_sample(cats, 10, seed=3)
    assert (stratified_sample(cats, 10, seed=3) == a).all()
    assert not (stratified_sample(cats, 10, seed=4) == a).all()
    counts = pd.Series(cats[a]).value_counts()
    assert counts["clean"] == 10 and counts["contested"] == 10 and counts["ambiguous"] == 7
    with pytest.raises(ValueError, match="integer >= 1"):
        stratified_sample(cats, 0)


def test_names_are_checked():
    assert parse_instruments(["drift", "grad_alignment,grad_norms"]) == tuple(ALL)
    with pytest.raises(ValueError, match="unknown instrument"):
        parse_instruments("grad_alignment,attention")
    tok, model, raw, _ = setup("bert", n=10)
    with pytest.raises(ValueError, match="unknown instrument"):
        AnnotationEntropyCallback(raw, instruments=["gradients"])
    with pytest.raises(ValueError, match="sample_per_category"):
        EntropyTracker(raw, tok, instruments="drift", instrument_sample_per_category=0)


@pytest.mark.parametrize(
    "trainer_kw,expected",
    [
        ({}, "class_weighted_ce"),
        ({"loss_type": "soft_kl"}, "soft_kl"),
        ({"use_class_weights": False}, "ce"),
        (None, "ce"),
    ],
)
def test_callback_reads_the_loss_from_the_trainer(tmp_path, trainer_kw, expected):
    tok, model, raw, train = setup("bert", n=24)
    cb = AnnotationEntropyCallback(raw, track_every=0, instruments=["grad_alignment"], instrument_sample_per_category=2)
    if trainer_kw is None:
        trainer = Trainer(
            model=model, args=args(tmp_path, max_steps=1), train_dataset=train, processing_class=tok, callbacks=[cb]
        )
    else:
        if trainer_kw.get("loss_type") == "soft_kl":
            train = train.add_column("label_counts", raw["label_counts"])
        trainer = ClassWeightedTrainer(
            model=model,
            args=args(tmp_path, max_steps=1),
            train_dataset=train,
            processing_class=tok,
            callbacks=[cb],
            **trainer_kw,
        )
    trainer.train()
    described = load_run(str(tmp_path)).config["instruments"]
    assert described["loss"] == expected
    if expected == "class_weighted_ce":
        np.testing.assert_allclose(described["class_weights"], trainer.class_weights.numpy())
    assert InstrumentLoss.coerce(described) == InstrumentLoss.coerce(
        _loss(expected)
        if expected != "class_weighted_ce"
        else {"kind": expected, "class_weights": trainer.class_weights.tolist()}
    )


# ---- training is not disturbed ----------------------------------------------------------------


class Recorder(TrainerCallback):
    """The gradients before every optimizer step (these must not change either)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in model.parameters() if p.grad is not None])


def _run_with(tmp_path, arch, method, instruments):
    # Dropout ON (LoRA dropout too) and SDPA: any random number drawn or any attention setting left behind by
    # the instruments would change the dropout masks, the gradients and so the weights.
    tok, model, raw, train = setup(arch, n=40)
    model = apply_peft(model, method, r=4, lora_dropout=0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    rec = Recorder()
    cb = AnnotationEntropyCallback(
        {"train": raw, "validation": validation_copy(raw, 6)},
        track_every=2,
        batch_size=8,
        instruments=instruments,
        instrument_sample_per_category=3,
    )
    trainer = ClassWeightedTrainer(
        model=model,
        args=args(tmp_path, num_train_epochs=2, per_device_train_batch_size=8),
        train_dataset=train,
        processing_class=tok,
        callbacks=[rec, cb],
    )
    trainer.train()
    opt = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}, rec.grads, opt, model


@pytest.mark.parametrize("arch,method", [("bert", "none"), ("qwen2", "lora")])
def test_instruments_do_not_disturb_training(tmp_path, arch, method):
    w_off, g_off, opt_off, _ = _run_with(tmp_path / "off", arch, method, None)
    w_on, g_on, opt_on, model = _run_with(tmp_path / "on", arch, method, ALL)
    assert len(load_run(str(tmp_path / "on")).instruments) > 0
    assert w_off.keys() == w_on.keys()
    for n in w_off:
        assert torch.equal(w_off[n], w_on[n]), n  # bit for bit
    assert len(g_off) == len(g_on)
    for a, b in zip(g_off, g_on):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(opt_off[k], opt_on[k]) for k in opt_off)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.config._attn_implementation == "sdpa"


def test_track_leaves_grads_mode_and_requires_grad_alone():
    tok, model, raw, _ = setup("bert", n=20)
    model = apply_peft(model, "lora")
    model.train()
    marks = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = marks[n].clone()
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.random.get_rng_state()
    tracker = EntropyTracker(raw, tok, batch_size=8, instruments=ALL, instrument_sample_per_category=2)
    tracker.track(model, 0, 0.0, "step0")
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(p.grad, marks[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(torch.random.get_rng_state(), rng)


# ---- storage, resume ----------------------------------------------------------------------------


def test_run_without_instruments_loads_empty_tables(tmp_path):
    tok, model, raw, _ = setup("bert", n=12)
    tracker = EntropyTracker(raw, tok, batch_size=8)
    tracker.track(model, 0, 0.0, "step0")
    tracker.save(str(tmp_path / "entropy_tracking"))
    assert not os.path.exists(tmp_path / "entropy_tracking" / "instruments.parquet")
    run = load_run(str(tmp_path))
    assert tuple(run.instruments.columns) == INSTRUMENT_COLUMNS and len(run.instruments) == 0
    assert tuple(run.instrument_examples.columns) == INSTRUMENT_EXAMPLE_COLUMNS and len(run.instrument_examples) == 0
    assert run.run_config.instruments is None


def _instrumented_run(tmp_path):
    tok, model, raw, _ = setup("bert", n=20)
    tracker = EntropyTracker(raw, tok, batch_size=8, instruments=ALL, instrument_sample_per_category=2)
    tracker.track(model, 0, 0.0, "step0")
    _perturb(model)
    tracker.track(model, 3, 1.0, "final")
    path = tracker.save(str(tmp_path / "entropy_tracking"))
    return tracker, path


def test_storage_format_and_checks(tmp_path):
    tracker, path = _instrumented_run(tmp_path)
    run = load_run(path)
    ins, ex = run.instruments, run.instrument_examples
    assert tuple(ins.columns) == INSTRUMENT_COLUMNS and tuple(ex.columns) == INSTRUMENT_EXAMPLE_COLUMNS
    assert ins["point"].dtype == np.int64 and ins["value"].dtype == np.float64 and ex["index"].dtype == np.int64
    assert set(ins["instrument"]) == set(ALL)
    assert set(ins["quantity"]) == {
        "cosine",
        "group_grad_norm",
        "grad_norm_mean",
        "grad_norm_median",
        "attention_entropy",
        "cka",
        "update_norm",
        "update_norm_total",
    }
    assert set(_rows(run, "cosine")["group"]) == {"clean~contested", "clean~ambiguous", "ambiguous~contested"}
    assert set(_rows(run, "cka")["component"]) == {"0", "1", "2"}  # embeddings output + 2 layers
    assert set(_rows(run, "attention_entropy")["component"]) == {"0", "1"}
    assert (ins["step"].to_numpy() == run.points["step"].to_numpy()[ins["point"]]).all()
    assert set(ex["quantity"]) == {"grad_norm"} and len(ex) == 2 * 6
    described = run.config["instruments"]
    assert described["names"] == ALL and described["sample_per_category"] == 2 and described["seed"] == 0
    assert described["loss"] == "ce" and "eager" in described["attention"]
    assert os.path.isfile(os.path.join(path, INSTRUMENT_REFERENCE_FILE))
    # a damaged file is reported with run and file
    with open(os.path.join(path, "instruments.parquet"), "r+b") as fh:
        fh.seek(40)
        fh.write(b"\x00" * 64)
    with pytest.raises(RunFormatError, match="instruments.parquet"):
        load_run(path)
    os.remove(os.path.join(path, "instruments.parquet"))
    with pytest.raises(RunFormatError, match="instruments.parquet is missing"):
        load_run(path)


def test_write_run_refuses_rows_of_another_step(tmp_path):
    tracker, path = _instrumented_run(tmp_path)
    run = load_run(path)
    bad = run.instruments.copy()
    bad.loc[0, "step"] = 99
    with pytest.raises(RunFormatError, match="step 99"):
        write_run(str(tmp_path / "x"), run.config, run.examples, run.points, run.logprobs, instruments=bad)


def test_custom_loop_state_dict_round_trip(tmp_path):
    tok, model, raw, _ = setup("bert", n=20)
    kw = dict(batch_size=8, instruments=ALL, instrument_sample_per_category=2)
    whole = EntropyTracker(raw, tok, **kw)
    for step in (0, 1, 2):
        whole.track(model, step, float(step), "interval")
        _perturb(model, step)
    # again: stop after the first point, continue from its state_dict in a new tracker
    tok, model2, raw, _ = setup("bert", n=20)
    first = EntropyTracker(raw, tok, **kw)
    first.track(model2, 0, 0.0, "interval")
    state = first.state_dict()
    second = EntropyTracker(raw, tok, **kw).prepare(model2)
    second.load_state_dict(state)
    _perturb(model2, 0)
    for step in (1, 2):
        second.track(model2, step, float(step), "interval")
        _perturb(model2, step)
    a, b = whole.to_run(), second.to_run()
    pd.testing.assert_frame_equal(a.instruments.drop(columns="value"), b.instruments.drop(columns="value"))
    np.testing.assert_allclose(a.instruments["value"], b.instruments["value"], rtol=1e-5, atol=1e-6)


class Crash(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated interruption")


def _trainer_run(out, method="none", extra=(), **kw):
    tok, model, raw, train = setup("bert", n=40)
    model = no_dropout(apply_peft(model, method, r=4))
    cb = AnnotationEntropyCallback(
        {"train": raw, "validation": validation_copy(raw, 6)},
        track_every=3,
        batch_size=8,
        instruments=ALL,
        instrument_sample_per_category=3,
    )
    trainer = ClassWeightedTrainer(
        model=model,
        args=args(out, num_train_epochs=2, save_strategy="steps", save_steps=4, **kw),
        train_dataset=train,
        processing_class=tok,
        callbacks=[*extra, cb],
    )
    return trainer


@pytest.mark.parametrize("method", ["none", "lora"])
def test_resume_keeps_instrument_history(tmp_path, method):
    _trainer_run(tmp_path / "full", method).train()
    with pytest.raises(KeyboardInterrupt):
        _trainer_run(tmp_path / "cut", method, extra=[Crash(at=7)]).train()
    ckpt = tmp_path / "cut" / "checkpoint-4" / "entropy_tracking"
    assert os.path.isfile(ckpt / INSTRUMENT_REFERENCE_FILE)
    _trainer_run(tmp_path / "cut", method).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
    full, resumed = load_run(str(tmp_path / "full")), load_run(str(tmp_path / "cut"))
    assert not os.path.exists(os.path.join(full.path, INSTRUMENT_REFERENCE_FILE))  # only checkpoints carry it
    for a, b in ((full.instruments, resumed.instruments), (full.instrument_examples, resumed.instrument_examples)):
        pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
        np.testing.assert_allclose(a["value"], b["value"], rtol=1e-4, atol=1e-6)
    assert resumed.instruments["point"].max() == len(resumed.points) - 1
    # without the reference, the drift instrument cannot continue: a clear error, not silent values
    os.remove(ckpt / INSTRUMENT_REFERENCE_FILE)
    with pytest.raises(RunFormatError, match=INSTRUMENT_REFERENCE_FILE):
        _trainer_run(tmp_path / "cut", method).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
