"""Per-benchmark parsing of the teacher's raw few-shot chain-of-thought completions.

A completion runs on past its answer into the next few-shot exemplar; each parser cuts it there and splits
(rationale, teacher label). The rules follow the paper's released code. A completion that does not parse
returns ``ok=False`` (with whatever could be recovered) instead of raising: the caller counts it and applies
its stated policy.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Parsed:
    rationale: str
    label: str
    ok: bool


def _strip_label(label: str) -> str:
    label = label.strip()
    return label[:-1].rstrip() if label.endswith(".") else label


def _split_at(completion: str, marker: str) -> tuple[str, str | None]:
    """(rationale, the text after ``marker``) of a completion's first answer (the teacher may go on to write the
    next few-shot question); None when the marker is missing."""
    head = completion.split("Q:")[0].rstrip()
    if marker not in head:
        return head.strip(), None
    rationale, tail = head.split(marker, 1)
    return rationale.strip(), tail


def parse_cqa(completion: str) -> Parsed:
    """'<rationale> So the answer is (c) train station.' -> (rationale, 'train station')."""
    rationale, tail = _split_at(completion, "So the answer is")
    m = re.match(r"\s*\(([a-e])\)\s*(.*)", tail or "", re.S)
    if not m or not m.group(2).strip():
        return Parsed(rationale, "", False)
    return Parsed(rationale, _strip_label(m.group(2)), True)


def parse_svamp(completion: str) -> Parsed:
    """'<rationale> The answer is (84 / 2).' -> (rationale, '(84 / 2)')."""
    rationale, tail = _split_at(completion, "The answer is")
    m = re.search(r"\(.*\)", tail or "", re.S)
    if not m:
        return Parsed(rationale, "", False)
    return Parsed(rationale, m.group(0).strip(), True)


NLI_LABELS = ("entailment", "neutral", "contradiction")


def parse_esnli(completion: str) -> Parsed:
    """'<rationale>\\nAnswer: neutral\\n\\nPremise: ...' -> (rationale, 'neutral')."""
    if "Answer:" not in completion:
        return Parsed(completion.split("Premise:")[0].strip(), "", False)
    rationale, rest = completion.split("Answer:", 1)
    label = rest.split("Premise")[0].strip().rstrip(".").strip()
    return Parsed(rationale.strip(), label, label in NLI_LABELS)


def parse_anli(completion: str) -> Parsed:
    """'<rationale> So the answer is contradiction.\\n\\nPremise: ...' -> (rationale, 'contradiction')."""
    head = completion.split("Premise:")[0].rstrip()
    if "So the answer is" not in head:
        return Parsed(head.strip(), "", False)
    rationale, label = head.split("So the answer is", 1)
    label = _strip_label(label)
    return Parsed(rationale.strip(), label, label in NLI_LABELS)


PARSERS = {"cqa": parse_cqa, "svamp": parse_svamp, "esnli": parse_esnli, "anli1": parse_anli}
