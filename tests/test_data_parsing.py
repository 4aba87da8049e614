"""Completion parsers, the safe arithmetic evaluator and metrics, with adversarial strings."""

import pytest

from dss_jax.tasks import arithmetic, parsers


@pytest.mark.parametrize(
    "completion, rationale, label, ok",
    [
        (
            "Bums live near trains. So the answer is (c) train station.\n\nQ: next question",
            "Bums live near trains.",
            "train station",
            True,
        ),
        ("No marker at all.\n\nQ: next", "No marker at all.", "", False),
        ("", "", "", False),
        ("Reason. So the answer is train station.", "Reason.", "", False),  # no letter
        ("Reason. So the answer is (b) ", "Reason.", "", False),  # letter but no text
    ],
)
def test_parse_cqa(completion, rationale, label, ok):
    p = parsers.parse_cqa(completion)
    assert (p.rationale, p.label, p.ok) == (rationale, label, ok)


@pytest.mark.parametrize(
    "completion, label, ok",
    [
        ("84 / 2 = 42. The answer is (84 / 2).\n\nQ: There are 120 students. The answer is (120 / 3).", "(84 / 2)", True),
        ("I do not know.\n\nQ: other. The answer is (1 + 1).", "", False),  # the marker only in the next exemplar
        ("The answer is 42.", "", False),
        ("", "", False),
    ],
)
def test_parse_svamp(completion, label, ok):
    p = parsers.parse_svamp(completion)
    assert (p.label, p.ok) == (label, ok)


def test_parse_nli():
    p = parsers.parse_esnli(
        "The packages are not from lunch.\nAnswer: neutral\n\nPremise: x\nHypothesis: y\nReasonings: z\nAnswer: entailment"
    )
    assert (p.rationale, p.label, p.ok) == ("The packages are not from lunch.", "neutral", True)
    assert not parsers.parse_esnli("no answer here\n\nPremise: a").ok
    assert not parsers.parse_esnli("Answer: maybe\n").ok
    p = parsers.parse_anli("Context matters. So the answer is contradiction.\n\nPremise: more. So the answer is neutral.")
    assert (p.rationale, p.label, p.ok) == ("Context matters.", "contradiction", True)
    assert not parsers.parse_anli("").ok


@pytest.mark.parametrize(
    "expr, value",
    [
        ("( 84.0 / 2.0 )", 42.0),
        ("(84 / 2)", 42.0),
        ("-3 + 4 * 2", 5.0),
        ("((1+2)*(3-4))/-1", 3.0),
        ("+5", 5.0),
        ("1e3 - 1", 999.0),
    ],
)
def test_evaluator_computes_arithmetic(expr, value):
    assert arithmetic.evaluate(expr) == pytest.approx(value)


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo pwned')",
        "open('/etc/passwd').read()",
        "(lambda: 1)()",
        "2 ** 100000",
        "9 ** 9 ** 9",
        "[1, 2][0]",
        "x + 1",
        "1; 2",
        "().__class__.__bases__[0].__subclasses__()",
        "1 if 1 else 2",
        "'a' * 3",
        "True + 1",
        "1 // 2",
        "7 % 3",
        "(" * 300 + "1" + ")" * 300,
        "1" * 600,
        "",
        "1e308 * 10",
        "(1,2)",
        "9" * 309,  # an int too large for a float: OverflowError before this was caught
        "1e309",  # parses as inf
        "-1e309 + 1",
        "1e16",
    ],
)
def test_evaluator_rejects_everything_else(expr):
    assert arithmetic.try_evaluate(expr) is None


def test_svamp_metric_never_raises_and_non_finite_is_wrong():
    from dss_jax.tasks import metrics

    preds = ["9" * 309, "1e309", "( 2.0 + 2.0 )", "-" * 400, "\x00"]
    assert metrics.equation_accuracy(["( 4.0 )"] * 5, preds)["accuracy"] == 20.0


def test_division_by_zero_scores_wrong_not_crash():
    assert arithmetic.try_evaluate("5 / (2 - 2)") is None
    assert not arithmetic.equations_equal("5 / 0", "( 5.0 / 1.0 )")


def test_equation_equality_is_by_value():
    assert arithmetic.equations_equal("(84 / 2)", "( 84.0 / 2.0 )")
    assert arithmetic.equations_equal("( 2.0 * 21.0 )", "( 84.0 / 2.0 )")
    assert not arithmetic.equations_equal("(84 / 3)", "( 84.0 / 2.0 )")
    assert not arithmetic.equations_equal("__import__('os')", "( 84.0 / 2.0 )")


def test_metrics():
    from dss_jax.tasks import metrics

    assert metrics.accuracy(["a", "b"], ["a", "c"])["accuracy"] == 50.0
    assert metrics.equation_accuracy(["( 84.0 / 2.0 )", "( 1.0 + 1.0 )"], ["(84/2)", "exec('1')"])["accuracy"] == 50.0
    assert metrics.postprocess_label(b"the reason So the answer is table", is_target=False) == "table"
    assert metrics.postprocess_label("table ") == "table"
