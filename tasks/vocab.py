"""Vocabularies: a checkpoint's ``spiece.model``, or a SentencePiece model trained on a task's text and cached.

T5's id convention (pad 0, eos 1, unk 2, no bos) is what seqio and the T5 model assume. T5Gemma students use
Gemma's (pad 0, eos 1, bos 2, unk 3): bos is their decoder start token, so a trained vocabulary for them reserves
it (``special_ids="gemma"``); a pretrained T5Gemma's ``tokenizer.model`` already has these ids. seqio never
adds bos to the text (the model puts it at the start of each decoder sequence).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gin
import seqio

from dss_jax.files import atomic_write

EXTRA_IDS = 0
# SentencePiece special ids per convention: "t5" (T5 and Flan-T5 students) or "gemma" (T5Gemma, T5Gemma 2).
SPECIAL_IDS: dict[str, dict[str, Any]] = {
    "t5": {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1},
    "gemma": {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3},
}


def load_vocabulary(spm_path: str | os.PathLike) -> seqio.SentencePieceVocabulary:
    path = Path(spm_path)
    if not path.exists():
        raise FileNotFoundError(f"SentencePiece model {path} not found")
    return seqio.SentencePieceVocabulary(str(path), extra_ids=EXTRA_IDS)


def cache_dir() -> Path:
    return Path(os.environ.get("DSS_CACHE_DIR", Path.home() / ".cache" / "dss_jax")) / "spm"


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike | None = None, special_ids: str = "t5"
) -> Path:
    """Trains a unigram SentencePiece model on ``texts`` with ``special_ids``' convention (see SPECIAL_IDS);
    cached by a hash of the text and settings."""
    import sentencepiece as spm

    if special_ids not in SPECIAL_IDS:
        raise ValueError(f"special_ids={special_ids!r}; expected one of {sorted(SPECIAL_IDS)}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no text to train a vocabulary on")
    digest = hashlib.sha1(f"{vocab_size}\n".encode() + "\n".join(texts).encode()).hexdigest()[:16]
    tag = "" if special_ids == "t5" else f"{special_ids}_"  # T5 names stay as they were: cached models stay valid
    out = Path(out_path) if out_path else cache_dir() / f"spm_{tag}{vocab_size}_{digest}.model"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        **SPECIAL_IDS[special_ids],
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=2,
    )
    atomic_write(out, model.getvalue())  # a concurrent or interrupted run never sees half a model
    return out


def benchmark_texts(benchmark: str, data_dir: Path | None = None) -> list[str]:
    """Every input, label and rationale of a benchmark's train split (or a user JSONL file)."""
    from dss_jax.tasks import readers

    if benchmark.endswith(".jsonl") or benchmark.endswith(".json"):
        examples = readers.read_user_jsonl(benchmark)
    else:
        data_dir = data_dir or readers.default_data_dir()
        splits = readers.available_splits(data_dir, benchmark)
        # the train split; a sample without one (the shared e-SNLI/ANLI excerpts) uses what it has
        examples = [e for s in (["train"] if "train" in splits else splits) for e in readers.read_split(data_dir, benchmark, s)]
    texts = []
    for e in examples:
        texts += [e.input, e.input_b, e.label, e.rationale, e.llm_label]
    texts += ["predict:", "explain:", "So the answer is"]
    return texts


@gin.configurable
def get_vocabulary(
    spm_path: str | None = None, train_on: str | None = None, vocab_size: int = 2000, special_ids: str = "t5"
) -> seqio.SentencePieceVocabulary:
    """The run's vocabulary: ``spm_path`` (a pretrained checkpoint's spiece.model), or one trained on the
    train split of benchmark ``train_on`` (for from-scratch runs such as the quickstart) with ``special_ids``'
    id convention ("t5", or "gemma" for T5Gemma students: bos 2 is their decoder start token)."""
    if bool(spm_path) == bool(train_on):
        raise ValueError("get_vocabulary: set exactly one of spm_path or train_on")
    if spm_path:
        return load_vocabulary(spm_path)
    assert train_on is not None
    return load_vocabulary(train_sentencepiece(benchmark_texts(train_on), vocab_size, special_ids=special_ids))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dss-vocab",
        description="Train (and cache) a SentencePiece vocabulary on a benchmark's or a JSONL file's training text.",
    )
    p.add_argument("--train_on", required=True, help="benchmark name (cqa, svamp, esnli, anli1) or a user .jsonl file")
    p.add_argument("--vocab_size", type=int, default=2000)
    p.add_argument("--out", default=None, help="where to write the .model (default: the cache)")
    p.add_argument(
        "--special_ids",
        choices=sorted(SPECIAL_IDS),
        default="t5",
        help="id convention: t5 (pad 0, eos 1, unk 2) or gemma (pad 0, eos 1, bos 2, unk 3) for T5Gemma students",
    )
    args = p.parse_args(argv)
    try:
        path = train_sentencepiece(benchmark_texts(args.train_on), args.vocab_size, args.out, args.special_ids)
    except (FileNotFoundError, ValueError) as e:
        print(f"dss-vocab: error: {e}", file=sys.stderr)
        return 2
    vocab = load_vocabulary(path)
    print(f"{path} ({vocab.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
