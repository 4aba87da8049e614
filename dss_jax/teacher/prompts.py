"""Few-shot prompt files for ``dss-teacher``: loading, rendering (chat and completions) and answer parsing.

A prompt file is JSON (format ``dss-teacher-prompt/1``), versioned by its ``version`` field and by the
SHA-256 of its bytes, both recorded in the teacher's summary, so a dataset always names the prompt that made
it. The shipped files (``dss_jax/prompts/<benchmark>.json``) hold exemplars drawn from each benchmark's train
split with the released PaLM rationales, written in the released completions' style so that the project's
own parsers (``tasks/parsers.py``) read the answers; ``python -m dss_jax.teacher.prompts --write`` rebuilds
them from the released data. A user's file uses the same schema (see :data:`USER_EXAMPLE`).

Fields: ``name``, ``version``, ``parser`` (a benchmark name from ``tasks/parsers.py``, ``{"answer_marker":
"So the answer is"}``, or ``"dss-serve"`` for a served student's ``rationale`` extension), ``query`` (with
``{input}`` and ``{input_b}``), ``answer_prefix`` (completions API: the text after the query that the answer
follows, e.g. ``"A:"``), ``separator`` between exemplars, ``stop`` sequences, ``system`` (chat API),
``instruction`` (optional text before the exemplars), ``exemplars`` (``input``, optional ``input_b``,
``output``), ``extra_body`` (optional fields added to every request).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, cast

from dss_jax.tasks import answers
from dss_jax.tasks.parsers import NLI_LABELS, PARSERS, Parsed

FORMAT = "dss-teacher-prompt/1"
PROMPT_DIR = Path(__file__).resolve().parent.parent / "prompts"  # dss_jax/prompts/
SHIPPED = ("cqa", "svamp", "esnli", "anli1")
_FIELDS = {"format", "name", "version", "parser", "query", "answer_prefix", "separator", "stop", "system", "instruction",
           "exemplars", "extra_body", "source"}  # fmt: skip

USER_EXAMPLE = {
    "format": FORMAT,
    "name": "my_task",
    "version": "my_task-v1",
    "parser": {"answer_marker": "So the answer is"},
    "system": "Reason step by step, then end with 'So the answer is <label>.'",
    "query": "Q: {input}",
    "answer_prefix": "A:",
    "separator": "\n\n",
    "stop": ["\n\nQ:"],
    "exemplars": [{"input": "Is 7 prime?", "output": "7 has no divisors but 1 and 7. So the answer is yes."}],
}


class PromptError(ValueError):
    """A malformed prompt file: the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A loaded prompt file."""

    name: str
    version: str
    sha256: str
    path: str
    parser: str | dict
    query: str
    answer_prefix: str
    separator: str
    stop: tuple[str, ...]
    system: str
    instruction: str
    exemplars: tuple[dict, ...]
    extra_body: dict

    def completion_prompt(self, text: str, text_b: str = "") -> str:
        """The few-shot prompt for the completions API: exemplars, then the query and its answer prefix."""
        parts = [self.instruction] if self.instruction else []
        for ex in self.exemplars:
            parts.append(f"{self._head(ex['input'], ex.get('input_b', ''))} {ex['output']}")
        parts.append(self._head(text, text_b))
        return self.separator.join(parts)

    def chat_messages(self, text: str, text_b: str = "") -> list[dict[str, str]]:
        """The same exemplars as chat turns: each query a user message, each answer an assistant message."""
        system = "\n\n".join(s for s in (self.system, self.instruction) if s)
        msgs = [{"role": "system", "content": system}] if system else []
        for ex in self.exemplars:
            msgs.append({"role": "user", "content": render(self.query, ex["input"], ex.get("input_b", ""))})
            msgs.append({"role": "assistant", "content": ex["output"]})
        msgs.append({"role": "user", "content": render(self.query, text, text_b)})
        return msgs

    def _head(self, text: str, text_b: str) -> str:
        q = render(self.query, text, text_b)
        return f"{q}\n{self.answer_prefix}" if self.answer_prefix else q

    def parse(self, text: str, rationale_field: str | None = None) -> Parsed:
        """(rationale, label, ok) from one completion, with the project's parsers where the task has one."""
        if isinstance(self.parser, str) and self.parser in PARSERS:
            return PARSERS[self.parser](text)
        if self.parser == "dss-serve":  # the served student's label is the text, its rationale a separate field
            label, rationale = text.strip(), (rationale_field or "").strip()
            return Parsed(rationale, label, bool(label and rationale))
        return parse_marker(text, cast(dict, self.parser)["answer_marker"], self.stop)

    @property
    def benchmark(self) -> str | None:
        return self.parser if isinstance(self.parser, str) and self.parser in PARSERS else None


def render(template: str, text: str, text_b: str = "") -> str:
    """Fill ``{input}`` / ``{input_b}`` in one pass, so braces inside the inputs are left alone."""
    return re.sub(r"\{(input|input_b)\}", lambda m: text if m.group(1) == "input" else text_b, template)


def parse_marker(text: str, marker: str, stop: tuple[str, ...] = ()) -> Parsed:
    """User tasks: cut at the first stop sequence, then '<rationale> <marker> <label>.' on the last marker."""
    for s in stop:
        text = text.split(s, 1)[0]
    if marker not in text:
        return Parsed(text.strip(), "", False)
    rationale, label = text.rsplit(marker, 1)
    label = label.strip().split("\n", 1)[0].strip()
    label = label[:-1].rstrip() if label.endswith(".") else label
    return Parsed(rationale.strip(), label, bool(label))


def load(path: str | Path) -> PromptSpec:
    """Load and check a prompt file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PromptError(f"{path}: cannot read the prompt file ({e.strerror})") from None
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptError(f"{path}: not a JSON prompt file ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PromptError(f'{path}: expected a JSON object with "format": "{FORMAT}"')
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise PromptError(f"{path}: unknown field(s) {unknown}; fields: {sorted(_FIELDS)}")

    def need(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        v = d.get(key, default)
        if v is None or not isinstance(v, kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise PromptError(f"{path}: field {key!r} must be a {names}, got {v!r}")
        return v

    parser = d.get("parser")
    ok_parser = (isinstance(parser, str) and (parser in PARSERS or parser == "dss-serve")) or (
        isinstance(parser, dict) and set(parser) == {"answer_marker"} and isinstance(parser["answer_marker"], str)
        and parser["answer_marker"].strip()
    )  # fmt: skip
    if not ok_parser:
        raise PromptError(f'{path}: \'parser\' must be one of {sorted(PARSERS) + ["dss-serve"]} or {{"answer_marker": "..."}}')
    query = need("query", str)
    if "{input}" not in query:
        raise PromptError(f"{path}: 'query' must contain {{input}}")
    stop = need("stop", list, [])
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise PromptError(f"{path}: 'stop' must be a list of at most 4 non-empty strings")
    exemplars = need("exemplars", list, [])
    for i, ex in enumerate(exemplars):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("output"), str):
            raise PromptError(f"{path}: exemplars[{i}] needs string 'input' and 'output'")
    return PromptSpec(
        name=need("name", str),
        version=str(need("version", (str, int))),
        sha256=hashlib.sha256(raw).hexdigest(),
        path=str(path),
        parser=cast("str | dict", parser),
        query=query,
        answer_prefix=need("answer_prefix", str, ""),
        separator=need("separator", str, "\n\n"),
        stop=tuple(stop),
        system=need("system", str, ""),
        instruction=need("instruction", str, ""),
        exemplars=tuple(exemplars),
        extra_body=need("extra_body", dict, {}),
    )


def shipped(benchmark: str) -> PromptSpec:
    """The shipped few-shot prompt of a benchmark."""
    if benchmark not in SHIPPED:
        raise PromptError(f"no shipped prompt for {benchmark!r}; shipped: {SHIPPED} (or pass --prompt_file)")
    return load(PROMPT_DIR / f"{benchmark}.json")


# ----------------------------------------------------------------------------- building the shipped files

# (exemplar count, query, answer prefix, stop, chat system message) per benchmark, as the released prompts read.
_LAYOUT = {
    "cqa": (7, "Q: {input}", "A:", ["\n\nQ:"],
            "Answer the multiple-choice question. Reason step by step as in the examples, then end with "
            "'So the answer is (<letter>) <choice>.'"),
    "svamp": (8, "Q: {input}", "A:", ["\n\nQ:"],
              "Solve the math word problem. Reason step by step as in the examples, then end with "
              "'The answer is (<equation>).' where the equation uses only the problem's numbers and + - * /."),
    "esnli": (6, "Premise: {input}\nHypothesis: {input_b}", "Reasonings:", ["\n\nPremise:"],
              "Decide whether the premise entails the hypothesis. Give a one-sentence reason as in the examples, "
              "then a line 'Answer: <entailment|neutral|contradiction>'."),
    "anli1": (4, "Premise: {input}\nHypothesis: {input_b}", "Answer:", ["\n\nPremise:"],
              "Decide whether the premise entails the hypothesis. Reason briefly as in the examples, then end with "
              "'So the answer is <entailment|neutral|contradiction>.'"),
}  # fmt: skip


def _output(benchmark: str, ex: Any) -> str:
    """An exemplar's answer written as the released completions write theirs."""
    if benchmark == "cqa":
        return f"{ex.rationale} So the answer is ({_cqa_letter(ex)}) {ex.label}."
    if benchmark == "svamp":
        return f"{ex.rationale} The answer is {ex.llm_label}."
    if benchmark == "esnli":
        return f"{ex.rationale}\nAnswer: {ex.label}"
    return f"{ex.rationale} So the answer is {ex.label}."


def _cqa_letter(ex: Any) -> str:
    return {c: letter for letter, c in re.findall(r"^\(([a-e])\) (.*)$", ex.input, re.M)}[ex.label]


def _balance_key(benchmark: str, ex: Any) -> str:
    if benchmark == "cqa":
        return _cqa_letter(ex)
    return ex.label if benchmark in ("esnli", "anli1") else ""


def build(benchmark: str, data_dir: Path) -> dict:
    """A shipped prompt from the released data: train examples the teacher got right, classes in turn."""
    import numpy as np

    from dss_jax.tasks import readers

    count, query, prefix, stop, system = _LAYOUT[benchmark]
    split = "train" if "train" in readers.available_splits(data_dir, benchmark) else "validation"
    examples = readers.read_split(data_dir, benchmark, split)
    parse = PARSERS[benchmark]

    def good(e: readers.Example) -> bool:
        right = answers.is_correct(benchmark, e.label, e.llm_label)
        if not (e.has_teacher and e.parse_ok and right and 30 <= len(e.rationale) <= 300):
            return False
        out = _output(benchmark, e)
        return answers.same_answer(benchmark, parse(out).label, e.llm_label) and (benchmark != "esnli" or e.label in NLI_LABELS)

    order = np.random.default_rng(0).permutation(len(examples))
    pools: dict[str, list] = {}
    for i in order:
        e = examples[i]
        if good(e):
            pools.setdefault(_balance_key(benchmark, e), []).append(e)
    picked: list[Any] = []
    keys = sorted(pools)
    while len(picked) < count and any(pools.values()):
        for k in keys:
            if pools[k] and len(picked) < count:
                picked.append(pools[k].pop(0))
    return {
        "format": FORMAT,
        "name": benchmark,
        "version": f"{benchmark}-cot-v1",
        "source": f"{len(picked)} {benchmark} {split} examples (seed 0) whose released PaLM answer is right, "
        "with PaLM's rationale in the released completions' style",
        "parser": benchmark,
        "system": system,
        "query": query,
        "answer_prefix": prefix,
        "separator": "\n\n",
        "stop": stop,
        "exemplars": [
            {"input": e.input, **({"input_b": e.input_b} if e.input_b else {}), "output": _output(benchmark, e)} for e in picked
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """Rebuild the shipped prompt files from the released data (a maintainer's tool)."""
    p = argparse.ArgumentParser(prog="python -m dss_jax.teacher.prompts", description=main.__doc__)
    p.add_argument("--write", action="store_true", help="write dss_jax/prompts/<benchmark>.json")
    p.add_argument("--data_dir", default=None, help="default: $DSS_DATA_DIR, else ../shared/data/dss")
    p.add_argument("--benchmark", nargs="+", default=list(SHIPPED))
    args = p.parse_args(argv)
    from dss_jax.tasks import readers

    data_dir = Path(args.data_dir) if args.data_dir else readers.default_data_dir()
    for b in args.benchmark:
        d = build(b, data_dir)
        text = json.dumps(d, indent=1, ensure_ascii=False) + "\n"
        if args.write:
            PROMPT_DIR.mkdir(exist_ok=True)
            (PROMPT_DIR / f"{b}.json").write_text(text, encoding="utf-8")
            print(f"wrote {PROMPT_DIR / f'{b}.json'} ({len(d['exemplars'])} exemplars)")
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
