import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import args, no_dropout, setup, validation_copy
from transformers import Trainer, TrainerCallback

from hf_entropy_callback import AnnotationEntropyCallback, ClassWeightedTrainer, load_run
from hf_entropy_callback.callback import tracking_schedule
from hf_entropy_callback.dynamics import run_summary
from hf_entropy_callback.tracker import UNLEARNING_MARGIN

# 50 examples, batch 8 -> 7 steps per epoch; 3 epochs -> 21 steps; track every 4, by hand:
HAND_SCHEDULE = [
    (0, "step0"),
    (4, "interval"),
    (7, "epoch_end"),
    (8, "interval"),
    (12, "interval"),
    (14, "epoch_end"),
    (16, "interval"),
    (20, "interval"),
    (21, "epoch_end+final"),
]


def test_schedule_function_matches_hand_list():
    assert tracking_schedule(50, 8, 3, track_every=4) == HAND_SCHEDULE
    # same step as interval and epoch end is recorded once
    assert tracking_schedule(16, 8, 2, track_every=2) == [
        (0, "step0"),
        (2, "interval+epoch_end"),
        (4, "interval+epoch_end+final"),
    ]
    assert tracking_schedule(100, 8, 1, track_every=0, gradient_accumulation_steps=2, world_size=2)[-1] == (
        4,
        "epoch_end+final",
    )


def _train(tmp_path, arch="bert", trainer_cls=ClassWeightedTrainer, extra_callbacks=(), n=50, **kw):
    tok, model, raw, train = setup(arch, n=n)
    val = validation_copy(raw)
    cb = AnnotationEntropyCallback({"train": raw, "validation": val}, track_every=4, batch_size=16)
    trainer = trainer_cls(
        model=no_dropout(model),
        args=args(tmp_path, **kw),
        train_dataset=train,
        processing_class=tok,
        callbacks=[*extra_callbacks, cb],
    )
    trainer.train()
    return trainer, cb, raw, tok


def _direct_logprobs(model, tok, raw):
    """One example at a time, no padding: an independent recomputation."""
    model.eval()
    out = []
    with torch.no_grad():
        for p, h in zip(raw["premise"], raw["hypothesis"]):
            enc = tok(p, h, return_tensors="pt")
            if model.config.model_type == "distilbert":
                enc.pop("token_type_ids", None)
            out.append(F.log_softmax(model(**enc).logits.float(), -1)[0].numpy())
    return np.stack(out)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "deberta-v2", "qwen2"])
def test_real_trainer_run_schedule_and_last_point(tmp_path, arch):
    trainer, cb, raw, tok = _train(tmp_path, arch)
    run = load_run(str(tmp_path))
    assert list(zip(run.points["step"], run.points["reason"])) == HAND_SCHEDULE
    assert run.logprobs["train"].shape == (len(HAND_SCHEDULE), 50, 3)
    assert run.logprobs["validation"].shape == (len(HAND_SCHEDULE), 12, 3)
    ex = run.set_examples("train")
    assert ex["example_id"].tolist() == list(raw["uid"])
    np.testing.assert_allclose(ex["entropy"], raw["entropy"])
    # the stored last point equals a direct recomputation on the final model
    direct = _direct_logprobs(trainer.model, tok, raw)
    np.testing.assert_allclose(run.logprobs["train"][-1], direct, atol=2e-5)
    # and training did move the model, so this is not the step-0 model
    assert np.abs(run.logprobs["train"][0] - direct).max() > 1e-3
    assert run.config["model_type"] == trainer.model.config.model_type and run.config["track_every"] == 4


def test_padding_side_is_respected_for_decoders(tmp_path):
    tok, model, raw, train = setup("qwen2", n=20)
    assert tok.padding_side == "left"
    cb = AnnotationEntropyCallback(raw, tokenizer=tok, batch_size=20)
    cb.tracker.prepare(model, tok)
    batched = cb.tracker.compute_logprobs(model.eval(), "train")
    np.testing.assert_allclose(batched, _direct_logprobs(model, tok, raw), atol=2e-5)


def test_metrics_reach_the_trainer_log(tmp_path):
    trainer, cb, raw, tok = _train(tmp_path, "bert", trainer_cls=Trainer)
    logged = [h for h in trainer.state.log_history if "entropy/spearman_rho" in h]
    assert [h["step"] for h in logged] == [s for s, _ in HAND_SCHEDULE]
    last = logged[-1]
    loss = load_run(str(tmp_path)).losses("train")[-1]
    cats = cb.sets["train"].categories
    for cat in ("clean", "ambiguous", "contested"):
        assert last[f"entropy/train_loss_{cat}"] == pytest.approx(loss[cats == cat].mean())
    from scipy.stats import spearmanr

    assert last["entropy/spearman_rho"] == pytest.approx(spearmanr(raw["entropy"], loss).statistic)
    val = load_run(str(tmp_path)).logprobs["validation"][-1]
    assert last["entropy/validation_accuracy"] == pytest.approx((val.argmax(1) == np.asarray(raw["label"][:12])).mean())


def test_unlearning_warning_once(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="hf_entropy_callback.tracker")
    trainer, cb, raw, tok = _train(tmp_path, "bert", learning_rate=0.5)  # diverges: losses rise
    warned = [r for r in caplog.records if "Un-learning" in r.getMessage()]
    contested = cb.losses("train")[:, cb.sets["train"].categories == "contested"].mean(axis=1)
    rose = (contested[1:] > contested[0] + UNLEARNING_MARGIN).any()
    assert rose and len(warned) == 1


class Crash(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated interruption")


def test_resume_gives_the_uninterrupted_trajectory(tmp_path):
    kw = dict(save_strategy="steps", save_steps=5)
    _train(tmp_path / "full", **kw)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", extra_callbacks=[Crash(at=13)], **kw)
    assert os.path.isdir(tmp_path / "cut" / "checkpoint-10" / "entropy_tracking")
    assert not os.path.exists(tmp_path / "cut" / "entropy_tracking")
    # a fresh process: new model object, new callback, resumed from the last checkpoint
    tok, model, raw, train = setup("bert", n=50)
    val = validation_copy(raw)
    cb = AnnotationEntropyCallback({"train": raw, "validation": val}, track_every=4, batch_size=16)
    trainer = ClassWeightedTrainer(
        model=no_dropout(model),
        args=args(tmp_path / "cut", **kw),
        train_dataset=train,
        processing_class=tok,
        callbacks=[cb],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-10"))
    full, resumed = load_run(str(tmp_path / "full")), load_run(str(tmp_path / "cut"))
    assert resumed.points[["step", "reason"]].equals(full.points[["step", "reason"]])
    for name in ("train", "validation"):
        np.testing.assert_allclose(resumed.logprobs[name], full.logprobs[name], atol=1e-6)


def test_resume_without_saved_trajectory_warns(tmp_path):
    tok, model, raw, train = setup("bert", n=50)
    plain = Trainer(
        model=model,
        args=args(tmp_path, save_strategy="steps", save_steps=7, max_steps=7),
        train_dataset=train,
        processing_class=tok,
    )
    plain.train()
    cb = AnnotationEntropyCallback(raw, track_every=4)
    trainer = Trainer(
        model=model, args=args(tmp_path, max_steps=10), train_dataset=train, processing_class=tok, callbacks=[cb]
    )
    with pytest.warns(RuntimeWarning, match="no saved trajectory"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-7"))
    run = load_run(str(tmp_path))
    assert run.steps[0] == 8 and run.config["resumed_without_history"] is True
    assert run.config["history_complete"] is False


def test_tokenized_tracked_set_and_user_trainer(tmp_path):
    tok, model, raw, train = setup("distilbert", n=24)
    tokenized = raw.map(lambda b: tok(b["premise"], b["hypothesis"]), batched=True).remove_columns(
        ["premise", "hypothesis"]
    )
    cb = AnnotationEntropyCallback(tokenized, track_every=0)
    Trainer(
        model=model, args=args(tmp_path, num_train_epochs=1), train_dataset=train, processing_class=tok, callbacks=[cb]
    ).train()
    run = load_run(str(tmp_path))
    assert run.points["reason"].tolist() == ["step0", "epoch_end+final"]
    assert (run.examples["token_length"] > 3).all()


def test_bad_tracked_sets():
    tok, model, raw, train = setup("bert", n=10)
    with pytest.raises(ValueError, match="missing label column"):
        AnnotationEntropyCallback(raw.remove_columns(["label"]))
    with pytest.raises(ValueError, match="missing column 'entropy'"):
        AnnotationEntropyCallback(raw.remove_columns(["entropy", "label_counts"]))
    with pytest.raises(ValueError, match="is empty"):
        AnnotationEntropyCallback(raw.select([]))
    with pytest.raises(ValueError, match="no tracked set"):
        AnnotationEntropyCallback({})
    with pytest.raises(ValueError, match="missing text columns"):
        AnnotationEntropyCallback(raw.remove_columns(["hypothesis"]))
    # entropy derived from label_counts when absent
    cb = AnnotationEntropyCallback(raw.remove_columns(["entropy"]))
    cb.tracker.prepare(model, tok)
    np.testing.assert_allclose(cb.sets["train"].entropy, raw["entropy"])


def test_label_outside_model_range(tmp_path):
    tok, model, raw, train = setup("bert", n=10)
    bad = raw.map(lambda r, i: {"label": 3 if i == 4 else r["label"]}, with_indices=True)
    cb = AnnotationEntropyCallback(bad)
    trainer = Trainer(
        model=model, args=args(tmp_path, max_steps=1), train_dataset=train, processing_class=tok, callbacks=[cb]
    )
    with pytest.raises(ValueError, match=r"example 'syn0-4' has label 3, outside the model's 0..2"):
        trainer.train()


class Poison(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 4:
            with torch.no_grad():
                model.classifier.weight[0, 0] = float("nan")


def test_nan_loss_is_recorded_and_reported(tmp_path):
    with pytest.warns(RuntimeWarning, match="NaN loss on 50 tracked examples of set 'train' at step 4"):
        _train(tmp_path, extra_callbacks=[Poison()], max_steps=8)
    run = load_run(str(tmp_path))
    assert np.isnan(run.logprobs["train"][1:]).all() and np.isfinite(run.logprobs["train"][0]).all()
    assert run_summary(run)["n_nan"] == 50


def test_nan_policy_raise(tmp_path):
    tok, model, raw, train = setup("bert", n=10)
    cb = AnnotationEntropyCallback(raw, track_every=4, nan_policy="raise")
    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=8),
        train_dataset=train,
        processing_class=tok,
        callbacks=[Poison(), cb],
    )
    with pytest.raises(FloatingPointError, match="step 4"):
        trainer.train()
    assert not os.path.exists(tmp_path / "entropy_tracking")


def test_decoder_without_pad_token_is_refused():
    tok, model, raw, train = setup("qwen2", n=6)
    tok.pad_token = None
    cb = AnnotationEntropyCallback(raw)
    with pytest.raises(ValueError, match="no pad token"):
        cb.tracker.prepare(model, tok)
