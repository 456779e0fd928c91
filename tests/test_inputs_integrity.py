"""Bad and unusual input files: gzip, encodings, BOM, delimiters, null / empty text, corrupt run files,
file modes and leftovers of killed writes. Every fixture is generated here."""

import gzip
import json
import os
import stat

import numpy as np
import pandas as pd
import pytest
from conftest import chaosnli_record, synthetic_chaosnli, write_jsonl

from hf_entropy_callback import ChaosNLIFormatError, load_chaosnli
from hf_entropy_callback.data import DataFormatError, load_bulk, sample_bulk, split_chaosnli
from hf_entropy_callback.runs import RunFormatError, load_run, write_json_atomic, write_run

NAMES = ("entailment", "neutral", "contradiction")


def _bulk_records(n=6):
    return [
        {"id": f"b{i}", "premise": f"premise {i}", "hypothesis": f"hypothesis {i}", "label": NAMES[i % 3]}
        for i in range(n)
    ]


def _gzip(src, dst):
    with open(src, "rb") as fh:
        data = fh.read()
    with open(dst, "wb") as fh:
        fh.write(gzip.compress(data))
    return str(dst)


# ------------------------------------------------------------------------------------------------
# gzip
# ------------------------------------------------------------------------------------------------


def test_chaosnli_gzip_with_and_without_suffix(tmp_path):
    plain = write_jsonl(tmp_path / "chaos.jsonl", synthetic_chaosnli(12))
    expected = load_chaosnli(plain)
    for name in ("chaos.jsonl.gz", "chaos_gzipped.jsonl"):  # the second is gzip without the suffix
        ds = load_chaosnli(_gzip(plain, tmp_path / name))
        assert ds["uid"] == expected["uid"] and ds["entropy"] == expected["entropy"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv"])
def test_bulk_gzip_each_format(tmp_path, fmt):
    recs = _bulk_records()
    src = tmp_path / f"bulk.{fmt}"
    if fmt == "jsonl":
        write_jsonl(src, recs)
    elif fmt == "json":
        src.write_text(json.dumps(recs))
    else:
        pd.DataFrame(recs).to_csv(src, sep="," if fmt == "csv" else "\t", index=False)
    ds = load_bulk(_gzip(src, tmp_path / f"bulk.{fmt}.gz"))
    assert ds["premise"] == [r["premise"] for r in recs] and ds["label"] == [0, 1, 2, 0, 1, 2]
    # ids generated from the name drop ".gz" as well as the format suffix
    no_ids = [{k: v for k, v in r.items() if k != "id"} for r in recs]
    write_jsonl(tmp_path / "noid.jsonl", no_ids)
    assert load_bulk(_gzip(tmp_path / "noid.jsonl", tmp_path / "noid.jsonl.gz"))["id"][0] == "noid-0"


def test_bulk_gzip_without_suffix_and_missing_gz_path(tmp_path):
    src = write_jsonl(tmp_path / "plain.jsonl", _bulk_records())
    disguised = _gzip(src, tmp_path / "bulk.jsonl")
    assert len(load_bulk(disguised)) == 6
    # a missing .gz file is a missing file, not a hub id
    with pytest.raises(FileNotFoundError, match="missing.csv.gz"):
        load_bulk(str(tmp_path / "missing.csv.gz"))


def test_truncated_gzip_names_the_file(tmp_path):
    src = write_jsonl(tmp_path / "plain.jsonl", synthetic_chaosnli(40))
    data = gzip.compress(open(src, "rb").read())
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChaosNLIFormatError, match=r"cut\.jsonl\.gz, line \d+: damaged gzip"):
        load_chaosnli(str(bad))


# ------------------------------------------------------------------------------------------------
# encodings and BOM
# ------------------------------------------------------------------------------------------------


def test_latin1_chaosnli_names_file_line_and_encoding(tmp_path):
    recs = [json.dumps(r, ensure_ascii=False) for r in synthetic_chaosnli(3)]
    recs.append(json.dumps(chaosnli_record("cafe", [90, 5, 5], premise="un caf\u00e9 cr\u00e8me"), ensure_ascii=False))
    path = tmp_path / "latin.jsonl"
    path.write_bytes("\n".join(recs).encode("latin-1"))
    with pytest.raises(ChaosNLIFormatError) as err:
        load_chaosnli(str(path))
    msg = str(err.value)
    assert "latin.jsonl, line 4" in msg and "not UTF-8" in msg and "0xe9" in msg


@pytest.mark.parametrize("name", ["latin.csv", "latin.jsonl"])
def test_latin1_bulk_names_file_line_and_encoding(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        text = "premise,hypothesis,label\na,b,0\ncaf\u00e9,d,1\n"
    else:
        text = "\n".join(
            json.dumps(r, ensure_ascii=False)
            for r in [
                {"premise": "a", "hypothesis": "b", "label": 0},
                {"premise": "caf\u00e9", "hypothesis": "d", "label": 1},
            ]
        )
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(
        DataFormatError,
        match=rf"{name}, line 3: .*not UTF-8" if name.endswith(".csv") else rf"{name}, line 2: .*not UTF-8",
    ):
        load_bulk(str(path))


def test_utf8_bom_is_accepted(tmp_path):
    chaos = tmp_path / "bom.jsonl"
    chaos.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in synthetic_chaosnli(6)).encode())
    assert len(load_chaosnli(str(chaos))) == 6
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + "premise,hypothesis,label\nA man sleeps,Someone rests,0\n".encode())
    ds = load_bulk(str(csv_path))
    assert ds["premise"] == ["A man sleeps"] and ds["label"] == [0]
    jl = tmp_path / "bom.jsonl"
    jl.write_bytes(b"\xef\xbb\xbf" + json.dumps({"premise": "a", "hypothesis": "b", "label": 2}).encode() + b"\n")
    assert load_bulk(str(jl))["label"] == [2]


# ------------------------------------------------------------------------------------------------
# CSV delimiter (not guessed: a clear error naming the header)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sep,name,looks",
    [(";", "semi.csv", "';'-separated"), ("\t", "tabs.csv", "tab-separated"), (",", "commas.tsv", "','-separated")],
)
def test_other_delimiter_is_an_error_naming_the_header(tmp_path, sep, name, looks):
    path = tmp_path / name
    path.write_text(sep.join(["premise", "hypothesis", "label"]) + "\n" + sep.join(["a", "b", "0"]) + "\n")
    with pytest.raises(DataFormatError) as err:
        load_bulk(str(path))
    msg = str(err.value)
    assert f"{name}, line 1" in msg and "header" in msg and "premise" in msg
    assert "expected columns premise" in msg and looks in msg


# ------------------------------------------------------------------------------------------------
# null / empty text
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,word", [(None, "null"), ("", "empty"), ("   ", "empty")])
@pytest.mark.parametrize("field", ["premise", "hypothesis"])
def test_null_or_empty_chaosnli_text(tmp_path, field, value, word):
    recs = synthetic_chaosnli(3)
    recs[1]["example"][field] = value
    path = write_jsonl(tmp_path / "chaos.jsonl", recs)
    with pytest.raises(ChaosNLIFormatError, match=rf"chaos\.jsonl, line 2: field 'example\.{field}' is {word}"):
        load_chaosnli(path)


@pytest.mark.parametrize("value,word", [(None, "null"), ("", "empty")])
@pytest.mark.parametrize("field", ["premise", "sentence2"])
def test_null_or_empty_bulk_text(tmp_path, field, value, word):
    recs = [
        {
            "sentence1" if field == "sentence2" else "premise": f"p{i}",
            "sentence2" if field == "sentence2" else "hypothesis": f"h{i}",
            "label": i % 3,
        }
        for i in range(4)
    ]
    recs[2][field] = value
    path = write_jsonl(tmp_path / "bulk.jsonl", recs)
    with pytest.raises(DataFormatError, match=rf"bulk\.jsonl, line 3: field '{field}'.* is {word}"):
        load_bulk(path)


def test_empty_csv_cell_and_no_gold_rows(tmp_path):
    path = tmp_path / "bulk.csv"
    path.write_text("premise,hypothesis,label\na,b,0\nc,,1\n")
    with pytest.raises(DataFormatError, match=r"bulk\.csv, line 3: field 'hypothesis' is empty"):
        load_bulk(str(path))
    # a row without a gold label is dropped whatever its text
    path.write_text("premise,hypothesis,label\na,b,0\n,,-\n")
    assert load_bulk(str(path))["premise"] == ["a"]


# ------------------------------------------------------------------------------------------------
# parameters of the data recipe
# ------------------------------------------------------------------------------------------------


def test_sample_bulk_and_split_parameters(tmp_path):
    bulk = load_bulk(write_jsonl(tmp_path / "bulk.jsonl", _bulk_records()))
    with pytest.raises(ValueError, match=r"sample_bulk: n .* must be >= 0, got -1"):
        sample_bulk(bulk, -1)
    with pytest.raises(ValueError, match=r"sample_bulk: n .* must be an integer"):
        sample_bulk(bulk, 2.5)
    assert len(sample_bulk(bulk, 0)) == 0
    chaos = load_chaosnli(write_jsonl(tmp_path / "chaos.jsonl", synthetic_chaosnli(30)))
    for bad in (0.0, 1.0, -0.2, 1.5, float("nan"), "0.2"):
        with pytest.raises(ValueError, match="split_chaosnli: val_fraction"):
            split_chaosnli(chaos, bad)


# ------------------------------------------------------------------------------------------------
# run files: corruption, modes, leftovers
# ------------------------------------------------------------------------------------------------


def _write_tiny_run(path, config=None, loss_scale=1.0):
    n_points, n = 3, 4
    examples = pd.DataFrame(
        {
            "example_id": [f"chaosnli:u{i}" for i in range(n)],
            "set": "train",
            "index": range(n),
            "entropy": np.linspace(0.1, 1.0, n),
            "category": ["clean", "ambiguous", "contested", "contested"],
            "label": [0, 1, 2, 0],
            "label_counts": [[90, 5, 5]] * n,
            "token_length": 10,
            "noised": False,
        }
    )
    points = pd.DataFrame(
        {
            "point": range(n_points),
            "step": [0, 5, 10],
            "epoch": [0.0, 0.5, 1.0],
            "reason": ["step0", "interval", "final"],
        }
    )
    logits = np.random.default_rng(0).normal(size=(n_points, n, 3)) * loss_scale
    logp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    return write_run(str(path), config or {"seed": 1}, examples, points, {"train": logp})


def _flip_position(path: str, data: bytes) -> int:
    """A byte whose flip a reader can notice: inside a parquet data page (values under the page CRC), the
    middle of the npz (array data under the zip CRC), a JSON delimiter (a flip inside a JSON string
    cannot be told from other text)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        col = pq.ParquetFile(path).metadata.row_group(0).column(0)
        start = col.dictionary_page_offset or col.data_page_offset
        return start + col.total_compressed_size - 2
    if path.endswith(".json"):
        return data.index(b":")
    return len(data) // 2


def _corrupt(path: str, kind: str) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "bit_flip":
        i = _flip_position(path, data)
        data = data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]
    else:
        data = np.random.default_rng(7).integers(0, 256, size=len(data), dtype=np.uint8).tobytes()
    with open(path, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize("kind", ["truncated", "bit_flip", "random_bytes"])
@pytest.mark.parametrize("name", ["logprobs.npz", "examples.parquet", "points.parquet", "run_config.json"])
def test_corrupt_run_file_names_run_and_file(tmp_path, name, kind):
    tdir = _write_tiny_run(tmp_path / "run_a" / "entropy_tracking")
    _corrupt(os.path.join(tdir, name), kind)
    with pytest.raises(RunFormatError) as err:
        load_run(tdir)
    msg = str(err.value)
    assert tdir in msg and name in msg
    assert "allow_pickle" not in msg and "pickle" not in msg


def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tdir = _write_tiny_run(tmp_path / "run" / "entropy_tracking")
        write_json_atomic(os.path.join(tdir, "summary.json"), {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tdir).st_mode) == 0o755
    for name in ("run_config.json", "examples.parquet", "points.parquet", "logprobs.npz", "summary.json"):
        assert stat.S_IMODE(os.stat(os.path.join(tdir, name)).st_mode) == 0o644, name
    old = os.umask(0o077)
    try:
        tdir = _write_tiny_run(tmp_path / "private" / "entropy_tracking")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tdir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(tdir, "run_config.json")).st_mode) == 0o600


def test_leftovers_of_a_killed_write_are_cleaned_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    left = [
        out / ".entropy_tracking.tmp-xyz",
        out / ".entropy_tracking.old-abc12_q",
        out / ".entropy_tracking.tmp-4242-k9",
    ]
    for d in left:
        d.mkdir()
        (d / "run_config.json").write_text("{}")
    keep = [
        out / ".other.tmp-xyz",
        out / "entropy_tracking.tmp-xyz",
        out / ".entropy_tracking.tmp-x.y",
        out / "notes.txt",
    ]
    keep[0].mkdir()
    keep[1].mkdir()
    keep[2].mkdir()
    keep[3].write_text("mine")
    _write_tiny_run(out / "entropy_tracking")
    for d in left:
        assert not d.exists(), d
    for d in keep:
        assert d.exists(), d
    assert sorted(os.listdir(out)) == sorted(
        [".entropy_tracking.tmp-x.y", ".other.tmp-xyz", "entropy_tracking", "entropy_tracking.tmp-xyz", "notes.txt"]
    )
    assert load_run(str(out))


def test_leftover_of_a_live_writer_is_kept(tmp_path):
    out = tmp_path / "out"
    live = out / f".entropy_tracking.tmp-{os.getppid()}-abcd1234"
    live.mkdir(parents=True)
    _write_tiny_run(out / "entropy_tracking")
    assert live.exists()
