"""Readers for the paper's released data and for users' own JSON Lines, in plain Python (no TensorFlow).

Every reader yields :class:`Example` rows with the model's input text already formatted as the paper does,
the human label, and (where the teacher's completions exist) the parsed rationale and teacher label.
Malformed input fails naming the file and line; parse failures are counted, never dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dss_jax.tasks.parsers import NLI_LABELS, PARSERS

BENCHMARKS = ("cqa", "svamp", "esnli", "anli1")
# Teacher completions per LLM batch file, per benchmark (the released data's batching).
LLM_BATCH_SIZE = {"cqa": 1000, "svamp": 500, "esnli": 5500, "anli1": 5000}
# Released split names on disk; CQA and SVAMP have no validation split: it is carved from train.
DISK_SPLITS = {
    "cqa": {"train": "train", "test": "test"},
    "svamp": {"train": "train", "test": "test"},
    "esnli": {"train": "train", "validation": "valid", "test": "test"},
    "anli1": {"train": "train", "validation": "valid", "test": "test"},
}
CARVE_FRACTION = 0.1
CARVE_SEED = 0


def normalize_label(text: str) -> str:
    """A label as it trains and as it is scored: whitespace runs (newlines, tabs, double spaces) collapsed to one
    space, ends stripped. SentencePiece decodes whitespace this way, so a label kept raw could never be matched."""
    return " ".join(text.split())


class DataFormatError(ValueError):
    """A data file that cannot be read as data (missing, not UTF-8, malformed JSON, a missing or mistyped field):
    the message names the file and line. Every reader of users' JSONL (training data, dss-teacher's inputs,
    dss-infer's inputs) raises it."""


@dataclasses.dataclass
class LineCounts:
    """What a lenient read (``counts=`` of :func:`iter_lines`) skipped or repaired instead of failing."""

    blank: int = 0
    invalid_utf8: int = 0


@dataclasses.dataclass(frozen=True)
class Example:
    """One input with all its possible targets."""

    idx: int  # line number (0-based) in the source file
    input: str  # formatted model input, without task prefix
    input_b: str  # second segment (NLI hypothesis), joined to ``input`` by the EOS token; "" if none
    label: str  # human label text
    rationale: str = ""  # teacher rationale ("" when absent or unparsed)
    llm_label: str = ""  # teacher label ("" when absent or unparsed)
    has_teacher: bool = False
    parse_ok: bool = True
    # more teacher rationales for the same input and label (users' ``rationales``; dss-teacher --n writes them):
    # the data option ``rationales_per_input`` trains on several, weighted so the input counts once
    extra_rationales: tuple[str, ...] = ()

    def table_row(self) -> dict:
        """The fields of one row of a table (TFDS, tf.data): one value each, without ``extra_rationales``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra_rationales"}


def default_data_dir() -> Path:
    """``$DSS_DATA_DIR``, else ``../shared/data/dss`` beside the repo when it exists."""
    env = os.environ.get("DSS_DATA_DIR")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dss"
    if beside.exists():
        return beside
    raise FileNotFoundError("no data dir: set DSS_DATA_DIR to the unzipped datasets of google-research/distilling-step-by-step")


def iter_lines(path: str | os.PathLike, counts: LineCounts | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line of a UTF-8 file (a byte-order mark is accepted).

    Strict (``counts=None``): bytes that are not UTF-8 are an error naming the line and column. Lenient: they are
    replaced and counted, and blank lines counted, in ``counts`` (dss-infer reads what it can)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if counts is None:
                    raise DataFormatError(
                        f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
                    ) from None
                counts.invalid_utf8 += 1
                line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                if counts is not None:
                    counts.blank += 1
                continue
            yield lineno, line


def iter_jsonl(
    path: str | os.PathLike,
    required: tuple[str, ...] = (),
    strings: tuple[str, ...] = (),
    nonempty: tuple[str, ...] = (),
    counts: LineCounts | None = None,
) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line of a JSON Lines file, checked: each line one JSON
    object with the ``required`` fields, the ``strings`` fields (where present) strings and the ``nonempty`` ones not
    blank. Errors name the file and the real line (:class:`DataFormatError`); ``counts``: as :func:`iter_lines`."""
    for lineno, line in iter_lines(path, counts):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataFormatError(f"{path}:{lineno}: missing field(s) {missing}; has {sorted(row)}")
        for key in strings:
            if key in row and not isinstance(row[key], str):
                raise DataFormatError(f"{path}:{lineno}: field {key!r} must be a string, got {type(row[key]).__name__}")
        for key in nonempty:
            if not str(row.get(key, "")).strip():
                raise DataFormatError(f"{path}:{lineno}: field {key!r} is empty")
        yield lineno, row


def read_jsonl_lines(
    path: str | os.PathLike, required: tuple[str, ...], strings: tuple[str, ...] = (), nonempty: tuple[str, ...] = ()
) -> list[tuple[int, dict]]:
    """All of :func:`iter_jsonl` (strict); a file without a single object is an error too."""
    rows = list(iter_jsonl(path, required, strings, nonempty))
    if not rows:
        raise DataFormatError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return rows


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    return [row for _, row in read_jsonl_lines(path, required)]


def read_completions(llm_dir: Path, split: str, n_gold: int, batch_size: int, gold_file: Path) -> list[str] | None:
    """Teacher completions aligned with the gold lines, or None when the split has none on disk.

    Batch ``i`` (``<split>_CoT_<i>.json``) covers gold lines ``i*B .. (i+1)*B-1``. A missing batch, a batch of
    the wrong size, or a count that differs from the gold lines is an error naming the files.
    """
    files = sorted(llm_dir.glob(f"{split}_CoT_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
        return None
    out: list[str] = []
    for i, f in enumerate(files):
        if f.name != f"{split}_CoT_{i}.json":
            raise DataFormatError(f"{llm_dir}: teacher batch {split}_CoT_{i}.json is missing (found {f.name})")
        try:
            batch = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{f}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(batch, list) or not all(isinstance(c, str) for c in batch):
            raise DataFormatError(f"{f}: expected a JSON array of strings")
        expected = min(batch_size, n_gold - i * batch_size)
        if len(batch) != expected:
            raise DataFormatError(
                f"{f}: {len(batch)} completions, but {gold_file} has {n_gold} lines, so batch {i} should hold {expected}"
            )
        out.extend(batch)
    if len(out) != n_gold:
        raise DataFormatError(f"{llm_dir}/{split}_CoT_*.json: {len(out)} completions for {n_gold} lines of {gold_file}")
    return out


def _format_cqa(row: dict) -> tuple[str, str, str]:
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) != 5:
        raise ValueError(f"choices must be a list of 5, got {choices!r}")
    lettered = "\n".join(f"({letter}) {c}" for letter, c in zip("abcde", choices, strict=True))
    return f"{row['question']}\nAnswer Choices:\n{lettered}", "", str(row["answer"])


def _format_svamp(row: dict) -> tuple[str, str, str]:
    return str(row["input"]), "", str(row["label"])


def _format_nli(row: dict) -> tuple[str, str, str]:
    label = row["label"]
    if label not in (0, 1, 2):
        raise ValueError(f"label must be 0, 1 or 2, got {label!r}")
    return str(row["premise"]), str(row["hypothesis"]), NLI_LABELS[label]


FORMATS = {
    "cqa": (_format_cqa, ("question", "choices", "answer")),
    "svamp": (_format_svamp, ("input", "label")),
    "esnli": (_format_nli, ("premise", "hypothesis", "label")),
    "anli1": (_format_nli, ("premise", "hypothesis", "label")),
}


def read_disk_split(data_dir: Path, benchmark: str, disk_split: str) -> list[Example]:
    """All examples of one released split file (with teacher outputs when present); labels normalised
    (:func:`normalize_label`)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {BENCHMARKS}")
    gold_file = data_dir / benchmark / f"{benchmark}_{disk_split}.json"
    if not gold_file.exists():
        raise FileNotFoundError(f"{gold_file} not found (data dir {data_dir}; set DSS_DATA_DIR)")
    fmt, required = FORMATS[benchmark]
    rows = read_jsonl(gold_file, required)
    completions = read_completions(data_dir / benchmark / "llm", disk_split, len(rows), LLM_BATCH_SIZE[benchmark], gold_file)
    parse = PARSERS[benchmark]
    out = []
    for i, row in enumerate(rows):
        try:
            text, text_b, label = fmt(row)
        except (ValueError, TypeError, KeyError) as e:
            raise DataFormatError(f"{gold_file}:{i + 1}: {e}") from None
        label = normalize_label(label)
        if completions is None:
            out.append(Example(i, text, text_b, label))
            continue
        p = parse(completions[i])
        llm_label = normalize_label(p.label)
        out.append(Example(i, text, text_b, label, p.rationale, llm_label, has_teacher=True, parse_ok=p.ok))
    return out


def carve_validation(n: int, fraction: float = CARVE_FRACTION, seed: int = CARVE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) as the paper's ``train_test_split(test_size=0.1, seed=0)`` makes them."""
    n_val = math.ceil(fraction * n)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:], perm[:n_val]


def available_splits(data_dir: Path, benchmark: str) -> list[str]:
    disk = DISK_SPLITS[benchmark]
    present = [s for s, d in disk.items() if (data_dir / benchmark / f"{benchmark}_{d}.json").exists()]
    if "validation" not in disk and "train" in present:
        present.insert(1, "validation")
    return present


def read_split(data_dir: Path, benchmark: str, split: str) -> list[Example]:
    """A benchmark split: train / validation / test (validation carved from train where there is none)."""
    disk = DISK_SPLITS[benchmark]
    if split in disk:
        examples = read_disk_split(data_dir, benchmark, disk[split])
        if split == "train" and "validation" not in disk:
            keep, _ = carve_validation(len(examples))
            return [examples[i] for i in keep]
        return examples
    if split == "validation":
        examples = read_disk_split(data_dir, benchmark, disk["train"])
        _, val = carve_validation(len(examples))
        return [examples[i] for i in val]
    raise ValueError(f"{benchmark} has no split {split!r}; splits: {available_splits(data_dir, benchmark)}")


def _rationales(row: dict, path: Path, lineno: int) -> tuple[str, tuple[str, ...]]:
    """(the rationale, the others) from ``rationale`` and the optional list ``rationales`` (the first is the
    rationale when ``rationale`` is absent; repeats are dropped)."""
    many = row.get("rationales", [])
    if not isinstance(many, list) or not all(isinstance(r, str) for r in many):
        raise DataFormatError(f"{path}:{lineno}: field 'rationales' must be a list of strings")
    texts = [r for r in ([row["rationale"]] if "rationale" in row else []) + many if r.strip()]
    unique = list(dict.fromkeys(texts))
    return (unique[0] if unique else row.get("rationale", "")), tuple(unique[1:])


def read_user_jsonl(path: str | os.PathLike) -> list[Example]:
    """Users' own data: JSON Lines with ``input``, ``label`` and optionally ``rationale`` (or a list
    ``rationales``: several teacher rationales for the input), ``llm_label`` and ``input_b`` (a second segment
    joined to the input by EOS, as the NLI hypothesis; dss-teacher writes it). Labels are normalised
    (:func:`normalize_label`) here, once, for training and scoring alike."""
    path = Path(path)
    out = []
    rows = read_jsonl_lines(
        path, ("input", "label"), strings=("input", "label", "rationale", "llm_label", "input_b"), nonempty=("input", "label")
    )
    for i, (lineno, row) in enumerate(rows):
        has_teacher = "rationale" in row or "rationales" in row or "llm_label" in row
        rationale, extra = _rationales(row, path, lineno)
        out.append(
            Example(
                i,
                row["input"],
                row.get("input_b", ""),
                normalize_label(row["label"]),
                rationale,
                normalize_label(row.get("llm_label", "")),
                has_teacher=has_teacher,
                parse_ok=True,
                extra_rationales=extra,
            )
        )
    return out


def training_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a deterministic ``fraction`` of n training examples (same subset for every method)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * n))
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])
