"""How the tasks are scored: decoded text -> label text, and each benchmark's accuracy as seqio metric fns.

Every comparison is the benchmark's own answer check (``tasks/answers.py``): SVAMP equations by value, other labels
by normalised text; dss-data's teacher accuracy uses the same check.
"""

from __future__ import annotations

from collections.abc import Callable

from dss_jax.tasks import answers, readers
from dss_jax.tasks.preprocessors import SINGLE_TASK_SEPARATOR


def _extract_single_task_label(text: str) -> str:
    return text.rsplit(SINGLE_TASK_SEPARATOR.strip(), 1)[-1].strip() if text else ""


def postprocess_label(output: str | bytes, example: dict | None = None, is_target: bool = False) -> str:
    """Decoded text -> label text, normalised as the gold labels are at load (``readers.normalize_label``); for
    single-task outputs, the part after 'So the answer is'."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", errors="replace")
    if is_target and example is not None and "label_pretokenized" in example:
        label = example["label_pretokenized"]
        return label.decode("utf-8") if isinstance(label, bytes) else str(label)
    label = _extract_single_task_label(output) if SINGLE_TASK_SEPARATOR.strip() in output else output
    return readers.normalize_label(label)


def accuracy(targets: list[str], predictions: list[str]) -> dict[str, float]:
    """Label accuracy (percent, as the paper reports) by normalised text (``answers``: users' data, CQA, NLI)."""
    return {"accuracy": answers.accuracy(None, targets, predictions)}


def equation_accuracy(targets: list[str], predictions: list[str]) -> dict[str, float]:
    """SVAMP: a predicted equation is right when it evaluates (safely) to the target's value (``answers``)."""
    return {"accuracy": answers.accuracy("svamp", targets, predictions)}


def metric_fns_for(benchmark: str | None) -> list[Callable[[list[str], list[str]], dict[str, float]]]:
    """The seqio metric fns of a benchmark's tasks: its answer check (``answers``) as accuracy."""
    return [equation_accuracy] if benchmark == "svamp" else [accuracy]


def needs_decoding(benchmark: str | None) -> bool:
    """True when the benchmark's metric is not exact match of the label text (SVAMP: equation value), so a
    teacher-forced argmax cannot stand in for decoding."""
    return metric_fns_for(benchmark) != [accuracy]


def teacher_accuracy(benchmark: str | None, examples: list[readers.Example]) -> float | None:
    """Teacher label accuracy against human labels on the examples that have teacher outputs (percent)."""
    t = [e for e in examples if e.has_teacher]
    if not t:
        return None
    return answers.accuracy(benchmark, [e.label for e in t], [e.llm_label for e in t])
