"""``dss-teacher``: rationales for any task from an OpenAI-compatible endpoint, ready for ``dss-train``.

    OPENAI_API_KEY=... dss-teacher --base_url URL --model NAME --benchmark cqa --split train --output cqa.jsonl
    OPENAI_API_KEY=... dss-teacher --base_url URL --model NAME --input mine.jsonl --prompt_file mine.json \\
        --output mine_teacher.jsonl --n 5

Each input is put to the endpoint ``--n`` times in a few-shot chain-of-thought prompt (a versioned file: the
shipped one of a benchmark, or yours); every completion is parsed with the project's parsers and the parsed
labels vote (self-consistency; a tie goes to the label whose first vote came first). Completions cut by the
token limit (``finish_reason == "length"``) are counted and never used. Every completion is appended to an
on-disk store as it arrives, keyed by a hash of (model, API, full prompt, sampling parameters, sample index):
a rerun, or a run after SIGKILL, asks only for what the store lacks, and writes the same output.

Files beside ``--output X.jsonl``: ``X.store.jsonl`` (the append-only store of raw completions),
``X.raw.jsonl`` (each input's raw completions, parsed labels and votes), ``X.summary.json`` (teacher accuracy
where gold labels exist, parse failures, truncated completions, agreement, tokens, requests, retries). The
output is the project's user JSONL: ``input``, ``label`` (the gold label, else the teacher's), ``rationale``,
``llm_label``, plus ``input_b`` and ``id`` where the input has them, and ``rationales`` (every distinct
rationale of the winning answer) where several samples agree: ``registry.DataOptions.rationales_per_input`` trains
on them.

Exit status: 0 complete; 2 bad input, an --output that cannot be written or was written from another store,
or an endpoint that refuses the key/model; 3 incomplete (a budget was reached, requests kept failing, or the
endpoint could not be reached --max_connection_failures times in a row, said in one line); 130 interrupted
(Ctrl-C, one line). When incomplete or interrupted the output holds only the inputs whose samples are all stored,
and a rerun of the same command continues from the store. Files are written with the umask's permissions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dss_jax.files import atomic_write as write_atomic
from dss_jax.tasks import readers
from dss_jax.teacher import client, prompts
from dss_jax.teacher.client import CONNECT_TIMEOUT_S, Options, Plan, RunStats, Sampling
from dss_jax.teacher.inputs import TeacherInput, benchmark_inputs, read_inputs, warn_duplicate_ids
from dss_jax.teacher.store import (
    Sample,
    Store,
    TeacherError,
    check_output,
    check_store_owner,
    dump_jsonl,
    side_paths,
)
from dss_jax.teacher.vote import Aggregate, Figures, aggregate


@dataclasses.dataclass(frozen=True)
class ThisRun:
    """The summary's figures of this run alone (what it asked for, what came from the store)."""

    requests: int
    retries: int
    retried_faults: dict[str, int]
    from_store: int
    shared_with_equal_inputs: int
    new_completions: int
    tokens: int
    failed_samples: int
    rejected_requests: int
    last_error: str
    stopped: str | None

    @classmethod
    def of(cls, stats: RunStats, plan: Plan) -> ThisRun:
        return cls(stats.requests, stats.retries, stats.faults, plan.cached, plan.shared, stats.new_completions,
                   stats.tokens, stats.failed, stats.rejected, stats.last_error, stats.stopped or None)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Summary:
    """``X.summary.json``: where the output came from, its data figures, and this run's figures."""

    endpoint: dict[str, str]
    store: str  # the store the output was written from (an output from another store is never overwritten)
    prompt: dict[str, str]
    source: dict[str, str]
    sampling: dict[str, Any]
    inputs: int
    figures: Figures
    missing_samples: int
    this_run: ThisRun

    @property
    def complete(self) -> bool:
        return self.missing_samples == 0

    def to_json(self) -> str:
        d = {
            "endpoint": self.endpoint,
            "store": self.store,
            "prompt": self.prompt,
            "source": self.source,
            "sampling": self.sampling,
            "inputs": self.inputs,
            **dataclasses.asdict(self.figures),
            "complete": self.complete,
            "missing_samples": self.missing_samples,
            "this_run": dataclasses.asdict(self.this_run),
        }
        return json.dumps(d, indent=1, ensure_ascii=False) + "\n"


def _public_url(url: str) -> str:
    """The endpoint without userinfo or query (they can hold credentials), for the summary."""
    p = urlsplit(url)
    host = p.hostname or ""
    return urlunsplit((p.scheme, host + (f":{p.port}" if p.port else ""), p.path, "", ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dss-teacher", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _endpoint_flags(p.add_argument_group("endpoint"))
    _input_flags(p.add_argument_group("inputs (one of)"))
    _prompt_flags(p.add_argument_group("prompt"))
    _sampling_flags(p.add_argument_group("sampling"))
    _throughput_flags(p.add_argument_group("throughput and cost"))
    _output_flags(p.add_argument_group("output"))
    return p


def _endpoint_flags(g: Any) -> None:
    """Where to ask, and how."""
    g.add_argument("--base_url", required=True, help="the OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", required=True, help="the model name the endpoint serves")
    g.add_argument("--api_key_env", default="OPENAI_API_KEY",
                   help="name of the environment variable holding the API key (default OPENAI_API_KEY); the key is "
                        "never taken as a flag and never logged; for a server without auth set it to any value")  # fmt: skip
    g.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="completions: one few-shot text prompt, /v1/completions; chat: the exemplars as user/assistant "
                        "turns, /v1/chat/completions (default completions)")  # fmt: skip


def _input_flags(g: Any) -> None:
    """What to ask about: a benchmark's split or your JSONL."""
    g.add_argument("--benchmark", choices=readers.BENCHMARKS, help="a registered benchmark's split, read from the released data")
    g.add_argument("--split", default="train", help="the benchmark split: train, validation or test (default train)")
    g.add_argument("--data_dir", default=None, help="released data (default $DSS_DATA_DIR, else ../shared/data/dss)")
    g.add_argument("--input", help="your JSONL: 'input' (required), 'label', 'id', 'input_b' (optional) per line")
    g.add_argument("--limit", type=int, default=None, help="only the first N inputs")


def _prompt_flags(g: Any) -> None:
    """The few-shot prompt."""
    g.add_argument("--prompt", choices=prompts.SHIPPED, default=None,
                   help="a shipped few-shot prompt (default: --benchmark's)")  # fmt: skip
    g.add_argument("--prompt_file", default=None,
                   help="your prompt file (JSON, format dss-teacher-prompt/1; see the README); needed with --input "
                        "unless --prompt names a shipped one")  # fmt: skip
    g.add_argument("--show_prompt", action="store_true", help="print the first input's prompt and exit (no requests)")


def _sampling_flags(g: Any) -> None:
    """Samples per input and how they are drawn."""
    g.add_argument("--n", type=int, default=1, help="samples per input; their parsed labels vote (default 1)")
    g.add_argument("--temperature", type=float, default=None, help="default 0 for --n 1, 0.7 for --n > 1")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--max_tokens", type=int, default=256, help="completion token limit per request (default 256)")
    g.add_argument("--seed", type=int, default=0,
                   help="sample j sends seed+j, so samples are reproducible where the endpoint supports seeds; "
                        "-1 sends no seed (default 0)")  # fmt: skip


def _throughput_flags(g: Any) -> None:
    """Concurrency, retries, the circuit breaker and budgets."""
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help=f"seconds to wait for one answer before retrying (default 120); connecting gives up after "
                        f"{CONNECT_TIMEOUT_S:g} s, or this if shorter")  # fmt: skip
    g.add_argument("--max_retries", type=int, default=8,
                   help="retries per request on 429, 408/409, 5xx, timeouts, connection errors and unusable bodies "
                        "(default 8); Retry-After is honoured, otherwise exponential backoff with jitter")  # fmt: skip
    g.add_argument("--max_connection_failures", type=int, default=5,
                   help="stop the run after this many connection failures in a row (refused, reset, no connection "
                        "within the connect timeout), counted across all requests; any answer resets the count. While "
                        "the endpoint cannot be reached one request at a time probes it, with the backoff above, so with "
                        "the defaults an endpoint that refuses connections ends the run within about 15 s (one that "
                        "never answers them: about 65 s), whatever the number of inputs (default 5)")  # fmt: skip
    g.add_argument("--backoff_base", type=float, default=1.0, help="first backoff in seconds (default 1)")
    g.add_argument("--backoff_max", type=float, default=60.0, help="longest backoff in seconds without Retry-After (default 60)")
    g.add_argument("--max_requests", type=int, default=None, help="stop after this many HTTP requests (retries included)")
    g.add_argument(
        "--max_tokens_total", type=int, default=None, help="stop once this run has used this many tokens (prompt + completion)"
    )


def _output_flags(g: Any) -> None:
    """Where the output and the store go."""
    g.add_argument("--output", required=True,
                   help="the user JSONL to write; the store, raw and summary files go beside it. Checked before the "
                        "first request: a directory, or a place that cannot be written, is refused")  # fmt: skip
    g.add_argument("--store", default=None,
                   help="the completion store (default: <output>.store.jsonl); share it between runs. The summary "
                        "records the store an output was written from, and an existing --output written from another "
                        "store is refused rather than replaced (continue with that --store, or pick another --output)")  # fmt: skip
    g.add_argument("--no_progress", action="store_true", help="no progress bar")


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if (a.benchmark is None) == (a.input is None):
        p.error("give exactly one of --benchmark (with --split) or --input")
    if a.input and not (a.prompt or a.prompt_file):
        p.error("--input needs --prompt_file (your prompt) or --prompt (a shipped one)")
    if a.prompt and a.prompt_file:
        p.error("give --prompt or --prompt_file, not both")
    for name, lo in (("n", 1), ("max_tokens", 1), ("concurrency", 1), ("max_retries", 0), ("limit", 1), ("max_requests", 1),
                     ("max_tokens_total", 1), ("max_connection_failures", 1)):  # fmt: skip
        v = getattr(a, name)
        if v is not None and v < lo:
            p.error(f"--{name} must be >= {lo}")
    if a.temperature is not None and not 0 <= a.temperature <= 2:
        p.error("--temperature must be in [0, 2]")
    if not 0 < a.top_p <= 1:
        p.error("--top_p must be in (0, 1]")
    if a.timeout <= 0 or a.backoff_base < 0 or a.backoff_max < 0:
        p.error("--timeout must be > 0 and the backoffs >= 0")
    if a.n > 1 and a.temperature == 0:
        print("dss-teacher: warning: --n > 1 at temperature 0 asks for the same answer n times", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    if args.temperature is None:
        args.temperature = 0.0 if args.n == 1 else 0.7
    try:
        return run(args)
    except (TeacherError, readers.DataFormatError, prompts.PromptError, OSError, ValueError) as e:
        print(f"dss-teacher: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the requests (those stop in client.ask_all and still write the output)
        print("dss-teacher: interrupted; every completion received is in the store; rerun the same command to continue",
              file=sys.stderr)  # fmt: skip
        return 130


def run(args: argparse.Namespace) -> int:
    """One dss-teacher run on checked flags: ask for what the store lacks, then write the output, raw and summary files."""
    spec = prompts.load(args.prompt_file) if args.prompt_file else prompts.shipped(args.prompt or args.benchmark)
    inputs = _inputs(args)
    if args.show_prompt:
        prompt = client.prompt_for(spec, args.api, inputs[0])
        print(json.dumps(prompt, indent=1, ensure_ascii=False) if args.api == "chat" else prompt)
        return 0
    api_key = os.environ.get(args.api_key_env, "")
    if not api_key.strip():
        raise TeacherError(
            f"environment variable {args.api_key_env} is not set; put the API key there (--api_key_env names the "
            "variable; for a server without auth any value will do)"
        )
    sampling = Sampling(args.temperature, args.top_p, args.max_tokens, spec.stop, None if args.seed < 0 else args.seed,
                        spec.extra_body)  # fmt: skip
    output = Path(args.output)
    paths = side_paths(output)
    store_path = Path(args.store) if args.store else paths["store"]
    check_output(output, paths)
    check_store_owner(output, paths["summary"], store_path)
    opts = _options(args)
    plan, stats, samples, n_stored = _ask(spec, inputs, opts, args.n, sampling, store_path, api_key)
    agg = aggregate(spec, inputs, samples)
    summary = _summary(args, spec, sampling, store_path, len(inputs), agg, samples, ThisRun.of(stats, plan))
    check_store_owner(output, paths["summary"], store_path)  # again: another run may have written it meanwhile
    write_atomic(paths["raw"], dump_jsonl(agg.raw))
    write_atomic(output, dump_jsonl(agg.rows))
    write_atomic(paths["summary"], summary.to_json())
    kept = (f"kept {n_stored} completions ({stats.new_completions} new) in {store_path} and "
            f"{summary.figures.inputs_complete} complete inputs in {output}; rerun the same command to continue")  # fmt: skip
    if stats.interrupted:
        print(f"dss-teacher: interrupted: {kept}", file=sys.stderr)
        return 130
    if stats.unreachable:
        print(f"dss-teacher: error: cannot reach the endpoint {_public_url(args.base_url)}: {stats.stopped} (the last: "
              f"{stats.unreachable}; --max_connection_failures sets the limit); {kept}", file=sys.stderr)  # fmt: skip
        return 3
    _print_summary(summary, output, paths)
    if stats.fatal:
        raise TeacherError(stats.fatal)
    return 0 if summary.complete else 3


def _inputs(args: argparse.Namespace) -> list[TeacherInput]:
    """--benchmark's split or --input's rows, the first --limit of them; duplicate ids are warned about."""
    if args.benchmark:
        data_dir = Path(args.data_dir) if args.data_dir else readers.default_data_dir()
        inputs = benchmark_inputs(data_dir, args.benchmark, args.split)
    else:
        inputs = read_inputs(args.input)
    if args.limit:
        inputs = inputs[: args.limit]
    warn_duplicate_ids(args.input or f"{args.benchmark} {args.split}", inputs)
    return inputs


def _options(args: argparse.Namespace) -> Options:
    return Options(
        base_url=args.base_url,
        model=args.model,
        api=args.api,
        timeout=args.timeout,
        max_retries=args.max_retries,
        max_connection_failures=args.max_connection_failures,
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        concurrency=args.concurrency,
        max_requests=args.max_requests,
        max_tokens_total=args.max_tokens_total,
        progress=not args.no_progress,
    )


def _ask(spec: prompts.PromptSpec, inputs: list[TeacherInput], opts: Options, n: int, sampling: Sampling,
         store_path: Path, api_key: str) -> tuple[Plan, RunStats, list[list[Sample | None]], int]:  # fmt: skip
    """Ask for every sample the store lacks: the plan, this run's stats, every input's samples, the store's size."""
    store = Store(store_path)
    try:
        plan = client.plan(spec, inputs, opts, n, sampling, store.records)
        if store.torn_bytes:
            print(f"dss-teacher: cut an unfinished last record ({store.torn_bytes} bytes) from {store.path}", file=sys.stderr)
        stats = asyncio.run(client.ask_all(opts, api_key, store, plan.jobs)) if plan.jobs else RunStats()
        samples = [[store.records.get(k) for k in row] for row in plan.keys]
        return plan, stats, samples, len(store.records)
    finally:
        store.close()


def _summary(args: argparse.Namespace, spec: prompts.PromptSpec, sampling: Sampling, store_path: Path, n_inputs: int,
             agg: Aggregate, samples: list[list[Sample | None]], this_run: ThisRun) -> Summary:  # fmt: skip
    source = {"benchmark": args.benchmark, "split": args.split} if args.benchmark else {"input": str(args.input)}
    return Summary(
        endpoint={"base_url": _public_url(args.base_url), "model": args.model, "api": args.api},
        store=str(store_path.resolve()),
        prompt={"name": spec.name, "version": spec.version, "sha256": spec.sha256, "file": spec.path},
        source=source,
        sampling={"n": args.n, **sampling.for_sample(0), "seed": sampling.seed},
        inputs=n_inputs,
        figures=agg.figures,
        missing_samples=sum(s is None for row in samples for s in row),
        this_run=this_run,
    )


def _print_summary(s: Summary, output: Path, paths: dict[str, Path]) -> None:
    f, r = s.figures, s.this_run
    acc = "" if f.teacher_accuracy is None else f"; teacher accuracy {f.teacher_accuracy:.2f}% on {f.graded_inputs}"
    agree = "" if f.agreement is None else f"; agreement {f.agreement:.3f}"
    print(
        f"dss-teacher: {s.inputs} inputs x {s.sampling['n']}: {f.completions} completions "
        f"({r.from_store} from the store, {r.new_completions} new), {f.truncated} truncated, "
        f"{f.parse_failures} parse failures{acc}{agree}"
    )
    print(
        f"dss-teacher: this run {r.requests} requests, {r.retries} retries, {r.tokens} tokens; "
        f"all completions {f.tokens.total} tokens"
    )
    if r.stopped:
        print(f"dss-teacher: stopped: {r.stopped}; rerun with a larger budget to continue from the store")
    if s.missing_samples:
        why = f" (last error: {r.last_error})" if r.last_error else ""
        print(f"dss-teacher: incomplete: {s.missing_samples} samples missing{why}; the output holds the complete inputs only")
    print(f"dss-teacher: wrote {output} ({f.rows_written} rows), {paths['raw'].name}, {paths['summary'].name}")
