import json
import os

import pytest

SHARED_DATA = os.environ.get(
    "HF_ENTROPY_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)
CHAOSNLI_DIR = os.path.join(SHARED_DATA, "chaosnli")


def chaosnli_record(uid, counts, premise="p", hypothesis="h", majority=None, source="snli_agree_3"):
    """A ChaosNLI v1.0 line built from e/n/c counts (fixtures are generated, never copied)."""
    letters = "enc"
    counter = {letters[k]: c for k, c in enumerate(counts) if c}
    if majority is None:
        majority = letters[max(range(3), key=lambda k: counts[k])]
    total = sum(counts)
    return {
        "uid": uid,
        "label_counter": counter,
        "majority_label": majority,
        "label_dist": [c / max(total, 1) for c in counts],
        "label_count": list(counts),
        "entropy": 0.0,
        "example": {"uid": uid, "premise": premise, "hypothesis": hypothesis, "source": source},
        "old_label": majority,
        "old_labels": [],
    }


def write_jsonl(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def synthetic_chaosnli(n=60, seed=0):
    """Records spanning all three entropy categories, deterministic in `seed`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = [(96, 2, 2), (90, 8, 2), (80, 15, 5), (70, 20, 10), (50, 30, 20), (40, 35, 25)]
    records = []
    for i in range(n):
        counts = list(shapes[i % len(shapes)])
        rng.shuffle(counts)
        counts = [int(c) for c in counts]
        records.append(chaosnli_record(f"ex{i}", counts, premise=f"premise {i}", hypothesis=f"hypothesis {i}"))
    return records


@pytest.fixture
def chaosnli_file(tmp_path):
    return write_jsonl(tmp_path / "chaos.jsonl", synthetic_chaosnli())


requires_shared_chaosnli = pytest.mark.skipif(
    not os.path.isdir(CHAOSNLI_DIR), reason=f"real ChaosNLI data not found at {CHAOSNLI_DIR} (../shared/data absent)"
)
