import json
import os
import zipfile

import numpy as np
import pytest
from conftest import CHAOSNLI_DIR, chaosnli_record, requires_shared_chaosnli, synthetic_chaosnli, write_jsonl
from scipy.stats import entropy as scipy_entropy

from hf_entropy_callback import ChaosNLIFormatError, category_table, load_chaosnli


def test_columns_and_values(chaosnli_file):
    ds = load_chaosnli(chaosnli_file)
    assert set(ds.column_names) >= {
        "uid",
        "premise",
        "hypothesis",
        "label",
        "label_counts",
        "entropy",
        "category",
        "subset",
    }
    assert len(ds) == 60
    counts = np.asarray(ds["label_counts"])
    np.testing.assert_allclose(ds["entropy"], scipy_entropy(counts, axis=1))
    assert ds["label"] == np.argmax(counts, axis=1).tolist()
    assert set(ds["category"]) == {"clean", "ambiguous", "contested"}
    assert set(ds["subset"]) == {"snli"}
    assert ds.features["label"].names == ["entailment", "neutral", "contradiction"]


def test_tie_uses_majority_label(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chaosnli_record("a", [10, 45, 45], majority="c")])
    assert load_chaosnli(path)["label"] == [2]


def test_zip_archive(tmp_path):
    z = tmp_path / "chaosNLI_v1.0.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("chaosNLI_v1.0/chaosNLI_snli.jsonl", "\n".join(json.dumps(r) for r in synthetic_chaosnli(12)))
        mnli = [chaosnli_record(f"m{i}", [60, 30, 10], source="mnli_agree_3") for i in range(5)]
        zf.writestr("chaosNLI_v1.0/chaosNLI_mnli_m.jsonl", "\n".join(json.dumps(r) for r in mnli))
    assert len(load_chaosnli(str(z), subset="snli")) == 12
    m = load_chaosnli(str(z), subset="mnli_m")
    assert len(m) == 5 and set(m["subset"]) == {"mnli"}
    with pytest.raises(ValueError, match="several ChaosNLI subsets"):
        load_chaosnli(str(z))


def _bad_line_error(tmp_path, line):
    good = [json.dumps(r) for r in synthetic_chaosnli(3)]
    path = write_jsonl(tmp_path / "bad.jsonl", good + [line])
    with pytest.raises(ChaosNLIFormatError) as err:
        load_chaosnli(path)
    msg = str(err.value)
    assert "bad.jsonl" in msg and "line 4" in msg
    return msg


def test_malformed_json(tmp_path):
    assert "not valid JSON" in _bad_line_error(tmp_path, '{"uid": "x", ')


def test_missing_fields(tmp_path):
    rec = chaosnli_record("x", [90, 5, 5])
    del rec["label_counter"], rec["label_count"]
    assert "label_counter" in _bad_line_error(tmp_path, json.dumps(rec))
    rec = chaosnli_record("x", [90, 5, 5])
    del rec["example"]["hypothesis"]
    assert "example.hypothesis" in _bad_line_error(tmp_path, json.dumps(rec))
    rec = chaosnli_record("x", [90, 5, 5])
    del rec["uid"]
    assert "uid" in _bad_line_error(tmp_path, json.dumps(rec))


def test_counts_not_summing_or_empty_or_mismatched(tmp_path):
    assert "sum to 99" in _bad_line_error(tmp_path, json.dumps(chaosnli_record("x", [90, 5, 4])))
    rec = chaosnli_record("x", [90, 5, 5])
    rec["label_counter"], rec["label_count"] = {}, None
    assert "non-empty" in _bad_line_error(tmp_path, json.dumps(rec))
    rec = chaosnli_record("x", [90, 5, 5])
    rec["label_count"] = [5, 90, 5]
    assert "does not match" in _bad_line_error(tmp_path, json.dumps(rec))
    rec = chaosnli_record("x", [0, 0, 0], majority="e")
    assert "empty" in _bad_line_error(tmp_path, json.dumps(rec))


def test_unknown_label_letter(tmp_path):
    rec = chaosnli_record("x", [90, 5, 5])
    rec["label_counter"] = {"e": 90, "n": 5, "x": 5}
    rec.pop("label_count")
    assert "unknown label letter 'x'" in _bad_line_error(tmp_path, json.dumps(rec))
    rec = chaosnli_record("x", [90, 5, 5], majority="q")
    assert "majority_label" in _bad_line_error(tmp_path, json.dumps(rec))


def test_duplicate_uid_and_empty_file(tmp_path):
    assert "already used" in _bad_line_error(tmp_path, json.dumps(chaosnli_record("ex0", [90, 5, 5])))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ChaosNLIFormatError, match="empty.jsonl"):
        load_chaosnli(empty)
    with pytest.raises(FileNotFoundError):
        load_chaosnli(str(tmp_path / "nope.jsonl"))


def test_expected_total_can_be_relaxed(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", [chaosnli_record("x", [3, 1, 1])])
    with pytest.raises(ChaosNLIFormatError):
        load_chaosnli(path)
    assert load_chaosnli(path, expected_total=None)["label_counts"] == [[3, 1, 1]]


def test_category_table(chaosnli_file):
    table = category_table(load_chaosnli(chaosnli_file))
    assert table[table.category == "all"].n.item() == 60
    parts = table[table.category != "all"]
    assert parts.n.sum() == 60 and parts.share.sum() == pytest.approx(1.0)


@requires_shared_chaosnli
@pytest.mark.parametrize("name,rows", [("chaosNLI_snli.jsonl", 1514), ("chaosNLI_mnli_m.jsonl", 1599)])
def test_real_chaosnli(name, rows):
    ds = load_chaosnli(os.path.join(CHAOSNLI_DIR, name))
    assert len(ds) == rows
    counts = np.asarray(ds["label_counts"])
    assert (counts.sum(axis=1) == 100).all()
    for cat in ("clean", "ambiguous", "contested"):
        assert cat in set(ds["category"])
    # the release's own field is the base-2 entropy of the same counts
    with open(os.path.join(CHAOSNLI_DIR, name)) as fh:
        base2 = [json.loads(line)["entropy"] for line in fh]
    np.testing.assert_allclose(np.asarray(ds["entropy"]) / np.log(2), base2, atol=1e-12)
