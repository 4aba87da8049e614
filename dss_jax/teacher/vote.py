"""Self-consistency: each input's parsed samples vote on its label; the votes become output rows and figures.

Two answers are the same answer when the benchmark's answer check says so (``tasks/answers.py``: SVAMP
equations by value, other labels by whitespace-normalised text). A tie goes to the answer voted for first;
samples cut by the token limit never vote.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dss_jax.tasks import answers
from dss_jax.tasks.parsers import Parsed
from dss_jax.teacher.inputs import TeacherInput
from dss_jax.teacher.prompts import PromptSpec
from dss_jax.teacher.store import Sample


@dataclasses.dataclass(frozen=True)
class Vote:
    """One input's vote."""

    parsed: list[Parsed]  # per sample
    counts: dict[str, int]  # votes per answer key, in the order of first votes
    winner: str | None = None  # the winning answer key; None when no sample voted
    label: str = ""  # the winner's label as its first voter wrote it
    rationale: str = ""  # the first winning voter's rationale
    rationales: list[str] = dataclasses.field(default_factory=list)  # every distinct rationale of the winning answer

    @property
    def usable(self) -> int:
        """Samples that voted: parsed, and not cut by the token limit."""
        return sum(self.counts.values())


def majority(spec: PromptSpec, samples: list[Sample]) -> Vote:
    """Parse each sample and take the majority label; a tie goes to the label voted for first (lowest sample)."""
    parsed = [spec.parse(s.text, s.rationale_field) for s in samples]
    keys = [  # per sample, the answer it votes for (None: it does not vote)
        answers.answer_key(spec.benchmark, p.label) if p.ok and not s.truncated else None
        for s, p in zip(samples, parsed, strict=True)
    ]
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for j, k in enumerate(keys):
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
            first.setdefault(k, j)
    if not counts:
        return Vote(parsed, counts)
    winner = min(counts, key=lambda k: (-counts[k], first[k]))
    p = parsed[first[winner]]
    agreeing = [q.rationale for q, k in zip(parsed, keys, strict=True) if k == winner]
    return Vote(parsed, counts, winner, p.label, p.rationale, list(dict.fromkeys(agreeing)))


@dataclasses.dataclass(frozen=True)
class Tokens:
    prompt: int = 0
    completion: int = 0
    total: int = 0


@dataclasses.dataclass(frozen=True)
class Figures:
    """The summary's data figures (its JSON keys, in this order)."""

    inputs_complete: int  # inputs whose samples are all stored: only these are written
    rows_written: int
    rows_dropped_no_label: int  # neither a gold label nor a teacher label
    labels_from_teacher: int  # rows whose label is the teacher's (no gold label)
    rows_with_rationale: int
    completions: int
    truncated: int  # cut by the token limit: never used
    parse_failures: int
    teacher_accuracy: float | None  # percent of graded inputs whose teacher label is right
    graded_inputs: int  # complete inputs with a gold label
    agreement: float | None  # mean share of usable samples that voted for the winner
    unanimous_inputs: int
    tokens: Tokens


@dataclasses.dataclass(frozen=True)
class Aggregate:
    rows: list[dict[str, Any]]  # the output JSONL's rows
    raw: list[dict[str, Any]]  # the raw JSONL's rows: each input's samples and votes
    figures: Figures


def aggregate(spec: PromptSpec, inputs: list[TeacherInput], samples: list[list[Sample | None]]) -> Aggregate:
    """Output rows, raw rows and the summary's data figures from every input's stored samples (pure).

    Inputs with a sample missing are left out, so every row written equals the complete run's.
    """
    complete: list[_Complete] = []
    for i, (x, row) in enumerate(zip(inputs, samples, strict=True)):
        ss = [s for s in row if s is not None]
        if len(ss) == len(row):
            complete.append(_Complete(i, x, ss, majority(spec, ss)))
    raw = [_raw_row(c) for c in complete]
    rows = [r for c in complete if (r := _output_row(c.input, c.vote)) is not None]
    return Aggregate(rows, raw, _figures(spec.benchmark, complete, rows))


@dataclasses.dataclass(frozen=True)
class _Complete:
    """An input whose samples are all stored, and their vote."""

    index: int
    input: TeacherInput
    samples: list[Sample]
    vote: Vote


def _raw_row(c: _Complete) -> dict[str, Any]:
    """An input's raw record: every sample's text, parsed label and whether it parsed, and the votes."""
    return {
        "index": c.index,
        **({"id": c.input.id} if c.input.id is not None else {}),
        "samples": [
            {
                "sample": j,
                "key": s.key,
                "text": s.text,
                "finish_reason": s.finish_reason,
                **({"rationale_field": s.rationale_field} if s.rationale_field is not None else {}),
                "label": p.label,
                "parsed": p.ok,
            }
            for j, (s, p) in enumerate(zip(c.samples, c.vote.parsed, strict=True))
        ],
        "votes": c.vote.counts,
        "llm_label": c.vote.label,
    }


def _output_row(x: TeacherInput, v: Vote) -> dict[str, Any] | None:
    """An input's training row; None when it has neither a gold label nor a teacher label (nothing to train on)."""
    if x.label is None and v.winner is None:
        return None
    row: dict[str, Any] = {}
    if x.id is not None:
        row["id"] = x.id
    row["input"] = x.text
    if x.text_b:
        row["input_b"] = x.text_b
    row["label"] = x.label if x.label is not None else v.label
    if v.winner is not None:
        row["rationale"] = v.rationale
        if len(v.rationales) > 1:  # several samples agree: DataOptions.rationales_per_input trains on them
            row["rationales"] = v.rationales
        row["llm_label"] = v.label
    return row


def _figures(benchmark: str | None, complete: list[_Complete], rows: list[dict[str, Any]]) -> Figures:
    """The data figures over the complete inputs (their samples and votes) and the rows written."""
    sampled = [(s, p) for c in complete for s, p in zip(c.samples, c.vote.parsed, strict=True)]
    winning_votes = [(c, c.vote.counts[c.vote.winner]) for c in complete if c.vote.winner is not None]
    golds = [(c.input.label, c.vote) for c in complete if c.input.label is not None]
    correct = sum(v.winner is not None and answers.is_correct(benchmark, gold, v.label) for gold, v in golds)
    agreement = [n / c.vote.usable for c, n in winning_votes]
    prompt = sum(s.prompt_tokens for s, _ in sampled)
    completion = sum(s.completion_tokens for s, _ in sampled)
    return Figures(
        inputs_complete=len(complete),
        rows_written=len(rows),
        rows_dropped_no_label=len(complete) - len(rows),
        labels_from_teacher=sum(c.input.label is None for c, _ in winning_votes),
        rows_with_rationale=sum("rationale" in r for r in rows),
        completions=len(sampled),
        truncated=sum(s.truncated for s, _ in sampled),
        parse_failures=sum(not s.truncated and not p.ok for s, p in sampled),
        teacher_accuracy=round(100.0 * correct / len(golds), 4) if golds else None,
        graded_inputs=len(golds),
        agreement=round(sum(agreement) / len(agreement), 4) if agreement else None,
        unanimous_inputs=sum(n == len(c.samples) for c, n in winning_votes),
        tokens=Tokens(prompt, completion, prompt + completion),
    )
