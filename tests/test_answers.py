"""One answer check per benchmark (tasks/answers.py): SVAMP by value, other labels by normalised text."""

from __future__ import annotations

import pytest

from dss_jax.tasks import answers


def test_svamp_equivalent_equations_are_the_same_answer():
    assert answers.same_answer("svamp", "(8 + 2)", "(2 + 8)")
    assert answers.same_answer("svamp", "( 20.0 / 2.0 )", "10")
    assert not answers.same_answer("svamp", "(8 + 2)", "(8 - 2)")
    assert answers.is_correct("svamp", "( 8.0 + 2.0 )", "(2+8)")
    assert not answers.is_correct("svamp", "( 8.0 + 2.0 )", "(2*8)")


def test_svamp_text_that_does_not_evaluate_is_never_run():
    assert not answers.is_correct("svamp", "( 1.0 + 1.0 )", "__import__('os')")
    assert answers.answer_key("svamp", "  exec( 'x' ) ") == "exec( 'x' )"


def test_labels_compare_by_normalised_text():
    assert answers.same_answer("cqa", "bank  account\n", "bank account")
    assert answers.is_correct("esnli", " entailment", "entailment ")
    assert not answers.is_correct("esnli", "entailment", "Entailment")
    assert not answers.same_answer(None, "yes", "no")


def test_accuracy_in_percent_and_checks_lengths():
    assert answers.accuracy("svamp", ["( 4.0 )"] * 4, ["4", "2+2", "5", "x"]) == 50.0
    assert answers.accuracy("cqa", [], []) == 0.0
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        answers.accuracy(None, ["a", "b"], ["a"])
