"""``dss-infer``: labels (and optionally rationales) for raw inputs from a trained model dir.

    dss-infer --model_dir DIR --input inputs.jsonl [--output preds.jsonl] [--rationales] [--num_beams 4]

Input: JSON Lines with ``input`` (and optionally ``input_b``, the NLI hypothesis), or plain text, one input
a line. Output: one JSON line per input. Needs only the model dir (``dss_config.json``, ``spiece.model``,
``inference.json``, ``checkpoints/``; a missing or invalid one is refused in one line naming it, never run
without its task prefixes): no TensorFlow, no seqio. :class:`Predictor` is the same path as a
Python API.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dss_jax import checkpoints, decoding
from dss_jax.model import ModelConfig
from dss_jax.tasks import readers


@dataclasses.dataclass
class InferStats:
    inputs: int = 0
    empty_skipped: int = 0
    truncated: int = 0
    invalid_utf8: int = 0


RERUN_TRAIN = (
    "recreate it by rerunning the dss-train command that trained this model dir (it resumes at its last checkpoint "
    "and writes dss_config.json, spiece.model and inference.json first)"
)


class ModelDirError(ValueError):
    """A model dir file that is missing or invalid; the message names it and how to recreate it."""


def _read_json(f: Path) -> Any:
    if not f.is_file():
        raise ModelDirError(f"{f} not found: {RERUN_TRAIN}")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{f} is not valid JSON ({e}): {RERUN_TRAIN}") from None


def read_inference_format(model_dir: Path) -> dict[str, Any]:
    """The model dir's ``inference.json`` (task prefixes, lengths), checked field by field: without it the
    model would be run without the prefixes it was trained on."""
    f = model_dir / "inference.json"
    fmt = _read_json(f)
    if not isinstance(fmt, dict):
        raise ModelDirError(f"{f} must hold a JSON object, not {type(fmt).__name__}: {RERUN_TRAIN}")
    for key, kinds in (
        ("label_prefix", (str,)),
        ("rationale_prefix", (str, type(None))),
        ("single_task_separator", (str, type(None))),
    ):
        if not isinstance(fmt.get(key), kinds):
            raise ModelDirError(f"{f}: field '{key}' is missing or not a string: {RERUN_TRAIN}")
    for key in ("inputs_length", "targets_length"):
        v = fmt.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ModelDirError(f"{f}: field '{key}' must be a positive integer, got {v!r}: {RERUN_TRAIN}")
    return fmt


class Predictor:
    """Restores a model dir's checkpoint once and decodes batches of raw text inputs.

    ``rationales``: refuse a model trained without them, rather than answer without them. The model dir must
    be complete: ``dss_config.json``, ``spiece.model`` and ``inference.json`` are checked ahead of the
    checkpoint, and a missing or invalid one raises :class:`ModelDirError` naming it."""

    def __init__(
        self,
        model_dir: str | Path,
        checkpoint: str | Path | None = None,
        batch_size: int = 32,
        max_decode_length: int | None = None,
        num_beams: int = 1,
        alpha: float = 0.6,
        tool: str = "dss-infer",
        rationales: bool = False,
    ):
        import sentencepiece as spm

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelDirError(f"{model_dir}: no such model dir (pass the --model_dir a dss-train run wrote)")
        cfg_file = model_dir / checkpoints.CONFIG_FILE
        if not cfg_file.is_file():
            raise ModelDirError(f"{cfg_file} not found: {RERUN_TRAIN}")
        try:
            self.config: ModelConfig = checkpoints.read_config(model_dir).replace(dtype="float32")
        except ValueError as e:
            raise ModelDirError(f"{e}: {RERUN_TRAIN}") from None
        self.format: dict[str, Any] = read_inference_format(model_dir)
        if rationales and not (self.format.get("rationale_prefix") or self.format.get("single_task_separator")):
            method = self.format.get("method")
            raise ModelDirError(
                f"--rationales: {model_dir / 'inference.json'} says method {method!r}, trained without rationales"
            )
        spm_file = model_dir / "spiece.model"
        if not spm_file.is_file():
            raise ModelDirError(f"{spm_file} not found (the run's SentencePiece vocabulary): {RERUN_TRAIN}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with a C++ message
            raise ModelDirError(f"{spm_file} is not a SentencePiece model ({str(e).strip()[:120]}): {RERUN_TRAIN}") from None
        if self.sp.get_piece_size() > self.config.vocab_size:
            raise ModelDirError(
                f"{spm_file} has {self.sp.get_piece_size()} pieces, more than the model's vocab_size "
                f"{self.config.vocab_size} in {cfg_file}: not this model's vocabulary; {RERUN_TRAIN}"
            )
        self.step_dir = checkpoints.resolve_step_dir(checkpoint or model_dir)
        self.params = jax.device_put(checkpoints.restore_train_params(self.step_dir, self.config, tool=tool))
        self.batch_size = batch_size
        self.inputs_length = int(self.format["inputs_length"])
        self.max_decode_length = max_decode_length or int(self.format["targets_length"])
        self.num_beams, self.alpha = num_beams, alpha
        self.stats = InferStats()

    def encode(self, text: str, text_b: str = "", prefix: str = "") -> tuple[np.ndarray, bool]:
        """Token ids (NLI pairs joined by EOS, as in training) and whether they were truncated."""
        eos = self.config.eos_token_id
        ids = self.sp.encode(prefix + text) + ([eos] + self.sp.encode(text_b) if text_b else []) + [eos]
        truncated = len(ids) > self.inputs_length
        if truncated:
            ids = ids[: self.inputs_length - 1] + [eos]
        return np.asarray(ids, np.int32), truncated

    def _decode_batch(self, rows: list[np.ndarray]) -> list[str]:
        ids = decoding.decode_and_cut(
            self.params,
            rows,
            self.config,
            length=self.inputs_length,
            batch_size=self.batch_size,  # fixed shape: one compile
            max_decode_length=self.max_decode_length,
            num_beams=self.num_beams,
            alpha=self.alpha,
        )
        # a model vocabulary may be padded past the SentencePiece model's size: such ids decode to nothing
        return [self.sp.decode([t for t in row if t < self.sp.get_piece_size()]) for row in ids]

    def predict(self, inputs: list[str | tuple[str, str]], rationales: bool = False) -> list[dict[str, str]]:
        """Label (and rationale) text for each input (a string, or a (premise, hypothesis) pair)."""
        results: list[dict[str, str]] = [{} for _ in inputs]
        tasks = [("label", self.format["label_prefix"])]
        if rationales and self.format.get("rationale_prefix"):
            tasks.append(("rationale", self.format["rationale_prefix"]))
        for key, prefix in tasks:
            for start in range(0, len(inputs), self.batch_size):
                chunk = inputs[start : start + self.batch_size]
                encoded = [self.encode(*(x if isinstance(x, tuple) else (x, "")), prefix=prefix) for x in chunk]
                rows = [ids for ids, _ in encoded]
                if key == "label":
                    self.stats.truncated += sum(t for _, t in encoded)
                for i, text in enumerate(self._decode_batch(rows)):
                    results[start + i][key] = text
        sep = self.format.get("single_task_separator")
        if sep:
            for r in results:  # single-task outputs carry "rationale So the answer is label"
                if sep in r["label"]:
                    rationale, _, label = r["label"].rpartition(sep)
                    r["label"], r["rationale"] = label.strip(), rationale.strip()
        self.stats.inputs += len(inputs)
        return results


def read_inputs(path: Path, stats: InferStats) -> Iterator[tuple[int, str | tuple[str, str]]]:
    """(line number, input) pairs of a .jsonl (``input``, optional ``input_b``) or plain text file, read by the
    data layer's reader (errors name the file and line); empty lines are skipped and counted, bad bytes replaced
    and counted."""
    counts = readers.LineCounts()
    if path.suffix in (".jsonl", ".json"):
        for lineno, row in readers.iter_jsonl(path, ("input",), strings=("input", "input_b"), counts=counts):
            yield lineno, (row["input"], row["input_b"]) if row.get("input_b") else row["input"]
    else:
        for lineno, line in readers.iter_lines(path, counts):
            yield lineno, line.rstrip("\n")
    stats.empty_skipped += counts.blank
    stats.invalid_utf8 += counts.invalid_utf8


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): the flag and what is wrong with it."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _OneLineParser(prog="dss-infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--checkpoint", default=None, help="a checkpoints/<step> dir (default: best, else latest)")
    p.add_argument("--input", required=True, help=".jsonl with 'input' (and 'input_b'), or plain text")
    p.add_argument("--output", default="-", help="JSON Lines output (default: stdout)")
    p.add_argument("--rationales", action="store_true", help="also generate the rationale (explain task)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_decode_length", type=int, default=None)
    p.add_argument("--num_beams", type=int, default=1, help="1: greedy; >1: beam search")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    for flag, value in (
        ("--batch_size", args.batch_size),
        ("--max_decode_length", args.max_decode_length),
        ("--num_beams", args.num_beams),
    ):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    try:
        pred = Predictor(
            args.model_dir, args.checkpoint, args.batch_size, args.max_decode_length, args.num_beams, rationales=args.rationales
        )
        items = list(read_inputs(Path(args.input), pred.stats))
    except (FileNotFoundError, ValueError) as e:
        print(f"dss-infer: error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
    bar = tqdm(total=len(items), desc="infer", unit="ex", disable=args.no_progress, file=sys.stderr)
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        for (lineno, x), r in zip(chunk, pred.predict([x for _, x in chunk], args.rationales), strict=True):
            text = x if isinstance(x, str) else list(x)
            out.write(json.dumps({"line": lineno, "input": text, **r}, ensure_ascii=False) + "\n")
        bar.update(len(chunk))
    bar.close()
    if out is not sys.stdout:
        out.close()
    print(json.dumps({"checkpoint": str(pred.step_dir), **dataclasses.asdict(pred.stats)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
