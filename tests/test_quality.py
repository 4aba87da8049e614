"""The rationale-quality rules (tasks/quality.py) on hand-made rows: what each keeps and counts."""

from __future__ import annotations

import pytest

from dss_jax.tasks import quality
from dss_jax.tasks.readers import Example


def _ex(i, inp, label, llm, rationale="because", parse_ok=True):
    return Example(
        idx=i, input=inp, input_b="", label=label, rationale=rationale, llm_label=llm, has_teacher=True, parse_ok=parse_ok
    )


def _same(a, b):
    return a == b


def test_teacher_correct_keeps_rows_whose_teacher_label_is_the_human_one():
    rows = [_ex(0, "a", "yes", "yes"), _ex(1, "b", "yes", "no"), _ex(2, "c", "no", "", parse_ok=False)]
    keep, counts = quality.select_rationales(rows, "teacher_correct", None, _same)
    assert keep.tolist() == [True, False, False]
    assert counts == {"with_rationale": 3, "dropped_teacher_wrong": 2, "kept": 1}


def test_majority_vote_keeps_the_most_common_label_among_an_inputs_samples():
    rows = [
        _ex(0, "q1", "3", "3"),
        _ex(1, "q1", "3", "4"),
        _ex(2, "q1", "3", "4"),  # the teacher's majority is wrong here: still the majority
        _ex(3, "q2", "5", "6"),  # one sample: nothing to vote on, kept
        _ex(4, "q3", "1", "1"),
        _ex(5, "q3", "1", "", parse_ok=False),  # an unparsed sample does not vote and is not the winner
    ]
    keep, counts = quality.select_rationales(rows, "majority_vote", None, _same)
    assert keep.tolist() == [False, True, True, True, True, False]
    assert counts["dropped_minority_vote"] == 2 and counts["kept"] == 4


def test_length_cap_counts_tokens_and_needs_a_tokenizer():
    rows = [_ex(0, "a", "x", "x", "one two"), _ex(1, "b", "x", "x", "one two three four"), _ex(2, "c", "x", "x", "")]
    words = lambda texts: [len(t.split()) + 1 for t in texts]  # noqa: E731  (+1: EOS)
    keep, counts = quality.select_rationales(rows, "all", 3, _same, words)
    assert keep.tolist() == [True, False, False]  # no rationale: neither kept nor counted as dropped
    assert counts == {"with_rationale": 2, "dropped_too_long": 1, "kept": 1}
    with pytest.raises(ValueError, match="vocabulary"):
        quality.select_rationales(rows, "all", 3, _same)
    with pytest.raises(ValueError, match="rationale_filter='best'"):
        quality.select_rationales(rows, "best", None, _same)
