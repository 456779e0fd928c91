import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import rel_entr
from tiny import args, no_dropout, setup
from transformers import Trainer, TrainerCallback

from hf_entropy_callback import ClassWeightedTrainer
from hf_entropy_callback.trainer import inverse_frequency_weights, soft_label_kl, weighted_cross_entropy


def test_inverse_frequency_weights_hand_worked():
    np.testing.assert_allclose(inverse_frequency_weights([0, 0, 0, 1], 2), [4 / 6, 2.0])
    w = inverse_frequency_weights([0, 1, 2, 2], 3)
    np.testing.assert_allclose(w, [4 / 3, 4 / 3, 2 / 3])
    assert np.mean(w[[0, 1, 2, 2]]) == pytest.approx(1.0)  # weights average to 1 over the examples
    with pytest.raises(ValueError, match="no training examples"):
        inverse_frequency_weights([0, 0], 3)
    with pytest.raises(ValueError, match="0..1"):
        inverse_frequency_weights([0, 2], 2)


def test_weighted_ce_is_per_example_mean():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    w = torch.tensor([0.5, 1.0, 2.0])
    manual = np.mean([w[y].item() * -F.log_softmax(logits[i], -1)[y].item() for i, y in enumerate(labels.tolist())])
    assert weighted_cross_entropy(logits, labels, w).item() == pytest.approx(manual, rel=1e-6)
    # two halves average to the whole (unlike torch's weight-sum normalisation)
    halves = (weighted_cross_entropy(logits[:3], labels[:3], w) + weighted_cross_entropy(logits[3:], labels[3:], w)) / 2
    assert halves.item() == pytest.approx(manual, rel=1e-6)


def test_soft_kl_against_scipy():
    torch.manual_seed(1)
    logits = torch.randn(4, 3)
    counts = torch.tensor([[80, 15, 5], [0, 100, 0], [0, 0, 0], [34, 33, 33]])
    labels = torch.tensor([0, 1, 2, 0])
    p = F.softmax(logits, -1).numpy().astype(np.float64)
    q = counts.numpy() / np.maximum(counts.numpy().sum(1, keepdims=True), 1)
    q[2] = [0, 0, 1]  # no annotations: one-hot of the label
    want = np.mean([rel_entr(q[i], p[i]).sum() for i in range(4)])
    assert soft_label_kl(logits, counts, labels).item() == pytest.approx(want, rel=1e-5)


class GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _first_step_grads(tmp_path, arch, batch, accum, loss_type="ce"):
    tok, model, raw, train = setup(arch, n=64)
    # one padded length for every batch, so 32 vs 16 + 16 differ only in how the loss is summed
    train = train.map(
        lambda r: tok.pad(
            {k: r[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, padding="max_length", max_length=32
        )
    )
    if loss_type == "soft_kl":
        train = train.add_column("label_counts", [list(c) for c in raw["label_counts"]])
    cap = GradCapture()
    trainer = ClassWeightedTrainer(
        model=no_dropout(model),
        args=args(
            tmp_path / f"{arch}{batch}x{accum}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            max_steps=1,
            max_grad_norm=0.0,
        ),
        train_dataset=train,
        processing_class=tok,
        callbacks=[cap],
        loss_type=loss_type,
    )
    trainer.train()
    return cap.grads


@pytest.mark.parametrize("arch,loss_type", [("bert", "ce"), ("qwen2", "ce"), ("bert", "soft_kl")])
def test_gradient_accumulation_is_exact(tmp_path, arch, loss_type):
    full = _first_step_grads(tmp_path, arch, 32, 1, loss_type)
    accum = _first_step_grads(tmp_path, arch, 16, 2, loss_type)
    assert full.keys() == accum.keys() and len(full) > 0
    for name in full:
        torch.testing.assert_close(accum[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    # and a wrong division (no /GA) would be caught: the gradients would double
    some = next(n for n in full if full[n].abs().sum() > 0)
    assert not torch.allclose(2 * accum[some], full[some], rtol=1e-4, atol=1e-6)


def test_loss_matches_manual_weighted_ce(tmp_path):
    tok, model, raw, train = setup("bert", n=40)
    trainer = ClassWeightedTrainer(
        model=no_dropout(model), args=args(tmp_path), train_dataset=train, processing_class=tok
    )
    counts = np.bincount(np.asarray(train["label"]), minlength=3)
    np.testing.assert_allclose(trainer.class_weights.numpy(), 40 / (3 * counts), rtol=1e-6)
    batch = tok.pad(
        [{k: train[i][k] for k in ("input_ids", "attention_mask", "token_type_ids")} for i in range(8)],
        return_tensors="pt",
    )
    labels = torch.tensor(train["label"][:8])
    loss = trainer.compute_loss(model, {**batch, "labels": labels})
    logits = model(**batch).logits
    manual = (F.cross_entropy(logits, labels, reduction="none") * trainer.class_weights[labels]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_peft_wrapped_model_trains(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    tok, model, raw, train = setup("roberta", n=32)
    peft_model = get_peft_model(
        model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    trainer = ClassWeightedTrainer(
        model=peft_model, args=args(tmp_path, max_steps=3), train_dataset=train, processing_class=tok
    )
    out = trainer.train()
    assert np.isfinite(out.training_loss)


def test_bad_configuration(tmp_path):
    tok, model, raw, train = setup("bert", n=16)
    with pytest.raises(ValueError, match="loss_type"):
        ClassWeightedTrainer(model=model, args=args(tmp_path), train_dataset=train, loss_type="mse")
    with pytest.raises(ValueError, match="class_weights"):
        ClassWeightedTrainer(model=model, args=args(tmp_path), train_dataset=train, class_weights=[1.0, 2.0])
    bad = train.map(lambda r: {"label": 5})
    with pytest.raises(ValueError, match="0..2"):
        ClassWeightedTrainer(model=model, args=args(tmp_path), train_dataset=bad)
    # plain Trainer stays usable side by side
    assert isinstance(ClassWeightedTrainer(model=model, args=args(tmp_path), train_dataset=train), Trainer)


def test_nli_metric_through_evaluate_offline(monkeypatch):
    import evaluate
    from sklearn.metrics import f1_score

    from hf_entropy_callback import nli_metric

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(nli_metric.__file__)
    pred, ref = [0, 1, 2, 2, 1, 0, 0], [0, 1, 1, 2, 2, 0, 1]
    out = metric.compute(predictions=pred, references=ref)
    assert out["accuracy"] == pytest.approx(4 / 7)
    assert out["macro_f1"] == pytest.approx(f1_score(ref, pred, average="macro"))
