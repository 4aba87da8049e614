"""``dss-data``: what the data layer makes of a benchmark, before any training.

    dss-data --benchmark cqa svamp [--spm PATH | --train_vocab] [--show 3] [--json]
             [--rationale_filter teacher_correct] [--max_rationale_tokens 64] [--rationales_per_input 3]

Per benchmark and split: example count, teacher completions and parse failures, teacher label accuracy
against the human labels, and token-length percentiles (input, label, rationale) under a vocabulary.
With the rationale-quality data options (the trainer's ``registry.DataOptions`` of the same names), the training
split also shows how many rationales train and how many each rule drops.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dss_jax.tasks import quality, readers

PERCENTILES = (50, 90, 99, 100)


def split_stats(benchmark: str, split: str, examples: list[readers.Example], vocab=None) -> dict:
    from dss_jax.tasks import metrics

    teacher = [e for e in examples if e.has_teacher]
    row = {
        "benchmark": benchmark,
        "split": split,
        "examples": len(examples),
        "teacher_outputs": len(teacher),
        "parse_failures": sum(not e.parse_ok for e in teacher),
        "teacher_accuracy": metrics.teacher_accuracy(benchmark, examples),
    }
    if vocab is not None and examples:

        def lengths(texts: list[str]) -> list[int]:
            return [len(ids) + 1 for ids in vocab.tokenizer.encode(texts)]  # +1: EOS

        inputs = lengths([f"predict: {e.input}" for e in examples])
        inputs = [n + (len(vocab.encode(e.input_b)) + 1 if e.input_b else 0) for n, e in zip(inputs, examples, strict=True)]
        row["input_tokens"] = _pct(inputs)
        row["label_tokens"] = _pct(lengths([e.label for e in examples]))
        if teacher:
            row["rationale_tokens"] = _pct(lengths([e.rationale for e in teacher]))
    return row


def _pct(xs: list[int]) -> dict[str, int]:
    return {f"p{p}": int(np.percentile(xs, p)) for p in PERCENTILES}


def _rationale_column(r: dict) -> str:
    c = r.get("rationales")
    if not c:
        return ""
    dropped = ", ".join(f"{k.removeprefix('dropped_')} {v}" for k, v in c.items() if k.startswith("dropped_"))
    extra = (
        f", +{c['extra_rationales']} extra for {c['inputs_with_several_rationales']} inputs" if "extra_rationales" in c else ""
    )
    return f"{c['kept']}/{c['with_rationale']}" + (f" (dropped: {dropped})" if dropped else "") + extra


def format_table(rows: list[dict]) -> str:
    head = [
        "benchmark",
        "split",
        "examples",
        "teacher",
        "parse fail",
        "teacher acc %",
        "input tok p50/p90/p99/max",
        "label tok p50/p99",
        "rationale tok p50/p90/p99/max",
    ]
    if any("rationales" in r for r in rows):
        head.append("rationales kept")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = "" if r["teacher_accuracy"] is None else f"{r['teacher_accuracy']:.2f}"
        inp = "/".join(str(v) for v in r["input_tokens"].values()) if "input_tokens" in r else ""
        lab = f"{r['label_tokens']['p50']}/{r['label_tokens']['p99']}" if "label_tokens" in r else ""
        rat = "/".join(str(v) for v in r["rationale_tokens"].values()) if "rationale_tokens" in r else ""
        cells = [r["benchmark"], r["split"], r["examples"], r["teacher_outputs"], r["parse_failures"], acc, inp, lab, rat]
        if len(head) > len(cells):
            cells.append(_rationale_column(r))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def show_examples(benchmark: str, split: str, examples: list[readers.Example], n: int) -> str:
    out = []
    for e in examples[:n]:
        joined = f"{e.input} </s> {e.input_b}" if e.input_b else e.input
        out.append(f"--- {benchmark}/{split} line {e.idx + 1} (teacher parsed: {e.parse_ok})")
        out.append(f"[predict] inputs:  predict: {joined}\n          targets: {e.label}")
        if e.has_teacher:
            out.append(f"[explain] inputs:  explain: {joined}\n          targets: {e.rationale}")
            out.append(f"[teacher label]    {e.llm_label}")
    return "\n".join(out)


def _rationale_counts(benchmark: str | None, examples: list[readers.Example], args: argparse.Namespace, vocab) -> dict:
    from dss_jax.tasks import registry, sources

    opts = registry.DataOptions(
        rationale_filter=args.rationale_filter,
        max_rationale_tokens=args.max_rationale_tokens,
        rationales_per_input=args.rationales_per_input,
    )
    return sources.select_rationales(benchmark, examples, opts, vocab)[2]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dss-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", nargs="+", default=list(readers.BENCHMARKS), help="benchmarks (default: all)")
    p.add_argument("--data_dir", default=None, help="default: $DSS_DATA_DIR, else ../shared/data/dss")
    p.add_argument("--user_jsonl", default=None, help="report on a user JSONL file instead of the benchmarks")
    p.add_argument("--spm", default=None, help="SentencePiece model for token lengths")
    p.add_argument("--train_vocab", action="store_true", help="train (and cache) a vocabulary on each benchmark for lengths")
    p.add_argument("--vocab_size", type=int, default=2000)
    p.add_argument("--show", type=int, default=0, help="print N formatted examples per split as the model sees them")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a markdown table")
    p.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up messages")
    p.add_argument(
        "--rationale_filter",
        default="all",
        choices=quality.RATIONALE_FILTERS,
        help="count the training rationales this data option keeps (registry.DataOptions.rationale_filter)",
    )
    p.add_argument(
        "--max_rationale_tokens",
        type=int,
        default=None,
        help="count the rationales over N tokens (EOS included) that this data option drops; needs --spm or --train_vocab",
    )
    p.add_argument(
        "--rationales_per_input",
        type=int,
        default=1,
        help="count the extra rationales (users' 'rationales' lists) that train at up to K per input",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.max_rationale_tokens and not (args.spm or args.train_vocab):
        p.error("--max_rationale_tokens counts tokens: pass --spm PATH or --train_vocab")
    if not args.verbose:
        from dss_jax import logs

        logs.quiet_data_layer_imports()
    try:
        data_dir = Path(args.data_dir) if args.data_dir else (None if args.user_jsonl else readers.default_data_dir())
        rows, shows = [], []
        sources: list[tuple[str, str | None]] = [("user", None)] if args.user_jsonl else [(b, b) for b in args.benchmark]
        for name, bench in sources:
            vocab = None
            if args.spm or args.train_vocab:
                from dss_jax.tasks import vocab as vocab_lib

                if args.spm:
                    vocab = vocab_lib.load_vocabulary(args.spm)
                else:
                    texts = vocab_lib.benchmark_texts(args.user_jsonl or str(bench), data_dir)
                    vocab = vocab_lib.load_vocabulary(vocab_lib.train_sentencepiece(texts, args.vocab_size))
            if args.user_jsonl:
                splits = {"train": readers.read_user_jsonl(args.user_jsonl)}
            else:
                bench_dir = data_dir or readers.default_data_dir()
                splits = {
                    s: readers.read_split(bench_dir, str(bench), s) for s in readers.available_splits(bench_dir, str(bench))
                }
            for split, examples in splits.items():
                rows.append(split_stats(bench or name, split, examples, vocab))
                if split == "train" and (
                    args.rationale_filter != "all" or args.max_rationale_tokens or args.rationales_per_input > 1
                ):
                    rows[-1]["rationales"] = _rationale_counts(bench, examples, args, vocab)
                if args.show:
                    shows.append(show_examples(name, split, examples, args.show))
    except (FileNotFoundError, readers.DataFormatError, ValueError) as e:
        print(f"dss-data: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    for s in shows:
        print(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
