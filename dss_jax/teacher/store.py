"""dss-teacher's files: the append-only completion store, and the output files written beside ``--output``.

A store record is one completion (:class:`Sample`), fsynced as it arrives; the output, raw and summary files are
replaced atomically at the end of a run, from what the store holds.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any


class TeacherError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One stored completion: what the endpoint answered for one (input, sample index)."""

    key: str  # the request's store key (client.request_key)
    text: str
    finish_reason: str | None = None  # "length": cut by the token limit, never used
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rationale_field: str | None = None  # dss-serve's extension: the student's explain: output
    sample: int | None = None  # the sample index it was asked for

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def to_record(self) -> dict[str, Any]:
        """The store's JSON object (its key order is the file format)."""
        rec: dict[str, Any] = {
            "key": self.key,
            "sample": self.sample,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
        }
        if self.rationale_field is not None:
            rec["rationale_field"] = self.rationale_field
        return rec

    @classmethod
    def from_record(cls, rec: Any) -> Sample | None:
        """A store record as a Sample; None for a line that is not a completion (skipped, so it is asked for again)."""
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or not isinstance(rec.get("text"), str):
            return None
        usage: Any = rec.get("usage")
        finish, field, sample = rec.get("finish_reason"), rec.get("rationale_field"), rec.get("sample")
        try:
            tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        except (TypeError, KeyError, ValueError):
            return None
        return cls(
            key=rec["key"],
            text=rec["text"],
            finish_reason=finish if isinstance(finish, str) else None,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            rationale_field=field if isinstance(field, str) else None,
            sample=sample if isinstance(sample, int) else None,
        )


class Store:
    """Append-only JSONL of completions, fsynced per record; a torn last line (SIGKILL mid-write) is cut off.

    One writer at a time: the file is locked while a run holds it.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, Sample] = {}
        self.torn_bytes = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a+b")  # held open for the run
        except OSError as e:
            raise TeacherError(f"--store {path}: cannot open it for appending ({e.strerror or e})") from None
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise TeacherError(f"{path}: another dss-teacher is writing this store") from None
        self._f.seek(0)
        data = self._f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # an unfinished last record: it was never complete, so it is not a completion
            self.torn_bytes = len(data) - end
            self._f.truncate(end)
            os.fsync(self._f.fileno())
        for line in data[:end].splitlines():
            try:
                sample = Sample.from_record(json.loads(line))
            except json.JSONDecodeError:
                continue  # cannot happen with one writer; skip rather than refuse the store
            if sample is not None:
                self.records.setdefault(sample.key, sample)

    def append(self, sample: Sample) -> None:
        self._f.write((json.dumps(sample.to_record(), ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.setdefault(sample.key, sample)

    def close(self) -> None:
        self._f.close()


def dump_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def side_paths(output: Path) -> dict[str, Path]:
    """The files beside ``--output X.jsonl``: ``X.store.jsonl``, ``X.raw.jsonl``, ``X.summary.json``."""
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return {k: output.with_name(f"{stem}.{k}{ext}") for k, ext in (("store", ".jsonl"), ("raw", ".jsonl"), ("summary", ".json"))}


def check_output(output: Path, paths: dict[str, Path]) -> None:
    """Refuse, before any request is paid for, an --output that is a directory or in a directory that cannot be written."""
    if output.is_dir():
        raise TeacherError(f"--output {output} is a directory; give a file path, e.g. {output / 'teacher.jsonl'}")
    for kind in ("raw", "summary"):
        if paths[kind].is_dir():
            raise TeacherError(f"--output {output}: {paths[kind]} is a directory, and dss-teacher writes that file; move it")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{output.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        why = "not a directory" if isinstance(e, (FileExistsError, NotADirectoryError)) else (e.strerror or str(e))
        raise TeacherError(f"--output {output}: cannot write in {parent} ({why}); give another --output") from None


def check_store_owner(output: Path, summary: Path, store: Path) -> None:
    """Refuse to overwrite an output written from another store (its summary records the store it came from).

    Two runs with different stores would otherwise replace each other's output without a word.
    """
    if not output.exists():
        return
    try:
        prev = json.loads(summary.read_text(encoding="utf-8")).get("store")
    except (OSError, ValueError, AttributeError):
        return  # no summary of ours beside it: nothing recorded to compare
    if isinstance(prev, str) and prev != str(store.resolve()):
        raise TeacherError(
            f"--output {output} was written from the store {prev}, not {store}; rerun with --store {prev} to continue "
            f"that run, give another --output, or delete {output} to replace it"
        )
