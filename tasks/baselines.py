"""Trivial baselines of each benchmark, computed from the data (never hard-coded), to read accuracy against.

- NLI (e-SNLI, ANLI): always the training split's most frequent class.
- CQA: always the same listed choice (a)..(e) (the best of the five, about 20%), and always the training
  split's most frequent answer text.
- SVAMP: the best number heuristic: subtract the smaller of the question's last two numbers from the larger.
- Users' data: the training split's most frequent label.
"""

from __future__ import annotations

import collections
import re

from dss_jax.tasks import answers, readers

NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _choices(text: str) -> list[str]:
    """The listed answer choices of a CQA input (``(a) choice`` lines)."""
    return [m.group(1).strip() for m in re.finditer(r"^\([a-e]\) (.*)$", text, re.M)]


def candidate_labels(benchmark: str | None, input_text: str) -> list[str] | None:
    """The labels rank classification chooses among for one input: a CQA input's listed choices, the three NLI
    classes; None for tasks without a closed label set (SVAMP, users' data)."""
    if benchmark == "cqa":
        return _choices(input_text) or None
    if benchmark in ("esnli", "anli1"):
        return list(readers.NLI_LABELS)
    return None


def svamp_guess(question: str) -> str:
    nums = [float(x) for x in NUMBER.findall(question)]
    if len(nums) < 2:
        return f"( {nums[0] if nums else 0.0} )"
    a, b = nums[-2], nums[-1]
    return f"( {max(a, b)} - {min(a, b)} )"


def baselines(benchmark: str | None, train: list[readers.Example], split: list[readers.Example]) -> dict[str, float]:
    """{baseline name: accuracy (%) on ``split``}, with constants taken from ``train``."""
    gold = [e.label for e in split]
    majority = collections.Counter(e.label for e in train).most_common(1)[0][0] if train else ""
    if benchmark == "svamp":
        return {
            "best number heuristic (max - min of the last two numbers)": answers.accuracy(
                "svamp", gold, [svamp_guess(e.input) for e in split]
            )
        }
    out = {f"most frequent training label ({majority!r})": answers.accuracy(benchmark, gold, [majority] * len(split))}
    if benchmark == "cqa":
        per_choice = []
        for k in range(5):
            picks = [(_choices(e.input) + [""] * 5)[k] for e in split]
            per_choice.append(answers.accuracy(benchmark, gold, picks))
        best = max(range(5), key=lambda k: per_choice[k])
        out[f"always choice ({'abcde'[best]}) (best fixed choice)"] = per_choice[best]
    return out


def listed_choice_share(benchmark: str | None, inputs: list[str], predictions: list[str]) -> float | None:
    """Multiple choice (CQA): the share of predictions that are one of the input's listed choices (%)."""
    if benchmark != "cqa":
        return None
    hits = sum(p.strip() in _choices(x) for x, p in zip(inputs, predictions, strict=True))
    return 100.0 * hits / max(1, len(predictions))
