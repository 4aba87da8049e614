"""The prepared-data cache follows the files it was built from: edit a released file and the next read sees it."""

import json
import os
import shutil

import pytest
from conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/dss is not beside the repo")


def _count(data_dir, split):
    from dss_jax.tasks import tfds_builder

    b = tfds_builder.builder("svamp", data_dir)
    return sum(1 for _ in b.as_dataset(split=split)), {r["label"].decode() for r in b.as_dataset(split=split).as_numpy_iterator()}


def test_edited_data_dir_is_prepared_anew(tmp_path, monkeypatch):
    monkeypatch.setenv("DSS_TFDS_DIR", str(tmp_path / "tfds"))
    data = tmp_path / "data"
    shutil.copytree(SHARED_DATA / "svamp", data / "svamp")
    n, _ = _count(data, "test")
    assert n == 200
    gold = data / "svamp" / "svamp_test.json"
    lines = gold.read_text().splitlines()[:100]
    row = json.loads(lines[0])
    row["label"] = "( 123456.0 + 1.0 )"
    gold.write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    comps = data / "svamp" / "llm" / "test_CoT_0.json"
    comps.write_text(json.dumps(json.loads(comps.read_text())[:100]))
    os.utime(gold)
    n, labels = _count(data, "test")
    assert n == 100 and "( 123456.0 + 1.0 )" in labels
