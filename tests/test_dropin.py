"""The callback and the tracker dropped into other people's code: label orders, the Trainer's own logs,
validated inputs, any training loop, any number of classes."""

import glob
import logging
import math
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import args, no_dropout, setup
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback

from hf_entropy_callback import (
    AnnotationEntropyCallback,
    EntropyTracker,
    LabelSpaceError,
    annotation_entropy,
    category_thresholds,
    load_chaosnli,
    load_run,
)
from hf_entropy_callback.data import split_chaosnli
from hf_entropy_callback.dynamics import run_summary
from hf_entropy_callback.testing import make_tokenizer, tiny_model, write_synthetic_chaosnli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHABETICAL = ["contradiction", "entailment", "neutral"]  # transformers' run_glue.py sorts label names


def _with_names(model, names):
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    return model


# ---- label spaces --------------------------------------------------------------------------------


def test_alphabetical_model_is_tracked_in_its_own_order(tmp_path):
    """A run_glue-style model (contradiction=0) tracked with load_chaosnli output (entailment=0):
    the recorded accuracy is the Trainer's own evaluation accuracy on the same examples."""
    split = split_chaosnli(load_chaosnli(write_synthetic_chaosnli(str(tmp_path / "c.jsonl"), n=160)), 0.25, seed=0)
    tok = make_tokenizer()
    model = _with_names(no_dropout(tiny_model("bert", tok, seed=1)), ALPHABETICAL)
    nli = split["train"].features["label"].names
    remap = {i: ALPHABETICAL.index(n) for i, n in enumerate(nli)}

    def encode(b):
        return {**tok(b["premise"], b["hypothesis"], truncation=True), "labels": [remap[y] for y in b["label"]]}

    cols = split["train"].column_names
    train, val = (split[s].map(encode, batched=True, remove_columns=cols) for s in ("train", "validation"))
    cb = AnnotationEntropyCallback({"train": split["train"], "validation": split["validation"]}, track_every=5)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, num_train_epochs=5, learning_rate=3e-3, per_device_train_batch_size=16),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tok,
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
        callbacks=[cb],
    )
    trainer.train()
    evaluated = trainer.evaluate()["eval_accuracy"]
    run = load_run(str(tmp_path))
    val_ex = run.set_examples("validation")
    recorded = float((run.logprobs["validation"][-1].argmax(-1) == val_ex["label"]).mean())
    assert recorded == pytest.approx(evaluated, abs=1e-12)
    assert run_summary(run)["validation_accuracy"] == pytest.approx(evaluated, abs=1e-12)
    assert run.config["label_names"] == ALPHABETICAL
    # stored labels and counts are in the model's ids; reading them in ChaosNLI's order would be wrong
    np.testing.assert_array_equal(val_ex["label"], [remap[y] for y in split["validation"]["label"]])
    counts = np.stack(val_ex["label_counts"])
    orig = np.asarray(split["validation"]["label_counts"])
    np.testing.assert_array_equal(counts[:, [ALPHABETICAL.index(n) for n in nli]], orig)
    unremapped = float((run.logprobs["validation"][-1].argmax(-1) == np.asarray(split["validation"]["label"])).mean())
    assert evaluated > 0.6 and abs(unremapped - evaluated) > 0.2


def test_model_with_other_label_names_is_refused(tmp_path):
    tok, model, raw, train = setup("bert", n=10)
    raw = raw.cast_column("label", datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]))
    _with_names(model, ["negative", "neutral", "positive"])
    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=1),
        train_dataset=train,
        processing_class=tok,
        callbacks=[AnnotationEntropyCallback(raw)],
    )
    with pytest.raises(
        LabelSpaceError,
        match=r"\['entailment', 'neutral', 'contradiction'\] are not the model's "
        r"labels \['negative', 'neutral', 'positive'\]",
    ):
        trainer.train()
    assert not os.path.exists(tmp_path / "entropy_tracking")


def test_label_names_any_case_and_generic_models(caplog):
    tok, model, raw, _ = setup("bert", n=10)
    _with_names(model, ["ENTAILMENT", "Neutral", "contradiction"])
    tracker = EntropyTracker(raw, tok, label_names=["entailment", "neutral", "Contradiction"]).prepare(model)
    assert tracker.label_space.permutation is None and tracker.config["label_names"] == [
        "ENTAILMENT",
        "Neutral",
        "contradiction",
    ]
    # generic LABEL_k names: the tracked order is used, with a warning that says so
    caplog.set_level(logging.WARNING, logger="hf_entropy_callback.tracker")
    _, generic, raw, _ = setup("bert", n=10)
    EntropyTracker(raw, tok, label_names=["a", "b", "c"]).prepare(generic)
    assert any("generic" in r.getMessage() for r in caplog.records)
    # labels given as names are mapped through the label names
    named = raw.map(
        lambda r: {"label": ["entailment", "neutral", "contradiction"][r["label"]].upper()}, remove_columns=["label"]
    )
    t = EntropyTracker(named, tok, label_names=["entailment", "neutral", "contradiction"]).prepare(model)
    np.testing.assert_array_equal(t.sets["train"].labels, raw["label"])
    with pytest.raises(LabelSpaceError, match="2 classes"):
        EntropyTracker(raw, tok, label_names=["a", "b"]).prepare(generic)


# ---- the Trainer's own logs ----------------------------------------------------------------------


def _log_steps(history, key):
    return [h["step"] for h in history if key in h]


def test_trainer_log_entries_are_untouched(tmp_path):
    """logging_steps == track_every: the Trainer's loss entries appear exactly where they would without
    the callback, the tracking metrics too, and TensorBoard has both curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kw = dict(logging_strategy="steps", logging_steps=2, max_steps=12, report_to=["tensorboard"])
    tok, model, raw, train = setup("bert", n=50)
    plain = Trainer(model=model, args=args(tmp_path / "plain", **kw), train_dataset=train, processing_class=tok)
    plain.train()
    tok, model, raw, train = setup("bert", n=50)
    cb = AnnotationEntropyCallback(raw, track_every=2)
    tracked = Trainer(
        model=model, args=args(tmp_path / "tracked", **kw), train_dataset=train, processing_class=tok, callbacks=[cb]
    )
    tracked.train()
    for key in ("loss", "grad_norm", "learning_rate"):
        assert (
            _log_steps(tracked.state.log_history, key)
            == _log_steps(plain.state.log_history, key)
            == list(range(2, 13, 2))
        )
    points = [0, 2, 4, 6, 7, 8, 10, 12]  # every 2 steps, and the epoch end at step 7
    assert _log_steps(tracked.state.log_history, "entropy/spearman_rho") == points
    events = glob.glob(str(tmp_path / "tracked" / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(2, 13, 2))
    assert [e.step for e in acc.Scalars("train/entropy/train_loss")] == points
    assert "train/entropy/spearman_rho" in tags


def test_explicit_trainer_argument(tmp_path):
    tok, model, raw, train = setup("bert", n=20)
    cb = AnnotationEntropyCallback(raw, track_every=2)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=4, logging_strategy="steps", logging_steps=2),
        train_dataset=train,
        processing_class=tok,
        callbacks=[cb],
    )
    cb.set_trainer(trainer)
    trainer.train()
    assert _log_steps(trainer.state.log_history, "loss") == [2, 4]
    assert _log_steps(trainer.state.log_history, "entropy/train_loss") == [0, 2, 3, 4]  # 3: the epoch end


def test_options_are_keyword_only():
    tok, model, raw, _ = setup("bert", n=4)
    with pytest.raises(TypeError, match="takes its options as keywords"):
        AnnotationEntropyCallback(raw, tok, 10)


# ---- validated inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transform, message",
    [
        (lambda h, c: h / math.log(2), "in bits"),
        (lambda h, c: np.where(np.arange(len(h)) == 3, -0.1, h), "disagrees with label_counts"),
        (lambda h, c: np.where(np.arange(len(h)) == 3, np.inf, h), "entropy must be finite"),
        (lambda h, c: h + 0.05, "disagrees with label_counts"),
    ],
)
def test_entropy_is_checked_against_label_counts(transform, message):
    tok, model, raw, _ = setup("bert", n=12)
    h = np.asarray(raw["entropy"])
    bad = raw.remove_columns(["entropy"]).add_column("entropy", transform(h, raw["label_counts"]).tolist())
    with pytest.raises(ValueError, match=message):
        EntropyTracker(bad, tok).prepare(model)


def test_entropy_without_counts_is_range_checked():
    tok, model, raw, _ = setup("bert", n=12)
    no_counts = raw.remove_columns(["label_counts"])
    bits = no_counts.remove_columns(["entropy"]).add_column("entropy", [1.5] + [0.1] * 11)
    with pytest.raises(ValueError, match=r"outside \[0, ln 3\].*suggest entropy in bits"):
        EntropyTracker(bits, tok).prepare(model)
    neg = no_counts.remove_columns(["entropy"]).add_column("entropy", [-0.2] + [0.1] * 11)
    with pytest.raises(ValueError, match="example 'syn0-0' has entropy -0.2"):
        EntropyTracker(neg, tok).prepare(model)


def test_other_bad_inputs():
    tok, model, raw, _ = setup("bert", n=12)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        EntropyTracker(raw, tok, batch_size=0)
    with pytest.raises(ValueError, match="both hold example id 'syn0-0'"):
        EntropyTracker({"train": raw, "validation": raw.select(range(3))}, tok).prepare(model)
    with pytest.raises(ValueError, match="label_counts have 3 classes per example but the model has 4"):
        EntropyTracker(raw, tok).prepare(tiny_model("bert", tok, num_labels=4))

    class NoLogits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return (self.inner(input_ids=input_ids, attention_mask=attention_mask).logits,)

    tracker = EntropyTracker(raw, tok, label_names=["entailment", "neutral", "contradiction"])
    with pytest.raises(TypeError, match="the model's output has no `logits`"):
        tracker.track(NoLogits(model), 0)


def test_model_without_config_and_wrapped_models():
    """A bare nn.Module (no .config) works once label names are given; DataParallel / compiled-style
    wrappers are unwrapped and give the same numbers."""
    tok, model, raw, _ = setup("bert", n=12)
    model.eval()

    class Bare(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            return {
                "logits": self.inner(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).logits
            }

    ref = EntropyTracker(raw, tok).prepare(model)
    ref.track(model, 0)
    bare = EntropyTracker(raw, tok, label_names=["e", "n", "c"])
    bare.track(Bare(model), 0)
    wrapped = EntropyTracker(raw, tok)
    wrapped.track(torch.nn.DataParallel(model), 0)
    np.testing.assert_allclose(bare.logprobs["train"][0], ref.logprobs["train"][0], atol=1e-6)
    np.testing.assert_allclose(wrapped.logprobs["train"][0], ref.logprobs["train"][0], atol=1e-6)
    with pytest.raises(ValueError, match="no `config.num_labels`"):
        EntropyTracker(raw.remove_columns(["label_counts"]), tok).prepare(Bare(model))


# ---- tracked inputs match training ---------------------------------------------------------------


def test_max_length_and_preprocess_follow_training():
    tok, model, raw, _ = setup("qwen2", n=12)
    default = EntropyTracker(raw, tok).prepare(model)
    assert default.config["max_length"] == tok.model_max_length
    short = EntropyTracker(raw, tok, max_length=6).prepare(model)
    assert short.sets["train"].token_length.max() == 6 and short.config["max_length"] == 6

    def prompt(ex):  # a decoder's prompt template, one text per example
        return f"{ex['premise']} . is it that {ex['hypothesis']} ?"

    templ = EntropyTracker(raw, tok, preprocess=prompt).prepare(model)
    expected = [tok(prompt(ex), truncation=True)["input_ids"] for ex in raw]
    assert [f["input_ids"] for f in templ.sets["train"].features] == expected
    # or the user's own tokenization, returned as model inputs
    own = EntropyTracker(raw, tok, preprocess=lambda ex: tok(ex["premise"], truncation=True, max_length=4)).prepare(
        model
    )
    assert own.sets["train"].token_length.max() == 4
    # the left padding of decoders is kept: the batched pass equals one example at a time
    own.track(model.eval(), 0)
    direct = []
    with torch.no_grad():
        for ex in raw:
            enc = tok(ex["premise"], truncation=True, max_length=4, return_tensors="pt")
            direct.append(F.log_softmax(model(**enc).logits.float(), -1)[0].numpy())
    np.testing.assert_allclose(own.logprobs["train"][0], np.stack(direct), atol=2e-5)


# ---- any loop --------------------------------------------------------------------------------------


def test_plain_pytorch_loop_matches_the_callback(tmp_path):
    """Full-batch SGD, same initial weights: a hand-written loop with the tracker and a Trainer with the
    callback record the same trajectory."""
    kw = dict(
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        per_device_train_batch_size=40,
        num_train_epochs=6,
    )
    tok, model, raw, train = setup("bert", n=40)
    cb = AnnotationEntropyCallback(raw, track_every=2)
    Trainer(
        model=no_dropout(model),
        args=args(tmp_path / "trainer", **kw),
        train_dataset=train,
        processing_class=tok,
        callbacks=[cb],
    ).train()

    tok, model, raw, train = setup("bert", n=40)
    model = no_dropout(model)
    tracker = EntropyTracker(raw, tok, track_every=2)
    batch = tok.pad(
        [{k: train[i][k] for k in ("input_ids", "token_type_ids", "attention_mask")} for i in range(40)],
        return_tensors="pt",
    )
    labels = torch.tensor(train["label"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker.maybe_track(model, 0, 0.0)
    for step in range(1, 7):
        model.train()
        loss = F.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tracker.maybe_track(model, step, float(step), epoch_end=True, final=step == 6)
    tracker.save(str(tmp_path / "loop" / "entropy_tracking"))
    a, b = load_run(str(tmp_path / "trainer")), load_run(str(tmp_path / "loop"))
    assert a.points[["step", "reason"]].equals(b.points[["step", "reason"]])
    np.testing.assert_allclose(b.logprobs["train"], a.logprobs["train"], atol=1e-5)
    assert np.abs(a.logprobs["train"][-1] - a.logprobs["train"][0]).max() > 0.05

    # resume from the tracker's own state: points up to step 4, then the rest again
    resumed = EntropyTracker(raw, tok, track_every=2).prepare(model)
    resumed.load_state_dict(tracker.state_dict(), up_to_step=4)
    assert resumed.steps == [0, 1, 2, 3, 4]
    with pytest.raises(Exception, match="other examples"):
        other = EntropyTracker(raw.select(range(10)), tok).prepare(model)
        other.load_state_dict(tracker.state_dict())


def _run_example(script, out, *extra, nproc=1, port=29641):
    cmd = [sys.executable, os.path.join(ROOT, "examples", script), "--output_dir", str(out), *extra]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(port),
            *cmd[1:],
        ]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_accelerate_loop_example_two_processes_and_resume(tmp_path):
    one = _run_example("accelerate_loop.py", tmp_path / "one", "--no_dropout", "--cpu")
    assert "run directory written" in one
    _run_example("accelerate_loop.py", tmp_path / "two", "--no_dropout", "--cpu", nproc=2)
    _run_example("accelerate_loop.py", tmp_path / "cut", "--no_dropout", "--cpu", "--stop_after_epoch", "1")
    assert not os.path.exists(tmp_path / "cut" / "entropy_tracking")
    out = _run_example("accelerate_loop.py", tmp_path / "cut", "--no_dropout", "--cpu")
    assert "resumed after epoch 1" in out
    a, b, c = (load_run(str(tmp_path / d)) for d in ("one", "two", "cut"))
    assert a.points.equals(b.points) and a.points.equals(c.points)
    assert a.points["reason"].iloc[-1] == "epoch_end+final"
    for name in ("train", "validation"):
        np.testing.assert_allclose(b.logprobs[name], a.logprobs[name], atol=1e-5)  # 2 processes = 1 process
        np.testing.assert_allclose(c.logprobs[name], a.logprobs[name], atol=1e-6)  # resumed = uninterrupted
    assert run_summary(a)["validation_accuracy"] > 0.5


def test_trainer_example_runs(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import trainer_callback
    finally:
        sys.path.pop(0)
    summary = trainer_callback.main(["--output_dir", str(tmp_path), "--epochs", "1"])
    run = load_run(str(tmp_path))
    assert run.config["label_names"] == ALPHABETICAL and run.config["method"] == "full"
    assert summary["n_examples"] == len(run.set_examples("train"))


# ---- early stopping, run configuration -------------------------------------------------------------


class LastTrainedModel(TrainerCallback):
    """Logprobs of the model as trained at every epoch end (before any best-model reload)."""

    def __init__(self, tok, raw):
        self.tok, self.raw, self.seen = tok, raw, {}

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        tracker = EntropyTracker(self.raw, self.tok).prepare(model)
        tracker.track(model, 0)
        self.seen[state.global_step] = tracker.logprobs["train"][0]


def test_early_stopping_with_best_model_reload_records_the_trained_model(tmp_path):
    tok, model, raw, train = setup("bert", n=40)
    steps = iter(range(100))
    cb = AnnotationEntropyCallback(raw, track_every=0)
    capture = LastTrainedModel(tok, raw)
    trainer = Trainer(
        model=no_dropout(model),
        args=args(
            tmp_path,
            num_train_epochs=10,
            eval_strategy="epoch",
            save_strategy="epoch",
            learning_rate=5e-3,
            load_best_model_at_end=True,
            metric_for_best_model="score",
            greater_is_better=True,
        ),
        train_dataset=train,
        eval_dataset=train,
        processing_class=tok,
        # a score that only gets worse: the first evaluation is the best, training stops after 2 more
        compute_metrics=lambda p: {"score": -float(next(steps))},
        callbacks=[capture, EarlyStoppingCallback(early_stopping_patience=2), cb],
    )
    trainer.train()
    run = load_run(str(tmp_path))
    last = int(run.steps[-1])
    assert last == trainer.state.global_step == 15 and run.points["reason"].iloc[-1] == "epoch_end+final"
    np.testing.assert_allclose(run.logprobs["train"][-1], capture.seen[last], atol=1e-6)
    assert run.config["best_model_checkpoint"].endswith("checkpoint-5")
    assert np.abs(run.logprobs["train"][-1] - capture.seen[5]).max() > 1e-3  # not the reloaded best model


def test_run_config_read_from_the_model_without_run_config(tmp_path):
    from hf_entropy_callback.peft_setup import apply_peft
    from hf_entropy_callback.study.conditions import describe_run

    tok, model, raw, train = setup("bert", n=20)
    model = apply_peft(model, "lora", r=4)
    Trainer(
        model=model,
        args=args(tmp_path, max_steps=2),
        train_dataset=train,
        processing_class=tok,
        callbacks=[AnnotationEntropyCallback(raw)],
    ).train()
    config = load_run(str(tmp_path)).config
    assert (config["method"], config["rank"], config["lora_alpha"]) == ("lora", 4, 8.0)
    assert config["target_modules"] == ["query", "value"] and config["architecture"] == "encoder"
    described = describe_run(config)
    assert described["method"] == "lora" and described["rank"] == 4


# ---- any number of classes -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5])
def test_multi_annotator_dataset_with_k_classes(tmp_path, k):
    rng = np.random.default_rng(k)
    tok = make_tokenizer()
    words = ["man", "dog", "cook", "park", "beach", "room", "sings", "runs"]
    n = 60
    counts = np.stack([rng.multinomial(20, rng.dirichlet(np.full(k, 0.3))) for _ in range(n)])
    labels = counts.argmax(1)
    text = [" ".join(rng.choice(words, 4)) + " " + words[y % len(words)] for y in labels]
    raw = datasets.Dataset.from_dict(
        {"id": [f"r{i}" for i in range(n)], "text": text, "label": labels.tolist(), "label_counts": counts.tolist()}
    )
    train = raw.map(
        lambda b: tok(b["text"], truncation=True), batched=True, remove_columns=["id", "text", "label_counts"]
    )
    model = tiny_model("bert", tok, num_labels=k)
    cb = AnnotationEntropyCallback(raw, text_columns=["text"], track_every=2)
    Trainer(
        model=model,
        args=args(tmp_path, max_steps=6, learning_rate=5e-3),
        train_dataset=train,
        processing_class=tok,
        callbacks=[cb],
    ).train()
    run = load_run(str(tmp_path))
    assert run.logprobs["train"].shape == (4, n, k)
    ex = run.set_examples("train")
    np.testing.assert_allclose(ex["entropy"], annotation_entropy(counts))
    low, high = category_thresholds(k)
    assert run.config["thresholds"] == pytest.approx([low, high])
    h = ex["entropy"].to_numpy()
    expected = np.where(h < low, "clean", np.where(h <= high, "ambiguous", "contested"))
    np.testing.assert_array_equal(ex["category"], expected)
    summary = run_summary(run, validation_set=None)
    assert summary["n_examples"] == n and summary["n_nan"] == 0
    assert {c["category"] for c in summary["categories"]} == set(expected)
