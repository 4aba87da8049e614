"""What dss-teacher asks about: a user's JSONL or a registered benchmark's split."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from dss_jax.tasks import readers
from dss_jax.teacher.store import TeacherError


@dataclasses.dataclass(frozen=True)
class TeacherInput:
    text: str
    text_b: str = ""
    label: str | None = None  # the gold label, where there is one (the summary grades the teacher on it)
    id: str | int | None = None


def read_inputs(path: str | os.PathLike) -> list[TeacherInput]:
    """A user JSONL: ``input`` (required), ``label``, ``id``, ``input_b``; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"{path}: no such file")
    out = []
    for lineno, row in readers.read_jsonl_lines(path, ("input",), strings=("input", "label", "input_b"), nonempty=("input",)):
        rid = row.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise readers.DataFormatError(f"{path}:{lineno}: field 'id' must be a string or an integer")
        label = row.get("label")
        out.append(TeacherInput(row["input"], row.get("input_b", ""), label if label and label.strip() else None, rid))
    return out


def benchmark_inputs(data_dir: Path, benchmark: str, split: str) -> list[TeacherInput]:
    return [TeacherInput(e.input, e.input_b, e.label) for e in readers.read_split(data_dir, benchmark, split)]


def warn_duplicate_ids(source: str, inputs: list[TeacherInput]) -> None:
    """One line naming the ids that more than one input row carries: the output keeps them, so they stop identifying rows."""
    seen: dict[str | int, int] = {}
    for x in inputs:
        if x.id is not None:
            seen[x.id] = seen.get(x.id, 0) + 1
    dups = [i for i, c in seen.items() if c > 1]
    if dups:
        first = ", ".join(map(repr, dups[:5])) + (", ..." if len(dups) > 5 else "")
        rows = sum(seen[i] for i in dups)
        print(
            f"dss-teacher: warning: {source}: {len(dups)} ids are each used by more than one row ({rows} rows; {first}); "
            "every row is still asked for and keeps its id in the output",
            file=sys.stderr,
        )
