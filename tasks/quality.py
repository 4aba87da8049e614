"""Which teacher rationales train the student: filters by the teacher's correctness, majority vote and length.

Data options of the trainer (``registry.DataOptions``, one gin override each), applied to the training split's
rationale examples only: an input whose rationale is dropped keeps its label example (DSS's label task still
learns the human label), and leaves the rationale-only and single-task data. ``dss-data`` reports the counts.

- ``rationale_filter='teacher_correct'``: keep a rationale only when the teacher's label is the human one (the
  task's own comparison: SVAMP equations by value).
- ``rationale_filter='majority_vote'``: for inputs with several teacher samples (rows with the same input, e.g.
  from ``dss-teacher --n``), keep only the rationales whose label is the samples' most common one.
- ``max_rationale_tokens=N``: drop rationales longer than N tokens of the run's vocabulary (EOS included), where
  the trainer would otherwise cut them at the target length.
- ``rationales_per_input=K``: inputs with several teacher rationales (users' ``rationales`` list, written by
  ``dss-teacher --n``) train on up to K of them, each weighted 1/k (k: the input's kept rationales), so an input's
  rationale task carries the same weight as with one rationale and ``a`` keeps its meaning. The extra rationales
  follow their input's filter decision and the length cap applies to each.

No TensorFlow here: ``sources.RationaleTable`` turns the kept rows into a mask over the source's ``idx``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence

import numpy as np

from dss_jax.tasks import answers, readers

RATIONALE_FILTERS = ("all", "teacher_correct", "majority_vote")


def _majority_keep(benchmark: str | None, examples: Sequence[readers.Example]) -> list[bool]:
    """True for rows whose teacher label is the most common answer among the rows of the same input (answers
    compared as the benchmark compares them: ``answers.answer_key``, SVAMP equations by value)."""
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for i, e in enumerate(examples):
        groups[(e.input, e.input_b)].append(i)
    keep = [True] * len(examples)
    for rows in groups.values():
        if len(rows) < 2:
            continue
        keys = {i: answers.answer_key(benchmark, examples[i].llm_label) for i in rows}
        votes = collections.Counter(keys[i] for i in rows if examples[i].parse_ok and examples[i].llm_label)
        if not votes:
            continue
        winner = votes.most_common(1)[0][0]
        for i in rows:
            keep[i] = keys[i] == winner
    return keep


MAX_RATIONALES_PER_INPUT = 8


def check_options(rationale_filter: str, max_rationale_tokens: int | None, rationales_per_input: int) -> None:
    """The rationale data options' one check (``registry.DataOptions`` runs it when built): errors name the option."""
    if rationale_filter not in RATIONALE_FILTERS:
        raise ValueError(f"DataOptions.rationale_filter={rationale_filter!r}; expected one of {RATIONALE_FILTERS}")
    if not 1 <= rationales_per_input <= MAX_RATIONALES_PER_INPUT:
        raise ValueError(
            f"DataOptions.rationales_per_input must be in [1, {MAX_RATIONALES_PER_INPUT}], got {rationales_per_input}"
        )
    if max_rationale_tokens is not None and max_rationale_tokens < 2:
        raise ValueError(f"DataOptions.max_rationale_tokens must be at least 2 (EOS included), got {max_rationale_tokens}")


def weight_scale(per_input: int) -> int:
    """The integer every training token's loss weight is scaled by, so that 1/k (k <= per_input) is an integer
    weight too: lcm(1..per_input) (1 for one rationale per input: the weights stay 0/1). Per-task means and the
    token mean divide by the summed weights, so a common scale changes no loss."""
    return math.lcm(*range(1, per_input + 1))


def extra_rationales(
    examples: Sequence[readers.Example],
    keep: np.ndarray,
    per_input: int,
    max_rationale_tokens: int | None,
    count_tokens: Callable[[list[str]], list[int]] | None,
) -> tuple[list[tuple[str, ...]], dict[str, int]]:
    """Per example, the extra rationales that train beside its own (up to ``per_input - 1``), and counts."""
    out: list[tuple[str, ...]] = []
    capped = 0
    for e, k in zip(examples, keep, strict=True):
        extra = list(e.extra_rationales) if k else []
        if extra and max_rationale_tokens:
            assert count_tokens is not None, "max_rationale_tokens needs count_tokens"
            short = [r for r, n in zip(extra, count_tokens(extra), strict=True) if n <= max_rationale_tokens]
            capped += len(extra) - len(short)
            extra = short
        out.append(tuple(extra[: per_input - 1]))
    counts = {
        "inputs_with_several_rationales": sum(bool(x) for x in out),
        "extra_rationales": sum(len(x) for x in out),
    }
    if max_rationale_tokens:
        counts["extra_dropped_too_long"] = capped
    return out, counts


def select_rationales(
    examples: Sequence[readers.Example],
    rationale_filter: str,
    max_rationale_tokens: int | None,
    benchmark: str | None,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """(a boolean keep per example, counts): which rows' own rationales train, and how many each rule dropped;
    teacher labels are compared with human labels and with each other by ``answers`` (the benchmark's check).

    Rows without a teacher rationale are neither kept nor counted as dropped (no option can bring them back).
    The options are checked once, where they are built (:func:`check_options`)."""
    has = np.array([e.has_teacher and bool(e.rationale) for e in examples], bool)
    keep = has.copy()
    counts = {"with_rationale": int(has.sum())}
    if rationale_filter == "teacher_correct":
        right = np.array([answers.is_correct(benchmark, e.label, e.llm_label) for e in examples], bool)
        counts["dropped_teacher_wrong"] = int((keep & ~right).sum())
        keep &= right
    elif rationale_filter == "majority_vote":
        vote = np.array(_majority_keep(benchmark, examples), bool)
        counts["dropped_minority_vote"] = int((keep & ~vote).sum())
        keep &= vote
    if max_rationale_tokens:
        if count_tokens is None:
            raise ValueError("DataOptions.max_rationale_tokens needs the run's vocabulary to count tokens")
        lengths = np.array(count_tokens([e.rationale for e in examples]), np.int64)
        short = lengths <= max_rationale_tokens
        counts["dropped_too_long"] = int((keep & ~short).sum())
        keep &= short
    counts["kept"] = int(keep.sum())
    return keep, counts
