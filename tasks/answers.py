"""Is this answer right, and are two answers the same? One check per benchmark, used by every caller.

The data layer's metrics and teacher accuracy, the trivial baselines, the rationale filters, dss-teacher's
vote and the shipped prompts' exemplar checks all compare answers here, so an answer counts the same
everywhere:
- SVAMP: an equation by its value (the safe evaluator; never ``eval``), right when it is within 1e-4
  (relative to the gold's magnitude, at least absolute) of the gold's value; the same as another when both
  values agree to 6 significant digits. Text that does not evaluate falls back to text.
- every other benchmark and users' data: the label text with whitespace runs folded and ends stripped
  (``readers.normalize_label``, as labels are stored at load).
TF-free: dss-teacher and the prompt tools import it without the data layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from dss_jax.tasks import arithmetic, readers

__all__ = ["accuracy", "answer_key", "is_correct", "same_answer"]


def answer_key(benchmark: str | None, text: str) -> str:
    """The canonical form of an answer: two answers are the same when their keys are equal (hashable, for votes)."""
    if benchmark == "svamp":
        value = arithmetic.try_evaluate(text)
        if value is not None:
            return f"={round(value, 6):.6g}"
    return readers.normalize_label(text)


def same_answer(benchmark: str | None, a: str, b: str) -> bool:
    """Whether two answers (teacher samples, a teacher label and a sample) say the same thing."""
    return answer_key(benchmark, a) == answer_key(benchmark, b)


def is_correct(benchmark: str | None, gold: str, predicted: str) -> bool:
    """The benchmark's own metric on one answer against its gold label."""
    if benchmark == "svamp":
        return arithmetic.equations_equal(predicted, gold)
    return readers.normalize_label(gold) == readers.normalize_label(predicted)


def accuracy(benchmark: str | None, golds: Sequence[str], predictions: Sequence[str]) -> float:
    """Percent of predictions that are correct (the paper reports percent); 0 for no rows."""
    if len(golds) != len(predictions):
        raise ValueError(f"{len(golds)} gold labels but {len(predictions)} predictions")
    right = sum(is_correct(benchmark, g, p) for g, p in zip(golds, predictions, strict=True))
    return 100.0 * right / max(1, len(golds))
