"""Train-mode dynamics of the whole training set (`record_train_dynamics`), checked from the user's side:
the files on disk, the Trainer's log history, a resumed run, two processes, the script and the report."""

import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from tiny import args, no_dropout, setup
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

from hf_entropy_callback import ClassWeightedTrainer
from hf_entropy_callback.cartography import (
    TrainDynamicsFormatError,
    load_train_dynamics,
    logprob_columns,
    train_cartography,
)
from hf_entropy_callback.testing import make_tokenizer, synthetic_nli, tiny_model
from hf_entropy_callback.train_dynamics import TrainDynamicsMixin, add_example_index

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TORCHRUN = shutil.which("torchrun")


def _files(out):
    folder = os.path.join(str(out), "train_dynamics")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _epochs(frame):
    return {int(e): g.drop(columns=["epoch"]).reset_index(drop=True) for e, g in frame.groupby("epoch")}


def test_every_example_once_per_epoch_under_its_own_index(tmp_path):
    """Shuffled batches, text columns that remove_unused_columns drops: each record belongs to its example."""
    tok = make_tokenizer()
    model = no_dropout(tiny_model("bert", tok))
    raw = datasets.Dataset.from_dict(synthetic_nli(37, seed=3))  # 37: the last batch is short
    ds = raw.map(lambda b: tok(b["premise"], b["hypothesis"], truncation=True), batched=True)
    assert {"uid", "premise", "label_counts"} <= set(ds.column_names)  # strings and lists the collator cannot take
    # learning rate 0: the weights never move, so every record must equal a plain forward over its example
    trainer = ClassWeightedTrainer(
        model=model,
        args=args(tmp_path, num_train_epochs=2, learning_rate=0.0, remove_unused_columns=True),
        train_dataset=ds,
        processing_class=tok,
        record_train_dynamics=True,
        example_ids="uid",
    )
    trainer.train()
    assert _files(tmp_path) == ["epoch-0001.parquet", "epoch-0002.parquet"]
    frame = load_train_dynamics(str(tmp_path))
    model.eval()
    feats = [{k: ds[i][k] for k in ("input_ids", "token_type_ids", "attention_mask")} for i in range(len(ds))]
    with torch.no_grad():
        expected = torch.log_softmax(model(**DataCollatorWithPadding(tok)(feats)).logits, -1).numpy()
    steps_seen = []
    for epoch, rec in _epochs(frame).items():
        assert rec["example_index"].tolist() == list(range(37))  # every example once
        assert rec["example_id"].tolist() == raw["uid"] and rec["label"].tolist() == raw["label"]
        np.testing.assert_allclose(rec[logprob_columns(3)].to_numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(rec["loss"], -expected[np.arange(37), raw["label"]], atol=1e-5)
        assert sorted(rec["step"].value_counts().tolist()) == [5, 8, 8, 8, 8]  # 5 steps per epoch, last one short
        steps_seen.append(sorted(set(rec["step"])))
        # shuffled: the examples do not come in dataset order
        assert rec.sort_values("step", kind="stable")["example_index"].tolist() != list(range(37))
    assert steps_seen == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_step_losses_are_what_the_trainer_optimised(tmp_path, accumulation):
    """Class weights off, dropout on: the mean of a step's recorded losses is the loss the Trainer logged."""
    tok, model, _, train = setup("bert", n=40)
    trainer = ClassWeightedTrainer(
        model=model,
        args=args(
            tmp_path,
            num_train_epochs=2,
            per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation,
            logging_strategy="steps",
            logging_steps=1,
        ),
        train_dataset=train,
        processing_class=tok,
        use_class_weights=False,
        record_train_dynamics=True,
    )
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    trainer.train()
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    frame = load_train_dynamics(str(tmp_path))
    assert sorted(logged) == sorted(frame["step"].unique()) == list(range(1, 11))
    by_step = frame.groupby("step")["loss"]
    assert (by_step.size() == 8).all()  # every micro-batch's examples
    for step, loss in logged.items():
        assert by_step.mean()[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_gradient_accumulation_gives_the_records_of_the_full_batch(tmp_path):
    def run(out, batch, accumulation):
        tok, model, _, train = setup("bert", n=40)
        ClassWeightedTrainer(
            model=no_dropout(model),
            args=args(
                out,
                num_train_epochs=2,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_grad_norm=0.0,
            ),
            train_dataset=train,
            processing_class=tok,
            record_train_dynamics=True,
        ).train()
        return load_train_dynamics(str(out))

    a, b = run(tmp_path / "full", 8, 1), run(tmp_path / "accumulated", 4, 2)
    pd.testing.assert_frame_equal(
        a[["epoch", "step", "example_index", "label"]], b[["epoch", "step", "example_index", "label"]]
    )
    np.testing.assert_allclose(a[logprob_columns(3)], b[logprob_columns(3)], atol=1e-5)


def test_off_by_default_writes_nothing_and_changes_nothing(tmp_path):
    weights = {}
    for record in (None, False, True):
        out = tmp_path / str(record)
        tok, model, _, train = setup("bert", n=40)  # dropout on: recording must not touch the random streams
        extra = {} if record is None else {"record_train_dynamics": record}
        trainer = ClassWeightedTrainer(
            model=model, args=args(out, num_train_epochs=2), train_dataset=train, processing_class=tok, **extra
        )
        trainer.train()
        weights[record] = {k: v.clone() for k, v in model.state_dict().items()}
        assert _files(out) == ([] if not record else ["epoch-0001.parquet", "epoch-0002.parquet"])
        assert ("example_index" in trainer.train_dataset.column_names) == bool(record)
    for record in (False, True):
        assert weights[record].keys() == weights[None].keys()
        for k in weights[None]:
            assert torch.equal(weights[record][k], weights[None][k]), (record, k)  # bit for bit


class _Kill(TrainerCallback):
    """Stops the process's training dead at a step, as a crash would (nothing of the Trainer runs after)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def _resumable_run(out, *, kill=None, resume=None, save_steps=3):
    tok, model, _, train = setup("bert", n=40)  # 5 steps per epoch, 3 epochs; dropout on
    trainer = ClassWeightedTrainer(
        model=model,
        args=args(out, save_strategy="steps", save_steps=save_steps),
        train_dataset=train,
        processing_class=tok,
        record_train_dynamics=True,
        callbacks=[_Kill(kill)] if kill else [],
    )
    if kill:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    else:
        trainer.train(resume_from_checkpoint=resume)


@pytest.mark.parametrize(
    "save_steps, kill, resume_from, lose_epoch_file",
    [
        (3, 8, 6, None),  # checkpoint in the middle of epoch 2, killed later in the same epoch
        (5, 7, 5, 1),  # checkpoint at the last step of epoch 1, killed before that epoch's file was written
        (3, 13, True, None),  # resume_from_checkpoint=True: the newest checkpoint (12, in epoch 3)
    ],
)
def test_resumed_run_writes_the_files_of_an_uninterrupted_one(tmp_path, save_steps, kill, resume_from, lose_epoch_file):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _resumable_run(whole, save_steps=save_steps)
    _resumable_run(broken, kill=kill, save_steps=save_steps)
    assert _files(broken) == [f"epoch-{e:04d}.parquet" for e in range(1, (kill - 1) // 5 + 1)]
    if lose_epoch_file:
        os.remove(broken / "train_dynamics" / f"epoch-{lose_epoch_file:04d}.parquet")
    # a stale file from beyond the checkpoint, as a run killed later would leave, is replaced, not kept
    shutil.copy(whole / "train_dynamics" / "epoch-0003.parquet", broken / "train_dynamics" / "epoch-0003.parquet")
    ckpt = str(broken / f"checkpoint-{resume_from}") if resume_from is not True else True
    _resumable_run(broken, resume=ckpt, save_steps=save_steps)
    assert _files(broken) == _files(whole) == ["epoch-0001.parquet", "epoch-0002.parquet", "epoch-0003.parquet"]
    a, b = load_train_dynamics(str(whole)), load_train_dynamics(str(broken))
    pd.testing.assert_frame_equal(a, b)  # exactly: the checkpoint restores the random state (dropout)
    for fa, fb in zip(a.attrs["files"], b.attrs["files"]):
        assert {k: v for k, v in fa.items() if k != "path"} == {k: v for k, v in fb.items() if k != "path"}
        assert fa["history_complete"] and fa["n_records"] == 40


def test_resume_without_the_partial_epoch_says_so(tmp_path):
    _resumable_run(tmp_path, kill=8)
    shutil.rmtree(tmp_path / "checkpoint-6" / "train_dynamics")
    with pytest.warns(RuntimeWarning, match="history_complete: false"):
        _resumable_run(tmp_path, resume=str(tmp_path / "checkpoint-6"))
    meta = {m["epoch"]: m for m in load_train_dynamics(str(tmp_path)).attrs["files"]}
    assert [meta[e]["history_complete"] for e in (1, 2, 3)] == [True, False, True]
    assert [meta[e]["n_records"] for e in (1, 2, 3)] == [40, 32, 40]  # epoch 2 lacks the 8 examples of step 6


def test_files_say_train_mode_and_bad_files_are_named(tmp_path):
    tok, model, _, train = setup("bert", n=16)
    ClassWeightedTrainer(
        model=model,
        args=args(tmp_path, num_train_epochs=1),
        train_dataset=train,
        processing_class=tok,
        record_train_dynamics=True,
    ).train()
    path = tmp_path / "train_dynamics" / "epoch-0001.parquet"
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(path).metadata[b"hf_entropy_callback.train_dynamics"])
    assert meta["mode"] == "train" and "train mode" in meta["loss"] and meta["epoch"] == 1
    frame = load_train_dynamics(str(path))
    assert (frame["mode"] == "train").all() and frame["epoch_complete"].all()
    # an eval-mode or foreign file is refused, naming it
    other = tmp_path / "other" / "train_dynamics"
    other.mkdir(parents=True)
    frame.to_parquet(other / "epoch-0001.parquet")
    with pytest.raises(TrainDynamicsFormatError, match=r"epoch-0001\.parquet: not a train-mode"):
        load_train_dynamics(str(tmp_path / "other"))
    with open(other / "epoch-0001.parquet", "wb") as fh:
        fh.write(path.read_bytes()[:300])
    with pytest.raises(TrainDynamicsFormatError, match=r"epoch-0001\.parquet is corrupt"):
        load_train_dynamics(str(other))
    with pytest.raises(TrainDynamicsFormatError, match="no train-mode dynamics"):
        load_train_dynamics(str(tmp_path / "checkpoint-none"))
    with pytest.raises(ValueError, match="mode 'train'"):
        train_cartography(frame.assign(mode="eval"))


def test_cartography_of_the_whole_training_set(tmp_path):
    tok, model, _, train = setup("bert", n=40)
    ClassWeightedTrainer(
        model=model,
        args=args(tmp_path, num_train_epochs=3),
        train_dataset=train,
        processing_class=tok,
        record_train_dynamics=True,
    ).train()
    frame = load_train_dynamics(str(tmp_path))
    carto = train_cartography(frame)
    assert carto["example_index"].tolist() == list(range(40)) and (carto["n_epochs"] == 3).all()
    # the definition, from the stored loss column (not the log-probabilities the function reads)
    p = np.exp(-frame.pivot(index="example_index", columns="epoch", values="loss").to_numpy(np.float64))
    np.testing.assert_allclose(carto["confidence"], p.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(carto["variability"], p.std(axis=1), rtol=1e-4, atol=1e-7)
    pred = frame[logprob_columns(3)].to_numpy().argmax(axis=1) == frame["label"].to_numpy()
    right = pd.Series(pred).groupby(frame["example_index"]).mean()
    np.testing.assert_allclose(carto["correctness"], right.to_numpy())
    # a subset of epochs, and an example missing from one epoch is left out with a warning
    assert (train_cartography(frame, epochs=[2, 3])["n_epochs"] == 2).all()
    holed = frame[~((frame["epoch"] == 2) & (frame["example_index"] == 5))]
    with pytest.warns(RuntimeWarning, match="1 examples lack a record"):
        assert 5 not in train_cartography(holed)["example_index"].tolist()


def test_mixin_on_a_plain_trainer_with_a_torch_dataset(tmp_path):
    """The documented mixin order on the base Trainer (its own loss), with a dataset that yields the index."""

    class RecordingTrainer(TrainDynamicsMixin, Trainer):
        pass

    tok, model, _, train = setup("bert", n=24)
    indexed = add_example_index(train)
    rows = [dict(indexed[i]) for i in range(len(indexed))]  # a list of dicts: no column_names to add one to

    trainer = RecordingTrainer(
        model=model,
        args=args(tmp_path, num_train_epochs=1, logging_strategy="steps", logging_steps=1),
        train_dataset=rows,
        data_collator=DataCollatorWithPadding(tok),
        record_train_dynamics=True,
        example_ids=[f"row-{i}" for i in range(24)],
    )
    trainer.train()
    rec = load_train_dynamics(str(tmp_path))
    assert rec["example_index"].tolist() == list(range(24))
    assert rec["example_id"].tolist() == [f"row-{i}" for i in range(24)]
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    for step, loss in logged.items():  # the model's own (unweighted) loss
        assert rec.loc[rec["step"] == step, "loss"].mean() == pytest.approx(loss, rel=1e-5)

    twice = datasets.concatenate_datasets([indexed, indexed])  # an index that no longer names one example
    dup = RecordingTrainer(
        model=model, args=args(tmp_path / "dup"), train_dataset=twice, processing_class=tok, record_train_dynamics=True
    )
    with pytest.raises(ValueError, match="repeated values"):
        dup.train()
    short_ids = RecordingTrainer(
        model=model,
        args=args(tmp_path / "ids"),
        train_dataset=train,
        processing_class=tok,
        record_train_dynamics=True,
        example_ids=["a", "b"],
    )
    with pytest.raises(ValueError, match="example_ids has 2 entries, the training set 24"):
        short_ids.train()

    plain = RecordingTrainer(model=model, args=args(tmp_path / "x"), train_dataset=train, record_train_dynamics=True)
    no_index = [{k: v for k, v in r.items() if k != "example_index"} for r in rows]
    plain.train_dataset = no_index
    plain.data_collator = DataCollatorWithPadding(tok)
    with pytest.raises(ValueError, match="has no 'example_index' column"):
        plain.train()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_two_processes_record_what_one_does(tmp_path):
    worker = os.path.join(HERE, "mp_train_dynamics_worker.py")
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29531", worker, str(two), "8", "48", "50"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, worker, str(one), "16", "48"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(two / "n48" / "world.json") as fh:
        assert json.load(fh)["world_size"] == 2  # really two processes

    # 48 = 3 steps of 2 x 8: the same examples at the same steps as one process with batch 16
    a, b = load_train_dynamics(str(two / "n48")), load_train_dynamics(str(one / "n48"))
    pd.testing.assert_frame_equal(
        a[["epoch", "step", "example_index", "label"]], b[["epoch", "step", "example_index", "label"]]
    )
    first = (a["epoch"] == 1).to_numpy()
    np.testing.assert_allclose(a[logprob_columns(3)][first], b[logprob_columns(3)][first], atol=1e-5)
    np.testing.assert_allclose(a[logprob_columns(3)], b[logprob_columns(3)], atol=1e-3)
    assert [m["world_size"] for m in a.attrs["files"]] == [2, 2]

    # 50 = 4 steps of 2 x 8 with 14 duplicates padding the last step: each example once, its first sighting
    c = load_train_dynamics(str(two / "n50"))
    for epoch, rec in _epochs(c).items():
        assert rec["example_index"].tolist() == list(range(50))
    assert [m["duplicates_dropped"] for m in c.attrs["files"]] == [14, 14]


def test_script_flag_files_and_report_section(tmp_path):
    sys.path.insert(0, ROOT)
    from script_args import script_argv, write_script_inputs

    import run_glue_entropy
    from hf_entropy_callback import load_run
    from hf_entropy_callback.study.cli import main as analysis_main

    inputs = write_script_inputs(tmp_path)
    runs = tmp_path / "runs"
    out = runs / "with"
    run_glue_entropy.main(
        script_argv(inputs["bert"], inputs["chaosnli"], inputs["bulk"], out) + ["--record_train_dynamics"]
    )
    run_glue_entropy.main(script_argv(inputs["bert"], inputs["chaosnli"], inputs["bulk"], runs / "without", seed=7))
    assert not (runs / "without" / "train_dynamics").exists()
    run = load_run(str(out))
    assert run.config["record_train_dynamics"] is True
    assert not load_run(str(runs / "without")).run_config.record_train_dynamics
    frame = load_train_dynamics(str(out))
    n_train = run.config["n_train"]
    assert sorted(frame["epoch"].unique()) == [1, 2]
    assert (frame.groupby("epoch").size() == n_train).all()  # the whole training set, bulk included
    ids = frame.loc[frame["epoch"] == 1, "example_id"]
    tracked = set(run.set_examples("train")["example_id"])
    assert tracked < set(ids) and ids.str.startswith("bulk:").sum() == n_train - len(tracked)

    report = tmp_path / "report"
    assert analysis_main([str(runs), "--out", str(report), "--quiet"]) == 0
    index = (report / "index.md").read_text()
    assert "## Training-set cartography (train mode, whole training set)" in index
    table = pd.read_csv(report / "tables" / "train_cartography.csv")
    assert set(table["run_id"]) == {"with"}  # the run without records is not in it
    assert table["n"].sum() == n_train
    assert set(table["group"]) <= {"clean", "ambiguous", "contested", "untracked"}
    assert table.loc[table["group"] == "untracked", "n"].sum() == n_train - len(tracked)
    carto = train_cartography(frame)
    assert table["confidence"].mul(table["n"]).sum() / n_train == pytest.approx(carto["confidence"].mean())
    assert (report / "figures" / "train_cartography.png").stat().st_size > 0
