"""The tracking forward under bf16 autocast (issue 14, item 3): on when the Trainer trains in bf16, else off.

bf16 keeps 8 significant bits, so a log-probability moves by about 2**-8 of the logits' size: on the tiny
BERT below (its head scaled so that the log-probabilities spread over about one nat) that is a few
thousandths of a nat, and the tests allow BF16_ATOL. Off, the values are bit for bit those of a plain
fp32 forward over the same batches, as before the option existed.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import args, no_dropout, setup
from transformers import Trainer

from hf_entropy_callback import AnnotationEntropyCallback, EntropyTracker, load_run

#: Largest |bf16-autocast log-prob - fp32 log-prob| allowed, in nats.
BF16_ATOL = 0.02


def _model_and_data(n=40):
    tok, model, raw, train = setup("bert", n=n)
    model = no_dropout(model).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)  # confident predictions, so bf16's rounding shows in the numbers
    return tok, model, raw, train


def _plain_forward(tracker, model, name="train"):
    """log_softmax of a plain fp32 forward over the tracker's own batches, put back in the set's order."""
    tset = tracker.sets[name]
    mine, batches = tracker._shard_batches(tset, None, 1, 0, torch.device("cpu"))
    with torch.inference_mode():
        out = torch.cat([F.log_softmax(model(**b).logits.float(), dim=-1) for b in batches]).numpy()
    result = np.empty_like(out)
    result[mine] = out
    return result


def test_bf16_autocast_is_close_to_fp32_and_off_is_bit_identical():
    tok, model, raw, _ = _model_and_data()
    fp32 = EntropyTracker(raw, tok).prepare(model)
    bf16 = EntropyTracker(raw, tok, autocast=True).prepare(model)
    assert not fp32.autocast and bf16.autocast
    off, on = fp32.compute_logprobs(model, "train"), bf16.compute_logprobs(model, "train")
    assert off.dtype == on.dtype == np.float32 and np.ptp(off) > 0.5
    np.testing.assert_array_equal(off, _plain_forward(fp32, model))
    assert 0 < np.abs(on - off).max() <= BF16_ATOL  # autocast did run, and stays within the tolerance
    with pytest.raises(TypeError, match="autocast must be True or False"):
        EntropyTracker(raw, tok, autocast="bf16")


def _trainer_step0(tmp_path, bf16, **callback_kw):
    tok, model, raw, train = _model_and_data()
    reference = _plain_forward(EntropyTracker(raw, tok).prepare(model), model)
    cb = AnnotationEntropyCallback(raw, track_every=0, **callback_kw)
    Trainer(
        model=model,
        args=args(tmp_path, bf16=bf16, max_steps=2),
        train_dataset=train,
        processing_class=tok,
        callbacks=[cb],
    ).train()
    run = load_run(str(tmp_path))
    return run, run.logprobs["train"][0], reference


def test_trainer_bf16_tracks_under_autocast(tmp_path):
    run, step0, fp32 = _trainer_step0(tmp_path, bf16=True)
    assert run.config["tracking_autocast"] == "bfloat16"
    assert 0 < np.abs(step0 - fp32).max() <= BF16_ATOL


def test_trainer_fp32_tracks_as_before(tmp_path):
    run, step0, fp32 = _trainer_step0(tmp_path, bf16=False)
    assert run.config["tracking_autocast"] is None
    np.testing.assert_array_equal(step0, fp32)


def test_callback_autocast_overrides_the_trainer_flag(tmp_path):
    run, step0, fp32 = _trainer_step0(tmp_path, bf16=True, autocast=False)
    assert run.config["tracking_autocast"] is None
    np.testing.assert_array_equal(step0, fp32)
