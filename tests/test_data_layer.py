"""Readers, TFDS builder, SeqIO tasks and mixtures on the paper's released data, and dss-data."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SHARED_DATA, write_toy_jsonl

from dss_jax.tasks import readers

pytestmark = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data/dss is not beside the repo")


def test_split_sizes_match_the_paper():
    sizes = {
        (b, s): len(readers.read_split(SHARED_DATA, b, s)) for b in ("cqa", "svamp") for s in ("train", "validation", "test")
    }
    assert sizes == {
        ("cqa", "train"): 8766,
        ("cqa", "validation"): 975,
        ("cqa", "test"): 1221,
        ("svamp", "train"): 720,
        ("svamp", "validation"): 80,
        ("svamp", "test"): 200,
    }


def test_esnli_split_sizes_and_teacher_accuracy_match_the_shared_readme():
    """../shared's e-SNLI is the authors' validation split re-split 7842 / 1000 / 1000 (its README)."""
    splits = {s: readers.read_split(SHARED_DATA, "esnli", s) for s in ("train", "validation", "test")}
    assert {s: len(x) for s, x in splits.items()} == {"train": 7842, "validation": 1000, "test": 1000}
    acc = {s: 100.0 * sum(e.llm_label == e.label for e in x) / len(x) for s, x in splits.items()}
    assert acc == pytest.approx({"train": 73.12, "validation": 73.10, "test": 73.60}, abs=0.01)


def test_carved_validation_is_deterministic_and_disjoint():
    tr = {e.idx for e in readers.read_split(SHARED_DATA, "svamp", "train")}
    va = {e.idx for e in readers.read_split(SHARED_DATA, "svamp", "validation")}
    assert not tr & va and len(tr | va) == 800
    assert va == {e.idx for e in readers.read_split(SHARED_DATA, "svamp", "validation")}


def test_inputs_are_formatted_as_the_paper_does():
    e = readers.read_split(SHARED_DATA, "cqa", "test")[0]
    assert e.input.count("\n(") == 5 and "\nAnswer Choices:\n(a) " in e.input
    assert e.has_teacher and e.rationale and e.llm_label
    nli = readers.read_split(SHARED_DATA, "esnli", "validation")
    assert nli[0].input_b and {e.label for e in nli} == {"entailment", "neutral", "contradiction"}
    anli = readers.read_split(SHARED_DATA, "anli1", "validation")
    assert len(anli) == 16 and all(e.parse_ok for e in anli)


def _copy_bench(tmp_path, bench, disk_split, n_lines=None, completions=None):
    d = tmp_path / bench
    (d / "llm").mkdir(parents=True)
    lines = (SHARED_DATA / bench / f"{bench}_{disk_split}.json").read_text().splitlines()[:n_lines]
    (d / f"{bench}_{disk_split}.json").write_text("\n".join(lines) + "\n")
    comps = (
        completions
        if completions is not None
        else json.loads((SHARED_DATA / bench / "llm" / f"{disk_split}_CoT_0.json").read_text())[: len(lines)]
    )
    (d / "llm" / f"{disk_split}_CoT_0.json").write_text(json.dumps(comps))
    return d


def test_malformed_line_missing_field_and_count_mismatch_name_file_and_line(tmp_path):
    d = _copy_bench(tmp_path, "anli1", "valid", 5)
    gold = d / "anli1_valid.json"
    lines = gold.read_text().splitlines()
    gold.write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]) + "\n")
    with pytest.raises(readers.DataFormatError, match=r"anli1_valid.json:3: malformed JSON"):
        readers.read_disk_split(tmp_path, "anli1", "valid")
    row = json.loads(lines[2])
    del row["hypothesis"]
    gold.write_text("\n".join(lines[:2] + [json.dumps(row)] + lines[3:]) + "\n")
    with pytest.raises(readers.DataFormatError, match=r"anli1_valid.json:3: missing field\(s\) \['hypothesis'\]"):
        readers.read_disk_split(tmp_path, "anli1", "valid")
    gold.write_text("\n".join(lines) + "\n")
    (d / "llm" / "valid_CoT_0.json").write_text(json.dumps(["x"] * 4))
    with pytest.raises(readers.DataFormatError, match=r"valid_CoT_0.json: 4 completions, but .*anli1_valid.json has 5 lines"):
        readers.read_disk_split(tmp_path, "anli1", "valid")


def test_unparsed_completions_are_counted_and_kept_empty(tmp_path):
    comps = json.loads((SHARED_DATA / "esnli" / "llm" / "valid_CoT_0.json").read_text())[:6]
    comps[1] = ""
    comps[4] = "rambling without a verdict"
    _copy_bench(tmp_path, "esnli", "valid", 6, comps)
    ex = readers.read_disk_split(tmp_path, "esnli", "valid")
    assert [e.parse_ok for e in ex] == [True, False, True, True, False, True]
    assert ex[1].llm_label == "" and ex[4].llm_label == ""


def test_user_jsonl_format(tmp_path):
    f = tmp_path / "u.jsonl"
    f.write_text('{"input": "q1", "label": "a"}\n\n{"input": "q2", "label": "b", "rationale": "r", "llm_label": "b"}\n')
    ex = readers.read_user_jsonl(f)
    assert [(e.input, e.label, e.has_teacher) for e in ex] == [("q1", "a", False), ("q2", "b", True)]
    f.write_text('{"input": "q1", "label": 3}\n')
    with pytest.raises(readers.DataFormatError, match="u.jsonl:1: field 'label' must be a string"):
        readers.read_user_jsonl(f)


def test_training_subsets_are_deterministic_nested_fraction():
    a = readers.training_subset(8766, 0.125, 0)
    assert len(a) == round(0.125 * 8766)
    np.testing.assert_array_equal(a, readers.training_subset(8766, 0.125, 0))
    assert not np.array_equal(a, readers.training_subset(8766, 0.125, 1))


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    import os

    os.environ.setdefault("DSS_TFDS_DIR", str(tmp_path_factory.mktemp("tfds")))
    from dss_jax.tasks import registry, vocab

    v = vocab.get_vocabulary(train_on="svamp", vocab_size=800)
    full = registry.DataOptions(train_fraction=1.0)
    names = registry.register_benchmark("cqa", v, str(SHARED_DATA), options=full)
    names += registry.register_benchmark("svamp", v, str(SHARED_DATA), options=full)
    return v, names


@pytest.mark.slow
def test_every_kind_of_task_and_mixture_iterates_through_the_feature_converters(registered):
    from dss_jax.tasks import pipeline

    v, names = registered
    assert len(names) == 2 * 11
    kinds = [n.removeprefix("cqa") for n in names[:11]]
    assert kinds == [n.removeprefix("svamp") for n in names[11:]]
    # each kind once, from CQA and SVAMP in turn, packed for two kinds then unpacked for two: every kind iterates,
    # and each benchmark goes through both feature converters (a benchmark's tasks share its reader and parser)
    for i, kind in enumerate(kinds):
        name, pack = ("cqa", "svamp")[i % 2] + kind, i // 2 % 2 == 0
        # validation: the same preprocessors and converter as train, without filling a training shuffle buffer
        ds = pipeline.get_dataset(name, "validation", 128, 64, 4, pack=pack, shuffle=True, seed=0, num_epochs=None)
        b = next(iter(ds))
        assert b["encoder_input_tokens"].shape == (4, 128) and b["decoder_task_ids"].shape == (4, 64)
        tids = set(np.unique(b["decoder_task_ids"].numpy())) - {0}
        if "_dss_" in name or name.endswith("rationale"):
            assert tids <= {1, 2} and (2 in tids or name.endswith("_rates"))
        else:
            assert tids == {1}
        if pack:
            assert b["decoder_segment_ids"].numpy().max() >= 1


def test_paired_task_puts_both_targets_of_an_input_side_by_side(registered):
    from dss_jax.tasks import pipeline

    v, _ = registered
    b = next(iter(pipeline.get_dataset("cqa_dss_gold", "train", 128, 64, 8, pack=False, shuffle=True, seed=3, num_epochs=None)))
    enc = b["encoder_input_tokens"].numpy()
    for i in range(0, 8, 2):
        a, r = v.decode(enc[i].tolist()), v.decode(enc[i + 1].tolist())
        assert a.startswith("predict:") and r.startswith("explain:")
        assert a[len("predict:") :].strip() == r[len("explain:") :].strip()
    assert list(b["decoder_task_ids"].numpy()[:, 0]) == [1, 2] * 4


def _reregister_svamp(v, **options):
    from dss_jax.tasks import registry

    registry.register_benchmark("svamp", v, str(SHARED_DATA), options=registry.DataOptions(**options))


def test_data_fraction_is_a_data_option_and_identical_across_methods(registered):
    import tensorflow as tf

    from dss_jax.tasks import pipeline

    v, _ = registered
    _reregister_svamp(v, train_fraction=0.125)
    try:

        def inputs(name):
            ds = pipeline.get_dataset(name, "train", 128, 64, 1, pack=False, shuffle=False, seed=0, num_epochs=1)
            return [tuple(x["encoder_input_tokens"].numpy()[0]) for x in ds]

        fin = inputs("svamp_finetune")
        dist = inputs("svamp_distill")
        assert len(fin) == round(0.125 * 720) == len(dist)
        assert fin == dist
    finally:
        _reregister_svamp(v, train_fraction=1.0)
    assert isinstance(tf.data.Dataset, type)


def test_nli_inputs_join_premise_and_hypothesis_with_eos(tmp_path):
    import os

    os.environ.setdefault("DSS_TFDS_DIR", str(tmp_path / "tfds"))
    from dss_jax.tasks import pipeline, registry, vocab

    v = vocab.get_vocabulary(train_on="svamp", vocab_size=800)
    registry.register_benchmark("esnli", v, str(SHARED_DATA), options=registry.DataOptions(train_fraction=1.0))
    ex = pipeline.eval_examples("esnli_label_gold", "validation")
    assert len(ex) == 1000
    # the hypothesis survives tokenization as text, so predictions files can show the whole input
    first = readers.read_split(SHARED_DATA, "esnli", "validation")
    assert {e["input_b_pretokenized"].decode() for e in ex} == {e.input_b for e in first}
    toks = list(ex[0]["inputs"])
    assert toks.count(v.eos_id) == 2  # the join and the end


@pytest.mark.slow
def test_dss_data_cli_prints_counts_and_teacher_accuracy():
    r = subprocess.run(
        [sys.executable, "-m", "dss_jax.tasks.data_stats", "--benchmark", "cqa", "svamp", "--json"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "DSS_DATA_DIR": str(SHARED_DATA)},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = {(x["benchmark"], x["split"]): x for x in json.loads(r.stdout)}
    assert rows[("cqa", "train")]["examples"] == 8766 and rows[("svamp", "test")]["examples"] == 200
    assert 60 < rows[("cqa", "test")]["teacher_accuracy"] < 90
    assert rows[("cqa", "train")]["parse_failures"] > 0


@pytest.mark.slow
def test_dss_data_cli_names_a_bad_file(tmp_path):
    f = write_toy_jsonl(tmp_path / "t.jsonl", 3)
    f.write_text(f.read_text() + "{oops\n")
    r = subprocess.run(
        [sys.executable, "-m", "dss_jax.tasks.data_stats", "--user_jsonl", str(f)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "t.jsonl:4: malformed JSON" in r.stderr


def test_parse_failure_policy_drop_leaves_out_exactly_the_unparsed(registered):
    from dss_jax.tasks import pipeline

    def count(name):
        ds = pipeline.get_dataset(
            name, "validation", 128, 64, 64, pack=False, shuffle=False, seed=0, num_epochs=1, drop_remainder=False
        )
        return sum(int(b["encoder_input_tokens"].shape[0]) for b in ds)

    v, _ = registered
    kept = count("svamp_rationale")
    _reregister_svamp(v, on_parse_failure="drop")
    try:
        dropped = count("svamp_rationale")
    finally:
        _reregister_svamp(v, on_parse_failure="keep")
    failures = sum(not e.parse_ok for e in readers.read_split(SHARED_DATA, "svamp", "validation"))
    assert kept == 80 and failures > 0 and dropped == kept - failures


def test_rationale_quality_options_keep_the_label_and_drop_only_the_rationale(registered):
    """teacher_correct + a length cap: the rationale examples are exactly the kept rows', every input keeps its
    label example in the paired DSS task, and dss-data's counts say how many each rule dropped."""
    from dss_jax.tasks import pipeline, registry, sources

    v, _ = registered
    train = readers.read_split(SHARED_DATA, "svamp", "train")
    opts = registry.DataOptions(rationale_filter="teacher_correct", max_rationale_tokens=64)
    keep, _, counts = sources.select_rationales("svamp", train, opts, v)
    assert counts["dropped_teacher_wrong"] > 100 and counts["dropped_too_long"] > 0
    assert (
        counts["kept"]
        == int(keep.sum())
        == counts["with_rationale"] - counts["dropped_teacher_wrong"] - counts["dropped_too_long"]
    )

    def targets(name, task_id=None):
        ds = pipeline.get_dataset(name, "train", 128, 128, 1, pack=False, shuffle=False, seed=0, num_epochs=1)
        rows = [(x["decoder_task_ids"].numpy()[0, 0], x["decoder_target_tokens"].numpy()[0]) for x in ds]
        return [v.decode([int(t) for t in toks if t > 1]) for tid, toks in rows if task_id in (None, tid)]

    _reregister_svamp(v, rationale_filter="teacher_correct", max_rationale_tokens=64)
    try:
        rationales = targets("svamp_rationale")
        paired_labels = targets("svamp_dss_gold", task_id=1)
        paired_rationales = targets("svamp_dss_gold", task_id=2)
    finally:
        _reregister_svamp(v)
    want = [v.decode(v.encode(e.rationale)[:127]) for e, k in zip(train, keep, strict=True) if k]
    assert sorted(rationales) == sorted(paired_rationales) == sorted(want)  # (TFDS stores rows in its own order)
    assert len(paired_labels) == len(train)  # the label task still sees every input
