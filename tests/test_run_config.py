"""One run configuration (issue 17 item 9): built once, saved versioned, read back the same by the script,
the callback and the analysis; a user's own Trainer script is reported under its real method and rank."""

import json
import os
import warnings

import pytest
from peft import LoraConfig, TaskType, get_peft_model
from tiny import args, setup
from transformers import Trainer

from hf_entropy_callback import AnnotationEntropyCallback, ClassWeightedTrainer, RunFormatError, load_run
from hf_entropy_callback.run_config import RUN_CONFIG_VERSION, RunConfig
from hf_entropy_callback.study.report import build_report


def _lora(model, r):
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=3 * r, target_modules=["query", "value"])
    return get_peft_model(model, config)


def _plain_run(out, model, train, raw, tok, seed=0, **kw):
    Trainer(
        model=model,
        args=args(out, max_steps=2, seed=seed),
        train_dataset=train,
        processing_class=tok,
        callbacks=[AnnotationEntropyCallback(raw, **kw)],
    ).train()
    return load_run(str(out))


def test_a_plain_trainer_run_without_run_config_is_reported_under_its_method_and_rank(tmp_path):
    for seed in (0, 1):  # the same tracked examples, two training seeds
        tok, model, raw, train = setup("bert", n=24)
        _plain_run(tmp_path / "runs" / f"lora-{seed}", _lora(model, 4), train, raw, tok, seed=seed)
        tok, model, raw, train = setup("bert", n=24)
        _plain_run(tmp_path / "runs" / f"full-{seed}", model, train, raw, tok, seed=seed)
    report = build_report([str(tmp_path / "runs")], str(tmp_path / "report"), html_index=False, progress=False)
    conditions = report.tables["conditions"]
    labels = sorted(conditions["condition"])
    assert labels == ["bert · LoRA r=4 · unknown", "bert · full FT · unknown"], labels  # no dataset was named
    assert sorted(conditions["method"]) == ["full", "lora"]
    lora = conditions[conditions["condition"].str.contains("LoRA r=4")]
    assert int(lora["n_runs"].iloc[0]) == 2
    # What the report read is the file: method / rank / alpha / targets as the adapter has them.
    config = json.load(open(tmp_path / "runs" / "lora-0" / "entropy_tracking" / "run_config.json"))["config"]
    assert config["config_version"] == RUN_CONFIG_VERSION
    assert (config["method"], config["rank"], config["lora_alpha"], config["target_modules"]) == (
        "lora",
        4,
        12.0,
        ["query", "value"],
    )


def test_given_values_that_disagree_with_the_run_are_replaced_with_a_warning(tmp_path):
    tok, model, raw, train = setup("bert", n=24)
    given = {"method": "lora", "rank": 64, "learning_rate": 1.0, "dataset": "snli", "note": "mine"}
    with pytest.warns(UserWarning, match=r"rank: given 64, the run has 4.*learning_rate: given 1.0"):
        run = _plain_run(tmp_path, _lora(model, 4), train, raw, tok, run_config=given)
    cfg = run.run_config
    assert (cfg.rank, cfg.learning_rate) == (4, 5e-3)  # what the run did
    assert cfg.dataset == "snli" and cfg.extra == {"note": "mine"}  # what only the user knows stays


def test_full_fine_tuning_drops_adapter_settings_given_for_it(tmp_path):
    tok, model, raw, train = setup("bert", n=24)
    with pytest.warns(UserWarning, match="rank: given 8, the run has None"):
        run = _plain_run(tmp_path, model, train, raw, tok, run_config={"method": "full", "rank": 8})
    assert run.run_config.method == "full" and run.run_config.rank is None


def test_the_loss_of_a_class_weighted_trainer_is_recorded_without_run_config(tmp_path):
    tok, model, raw, train = setup("bert", n=24)
    ClassWeightedTrainer(
        model=model,
        args=args(tmp_path, max_steps=2),
        train_dataset=train,
        processing_class=tok,
        callbacks=[AnnotationEntropyCallback(raw)],
    ).train()
    cfg = load_run(str(tmp_path)).run_config
    assert cfg.loss == "ce" and cfg.use_class_weights is True and len(cfg.class_weights) == 3


def test_agreeing_given_config_gives_no_warning_and_a_runconfig_is_accepted(tmp_path):
    tok, model, raw, train = setup("bert", n=24)
    given = RunConfig(method="lora", rank=4, lora_alpha=12.0, target_modules="query,value", dataset="snli")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run = _plain_run(tmp_path, _lora(model, 4), train, raw, tok, run_config=given)
    # The same modules in the user's spelling (the form the script's fingerprint holds) stay as given.
    assert run.run_config.target_modules == "query,value" and run.run_config.dataset == "snli"


def test_round_trip_and_versions():
    cfg = RunConfig(method="lora", rank=8, lora_alpha=16.0, dataset="snli", extra={"mine": [1, 2]})
    stored = json.loads(json.dumps(cfg.to_dict()))
    assert RunConfig.from_dict(stored) == cfg
    assert "mine" not in cfg.fingerprint() and "n_train" not in cfg.fingerprint() and "rank" in cfg.fingerprint()
    # Version 0 (written before config_version): LoRA recognised by its rank, max_length from the script's.
    old = RunConfig.from_dict({"rank": 8, "max_seq_length": 128})
    assert old.method == "lora" and old.max_length == 128
    assert RunConfig.from_dict({}).method is None  # nothing to read: the analysis shows "unknown"
    with pytest.raises(ValueError, match="newer than this library"):
        RunConfig.from_dict({"config_version": RUN_CONFIG_VERSION + 1})


def test_a_run_written_by_a_newer_config_version_is_refused_by_name(tmp_path):
    tok, model, raw, train = setup("bert", n=24)
    _plain_run(tmp_path, model, train, raw, tok)
    path = os.path.join(tmp_path, "entropy_tracking", "run_config.json")
    meta = json.load(open(path))
    meta["config"]["config_version"] = RUN_CONFIG_VERSION + 1
    json.dump(meta, open(path, "w"))
    with pytest.raises(RunFormatError, match=r"entropy_tracking: run_config.json: run configuration version 2"):
        load_run(str(tmp_path))


def test_the_script_fingerprint_is_the_run_configs_settings(tmp_path):
    """The script builds its configuration as a RunConfig; its fingerprint is that config's settings, and the
    run directory holds the same values, completed (never contradicted) by the callback."""
    from script_args import script_argv, write_script_inputs

    import run_glue_entropy as script

    (tmp_path / "inputs").mkdir()
    inputs = write_script_inputs(tmp_path / "inputs")
    argv = script_argv(inputs["bert"], inputs["chaosnli"], inputs["bulk"], tmp_path / "out")
    config = script.build_run_config(*script.parse_args(argv))
    assert isinstance(config, RunConfig) and "run_name" not in config.fingerprint()
    script.main(argv)
    stored = json.load(open(tmp_path / "out" / "run_fingerprint.json"))["config"]
    assert stored == json.loads(json.dumps(config.fingerprint()))
    recorded = load_run(str(tmp_path / "out")).run_config
    for key, value in stored.items():
        if value is not None:  # None = "the default": the callback records what the default was
            assert json.loads(json.dumps(getattr(recorded, key))) == value, key
    assert recorded.target_modules == ["query", "value"] and recorded.model_type == "bert"
    # What the tracker records (the script passes a RunConfig whose unset fields are None) is kept.
    assert recorded.label_names == ["entailment", "neutral", "contradiction"] and recorded.num_labels == 3
    assert recorded.thresholds is not None and recorded.max_length == 32 and recorded.tracked_loss
