import json
import warnings

import numpy as np
import pytest
from conftest import write_jsonl

from hf_entropy_callback import load_chaosnli
from hf_entropy_callback.data import (
    DataFormatError,
    build_training_set,
    inject_label_noise,
    load_bulk,
    sample_bulk,
    select_composition,
    split_chaosnli,
)


@pytest.fixture
def chaos(chaosnli_file):
    return load_chaosnli(chaosnli_file)


def test_split_is_stratified_and_deterministic(chaos):
    a = split_chaosnli(chaos, 0.2, seed=3)
    b = split_chaosnli(chaos, 0.2, seed=3)
    c = split_chaosnli(chaos, 0.2, seed=4)
    assert a["validation"]["uid"] == b["validation"]["uid"]
    assert a["validation"]["uid"] != c["validation"]["uid"]
    assert set(a["train"]["uid"]).isdisjoint(a["validation"]["uid"])
    assert len(a["train"]) + len(a["validation"]) == len(chaos)
    cats = np.asarray(chaos["category"])
    val_cats = np.asarray(a["validation"]["category"])
    for cat in set(cats):
        assert (val_cats == cat).sum() == round(0.2 * (cats == cat).sum())
    with pytest.raises(ValueError):
        split_chaosnli(chaos, 1.0)


def _bulk_file(tmp_path, n=50, with_missing=True):
    names = ["entailment", "neutral", "contradiction"]
    recs = [{"id": f"b{i}", "premise": f"P{i}", "hypothesis": f"H{i}", "label": names[i % 3]} for i in range(n)]
    if with_missing:
        recs.append({"id": "nogold", "premise": "x", "hypothesis": "y", "label": "-"})
        recs.append({"id": "nogold2", "premise": "x", "hypothesis": "y", "label": -1})
    return write_jsonl(tmp_path / "bulk.jsonl", recs)


def test_load_bulk_formats_and_drops_no_gold(tmp_path):
    ds = load_bulk(_bulk_file(tmp_path))
    assert len(ds) == 50 and ds["label"][:3] == [0, 1, 2]
    assert "2 without a gold label dropped" in ds.info.description
    csv_path = tmp_path / "bulk.csv"
    csv_path.write_text("sentence1,sentence2,label\na,b,1\nc,d,contradiction\ne,f,-\n")
    ds = load_bulk(str(csv_path))
    assert ds["label"] == [1, 2] and ds["premise"] == ["a", "c"]
    json_path = tmp_path / "bulk.json"
    json_path.write_text(json.dumps([{"premise": "a", "hypothesis": "b", "label": 0}]))
    assert load_bulk(str(json_path))["label"] == [0]


def test_load_bulk_errors_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"premise": "a", "hypothesis": "b", "label": "maybe"}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl, line 1: unknown label 'maybe'"):
        load_bulk(path)
    path = write_jsonl(tmp_path / "bad2.jsonl", [{"premise": "a", "label": 0}])
    with pytest.raises(DataFormatError, match=r"bad2.jsonl, line 1: missing hypothesis"):
        load_bulk(path)
    path = write_jsonl(tmp_path / "bad3.jsonl", [{"premise": "a", "hypothesis": "b", "label": 7}])
    with pytest.raises(DataFormatError, match="outside 0..2"):
        load_bulk(path)
    with pytest.raises(FileNotFoundError):
        load_bulk(str(tmp_path / "missing.jsonl"))


def test_sample_bulk_deterministic_and_warns(tmp_path):
    ds = load_bulk(_bulk_file(tmp_path))
    a, b = sample_bulk(ds, 20, seed=1), sample_bulk(ds, 20, seed=1)
    assert a["id"] == b["id"] and len(set(a["id"])) == 20
    assert sample_bulk(ds, 20, seed=2)["id"] != a["id"]
    with pytest.warns(UserWarning, match="only 50 exist"):
        assert len(sample_bulk(ds, 100)) == 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(sample_bulk(ds, 50)) == 50


def test_compositions(chaos):
    assert len(select_composition(chaos, "all")) == len(chaos)
    assert set(select_composition(chaos, "low")["category"]) == {"clean"}
    assert set(select_composition(chaos, "high")["category"]) == {"contested"}
    bal = select_composition(chaos, "balanced", seed=0)
    counts = {c: bal["category"].count(c) for c in ("clean", "ambiguous", "contested")}
    assert len(set(counts.values())) == 1
    assert select_composition(chaos, "balanced", seed=0)["uid"] == bal["uid"]
    with pytest.raises(ValueError):
        select_composition(chaos, "medium")


def test_label_noise_share_and_determinism(chaos):
    clean = np.asarray(chaos["category"]) == "clean"
    out = inject_label_noise(chaos, 0.6, seed=5)
    noised = np.asarray(out["noised"])
    assert noised.sum() == round(0.6 * clean.sum())
    assert not noised[~clean].any()
    assert out["original_label"] == chaos["label"]
    changed = np.asarray(out["label"]) != np.asarray(chaos["label"])
    assert not changed[~noised].any()
    assert inject_label_noise(chaos, 0.6, seed=5)["label"] == out["label"]
    strict = inject_label_noise(chaos, 0.6, seed=5, exclude_original=True)
    assert (np.asarray(strict["label"])[noised] != np.asarray(chaos["label"])[noised]).all()
    with pytest.raises(ValueError):
        inject_label_noise(chaos, 1.5)


def test_label_noise_is_uniform():
    import datasets

    n = 30000
    ds = datasets.Dataset.from_dict({"label": [0] * n, "category": ["clean"] * n})
    labels = np.asarray(inject_label_noise(ds, 1.0, seed=0)["label"])
    freq = np.bincount(labels, minlength=3) / n
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.015)


def test_build_training_set(chaos, tmp_path):
    bulk = load_bulk(_bulk_file(tmp_path))
    train = split_chaosnli(chaos)["train"]
    ds = build_training_set(train, bulk)
    assert len(ds) == len(train) + len(bulk)
    assert sum(ds["tracked"]) == len(train)
    assert len(set(ds["example_id"])) == len(ds)
    assert ds["example_id"][0] == "chaosnli:" + train["uid"][0]
    bulk_rows = ds.filter(lambda r: not r["tracked"])
    assert set(bulk_rows["category"]) == {"bulk"} and np.isnan(bulk_rows["entropy"]).all()
    assert build_training_set(train)["example_id"] == ds["example_id"][: len(train)]
