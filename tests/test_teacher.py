"""dss-teacher against a fault-injecting OpenAI-compatible endpoint on loopback (a real HTTP server, no network).

The fake endpoint answers /v1/completions and /v1/chat/completions with deterministic completions in the
released style, derived from the prompt's last query and the request's seed, and injects 429s with
Retry-After, 500s, answers slower than the client's timeout, truncated JSON bodies and finish_reason
"length", or stop listening after a number of answers (an endpoint that dies). Every request is logged with the teacher's store key (sent as a header), so the tests can prove
that nothing stored is asked for twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from conftest import REPO, SHARED_DATA, WORDS
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dss_jax import teacher
from dss_jax.tasks import parsers, readers
from dss_jax.teacher import prompts as teacher_prompts

KEY = "sk-test-secret-0123456789"
MARKER = "So the answer is"


# ----------------------------------------------------------------------------- the fake endpoint


def _h(*parts: object) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def fake_completion(query: str, seed: int) -> tuple[str, str]:
    """(text before stop sequences, finish_reason): deterministic in (query, seed), in the released style."""
    h = _h(query, seed)
    choices = re.findall(r"^\(([a-e])\) (.*)$", query, re.M)
    if choices:  # a CQA question
        letter, choice = choices[h % len(choices)]
        text = f" The answer must be {choice}. Of the above choices, only {choice} fits. So the answer is ({letter}) {choice}."
        return text + "\n\nQ: Where is the sun?\nAnswer Choices:\n(a) sky\nA:", "stop"
    words = query.split()
    if h % 7 == 0:  # cut by the token limit, with a wrong answer that would parse: it must never be used
        return f" The first word is {words[0]}. {MARKER} WRONG", "length"
    w = words[0] if h % 4 != 3 else words[min(1, len(words) - 1)]
    return f" The first word of the question is {w}. {MARKER} {w}.\n\nQ: plum pear\nA: The first word", "stop"


def last_query(body: dict, chat: bool) -> str:
    if chat:
        q = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    else:
        q = body["prompt"].rsplit("\n\n", 1)[-1]
    q = q[3:] if q.startswith("Q: ") else q
    return q[: -len("\nA:")] if q.endswith("\nA:") else q


class FakeLLM:
    """A small OpenAI-compatible server: deterministic answers, a request log, injected faults."""

    def __init__(self, faults: tuple[str | None, ...] = (), delay: float = 0.0, slow_s: float = 1.5, retry_after: str = "1",
                 die_after: int | None = None):  # fmt: skip
        self.faults, self.delay, self.slow_s, self.retry_after = faults, delay, slow_s, retry_after
        self.die_after = die_after  # after this many answers the server closes its socket: connections are refused
        self.server: uvicorn.Server | None = None
        self.log: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.new_keys = 0
        self.lock = threading.Lock()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self.answer(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self.answer(request, chat=True)

        return app

    async def answer(self, request: Request, chat: bool) -> Response:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "Incorrect API key provided"}}, status_code=401)
        body = json.loads(await request.body())
        key = request.headers.get(teacher.KEY_HEADER.lower(), "")
        with self.lock:
            attempt = self.attempts.get(key, 0)
            self.attempts[key] = attempt + 1
            fault = None
            if attempt == 0 and self.faults:  # first arrivals of keys get the faults in turn
                fault = self.faults[self.new_keys % len(self.faults)]
                self.new_keys += 1
        entry = {"t": time.monotonic(), "key": key, "attempt": attempt, "outcome": fault or "ok", "seed": body.get("seed")}
        self.log.append(entry)
        if self.delay:
            await asyncio.sleep(self.delay)
        if fault == "429":
            return JSONResponse({"error": {"message": "Rate limit"}}, status_code=429, headers={"Retry-After": self.retry_after})
        if fault == "500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        text, finish = fake_completion(last_query(body, chat), body.get("seed", 0))
        for s in body.get("stop") or []:
            text = text.split(s, 1)[0]
        n_prompt = len(json.dumps(body.get("messages") or body.get("prompt")).split())
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(text.split()), "total_tokens": n_prompt + len(text.split())}
        if chat:
            out = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"], "usage": usage,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()}, "finish_reason": finish}]}  # fmt: skip
        else:
            out = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body["model"], "usage": usage,
                   "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}  # fmt: skip
        raw = json.dumps(out).encode()
        if fault == "truncated":
            return Response(raw[: len(raw) // 2], media_type="application/json")
        entry["answered"] = fault != "slow"  # a slow answer arrives after the client gave up on it
        if self.die_after is not None and len(self.answered()) >= self.die_after:
            # uvicorn closes the listening socket first, then waits for this answer and closes its connection
            self.server.should_exit = True
            await asyncio.sleep(0.5)
        return Response(raw, media_type="application/json")

    def answered(self) -> list[str]:
        return [e["key"] for e in self.log if e.get("answered")]


@contextlib.contextmanager
def serving(fake: FakeLLM, start_after: float = 0.0):
    """The fake on a loopback port; with ``start_after`` it listens only that many seconds later (refused till then)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_config=None, access_log=False, lifespan="off"))
    fake.server = server

    def run() -> None:
        time.sleep(start_after)
        server.run(sockets=[sock])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started and not start_after:
        assert time.time() < deadline and t.is_alive(), "fake endpoint did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


# ----------------------------------------------------------------------------- helpers

PROMPT = {
    "format": teacher_prompts.FORMAT,
    "name": "toy",
    "version": "toy-v1",
    "parser": {"answer_marker": MARKER},
    "system": "Name the first word.",
    "query": "Q: {input}",
    "answer_prefix": "A:",
    "stop": ["\n\nQ:"],
    "exemplars": [{"input": "pear plum", "output": f"The first word of the question is pear. {MARKER} pear."}],
}


def toy_inputs(path: Path, n: int, seed: int = 0, labels: bool = True) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            row = {"id": f"t{i}", "input": " ".join(words)}
            if labels:
                row["label"] = words[0]
            f.write(json.dumps(row) + "\n")
    return path


def write_prompt(d: Path) -> Path:
    p = d / "toy_prompt.json"
    p.write_text(json.dumps(PROMPT))
    return p


def args(url: str, inp: Path, out: Path, prompt: Path, *extra: str) -> list[str]:
    return ["--base_url", url, "--model", "fake-1", "--input", str(inp), "--prompt_file", str(prompt), "--output", str(out),
            "--no_progress", "--backoff_base", "0.05", "--backoff_max", "0.5", *extra]  # fmt: skip


def summary_of(out: Path) -> dict:
    return json.loads(teacher.side_paths(out)["summary"].read_text())


def store_keys(out: Path) -> list[str]:
    lines = teacher.side_paths(out)["store"].read_bytes().split(b"\n")
    return [json.loads(x)["key"] for x in lines if x.strip() and x.endswith(b"}")]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


# ----------------------------------------------------------------------------- tests


def test_faults_are_survived_and_nothing_is_lost(tmp_path):
    inp = toy_inputs(tmp_path / "in.jsonl", 16)
    prompt = write_prompt(tmp_path)
    # slow_s well past the client's 0.5 s timeout: on a loaded machine its timer may fire late, and a slow answer it
    # accepted is one the fake counts as never delivered
    fake = FakeLLM(faults=("429", "500", "slow", "truncated", None, None), slow_s=3.0)
    out = tmp_path / "faulty" / "out.jsonl"
    t0 = time.monotonic()
    with serving(fake) as url:
        assert teacher.main(args(url, inp, out, prompt, "--n", "3", "--concurrency", "4", "--timeout", "0.5")) == 0
        s = summary_of(out)
        r = s["this_run"]
        assert {"http_429", "http_500", "timeout", "bad_body"} <= set(r["retried_faults"]), r
        assert r["retries"] == sum(r["retried_faults"].values()) and r["failed_samples"] == 0
        assert s["complete"] and s["completions"] == 48
        # every completion stored once; each stored key was answered by the server
        keys = store_keys(out)
        distinct = len({(g["input"], j) for g in map(json.loads, inp.read_text().splitlines()) for j in range(3)})
        assert len(keys) == len(set(keys)) == distinct and set(keys) == set(fake.answered())
        assert sorted(fake.answered()) == sorted(keys)  # answered once each: equal inputs share a completion
        assert r["new_completions"] == distinct < 48
        # Retry-After: 1 was honoured: the retry of a 429'd key came at least a second later
        for e in [e for e in fake.log if e["outcome"] == "429"]:
            nxt = min(x["t"] for x in fake.log if x["key"] == e["key"] and x["attempt"] == 1)
            assert nxt - e["t"] >= 1.0
        # rerun: everything comes from the store
        before = len(fake.log)
        assert teacher.main(args(url, inp, out, prompt, "--n", "3")) == 0
        assert len(fake.log) == before and summary_of(out)["this_run"]["from_store"] == 48
    assert time.monotonic() - t0 < 30

    # the same output as a run without faults, in another directory
    clean = tmp_path / "clean" / "out.jsonl"
    with serving(FakeLLM()) as url:
        assert teacher.main(args(url, inp, clean, prompt, "--n", "3", "--concurrency", "4")) == 0
    assert out.read_bytes() == clean.read_bytes()

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    gold = [json.loads(x) for x in inp.read_text().splitlines()]
    assert [r["id"] for r in rows] == [g["id"] for g in gold] and all(
        r["label"] == g["label"] for r, g in zip(rows, gold, strict=True)
    )
    # truncated completions are counted and never used, though their text parses
    expected_length = sum(fake_completion(g["input"], j)[1] == "length" for g in gold for j in range(3))
    assert s["truncated"] == expected_length > 0
    assert all(r.get("llm_label") != "WRONG" for r in rows)
    raw = [json.loads(x) for x in teacher.side_paths(out)["raw"].read_text().splitlines()]
    assert sum(x["finish_reason"] == "length" for r in raw for x in r["samples"]) == expected_length
    # the vote: the majority of the usable samples, ties to the first
    for r, rr in zip(rows, raw, strict=True):
        usable = [x for x in rr["samples"] if x["finish_reason"] != "length" and x["parsed"]]
        if not usable:
            assert "llm_label" not in r
            continue
        labels = [x["label"] for x in usable]
        best = max(labels, key=lambda lab: (labels.count(lab), -labels.index(lab)))
        assert r["llm_label"] == best and r["rationale"] == f"The first word of the question is {best}."
    acc = 100.0 * sum(r.get("llm_label") == r["label"] for r in rows) / len(rows)
    assert s["teacher_accuracy"] == pytest.approx(acc, abs=1e-3)
    assert 0 < s["agreement"] <= 1 and s["tokens"]["total"] > 0


def _run_cli(argv: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    return subprocess.Popen([sys.executable, "-m", "dss_jax.teacher", *argv], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


@pytest.mark.slow  # runs dss-teacher as a subprocess, three times (~10 s)
def test_sigkill_then_rerun_asks_nothing_twice_and_writes_the_same_file(tmp_path):
    inp = toy_inputs(tmp_path / "in.jsonl", 40, seed=1)
    prompt = write_prompt(tmp_path)
    killed, whole = tmp_path / "killed" / "out.jsonl", tmp_path / "whole" / "out.jsonl"
    fake = FakeLLM(delay=0.1)
    common = ("--n", "2", "--concurrency", "4", "--api", "chat")
    with serving(fake) as url:
        proc = _run_cli(args(url, inp, killed, prompt, *common))
        store = teacher.side_paths(killed)["store"]
        deadline = time.time() + 60
        while not (store.exists() and store.read_bytes().count(b"\n") >= 12):
            assert proc.poll() is None, proc.communicate(timeout=60)
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        stored = set(store_keys(killed))
        assert 12 <= len(stored) < 80
        with open(store, "ab") as f:  # a record torn by the kill: never a completion
            f.write(b'{"key": "abc", "text": "The first')
        n_before = len(fake.log)
        proc = _run_cli(args(url, inp, killed, prompt, *common))
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        rerun = [e["key"] for e in fake.log[n_before:]]
        assert not stored & set(rerun), "a stored completion was asked for again"
        assert len(rerun) == len(set(rerun)) == 80 - len(stored)
        assert "unfinished last record" in stderr
        # in flight at the kill, answered but never stored: at most --concurrency of them
        assert len(fake.answered()) - 80 <= 4

        proc = _run_cli(args(url, inp, whole, prompt, *common))
        assert proc.communicate(timeout=120) and proc.returncode == 0
    assert killed.read_bytes() == whole.read_bytes()
    assert len(killed.read_text().splitlines()) == 40
    assert "dss-teacher: 40 inputs x 2" in stdout


def test_budgets_stop_cleanly_and_a_rerun_finishes_the_same(tmp_path):
    inp = toy_inputs(tmp_path / "in.jsonl", 10, seed=2, labels=False)
    prompt = write_prompt(tmp_path)
    out, whole = tmp_path / "b" / "out.jsonl", tmp_path / "w" / "out.jsonl"
    with serving(FakeLLM()) as url:
        assert teacher.main(args(url, inp, out, prompt, "--n", "2", "--concurrency", "1", "--max_requests", "7")) == 3
        s = summary_of(out)
        assert s["this_run"]["requests"] == 7 and "--max_requests 7 reached" in s["this_run"]["stopped"]
        assert not s["complete"] and s["inputs_complete"] == 3 and s["missing_samples"] == 13
        assert teacher.main(args(url, inp, out, prompt, "--n", "2", "--concurrency", "1", "--max_tokens_total", "1")) == 3
        assert "--max_tokens_total 1 reached" in summary_of(out)["this_run"]["stopped"]
        assert summary_of(out)["this_run"]["requests"] == 1
        assert teacher.main(args(url, inp, out, prompt, "--n", "2")) == 0
        assert summary_of(out)["this_run"]["requests"] == 12
        assert teacher.main(args(url, inp, whole, prompt, "--n", "2")) == 0
    assert out.read_bytes() == whole.read_bytes()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # no gold labels: the teacher's label becomes the label; inputs with no usable answer are dropped
    assert all(r["label"] == r["llm_label"] for r in rows)
    s = summary_of(out)
    assert s["teacher_accuracy"] is None and s["labels_from_teacher"] == len(rows) == 10 - s["rows_dropped_no_label"]


def test_shipped_prompt_on_a_benchmark_both_apis(tmp_path):
    gold = readers.read_split(SHARED_DATA, "cqa", "validation")[:6]
    with serving(FakeLLM()) as url:
        for api in ("completions", "chat"):
            out = tmp_path / api / "cqa.jsonl"
            argv = ["--base_url", url, "--model", "fake-1", "--benchmark", "cqa", "--split", "validation", "--limit", "6",
                    "--data_dir", str(SHARED_DATA), "--output", str(out), "--no_progress", "--api", api]  # fmt: skip
            assert teacher.main(argv) == 0
            rows = [json.loads(x) for x in out.read_text().splitlines()]
            assert [r["input"] for r in rows] == [e.input for e in gold] and [r["label"] for r in rows] == [e.label for e in gold]
            for r, e in zip(rows, gold, strict=True):  # the answer is the fake's choice, read by tasks/parsers.parse_cqa
                assert r["llm_label"] == re.search(r"So the answer is \([a-e]\) (.*)\.\n", fake_completion(e.input, 0)[0])[1]
            s = summary_of(out)
            assert s["parse_failures"] == 0 and s["prompt"]["version"] == "cqa-cot-v1"
            shipped = teacher_prompts.PROMPT_DIR / "cqa.json"
            assert s["prompt"]["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
            assert s["teacher_accuracy"] == pytest.approx(100.0 * sum(r["llm_label"] == r["label"] for r in rows) / 6, abs=1e-3)


def _released(benchmark: str, disk_split: str) -> tuple[list[readers.Example], list[str]]:
    gold_file = SHARED_DATA / benchmark / f"{benchmark}_{disk_split}.json"
    examples = readers.read_disk_split(SHARED_DATA, benchmark, disk_split)
    completions = readers.read_completions(
        SHARED_DATA / benchmark / "llm", disk_split, len(examples), readers.LLM_BATCH_SIZE[benchmark], gold_file
    )
    return examples, completions


@pytest.mark.parametrize("benchmark", ["cqa", "svamp"])
def test_teacher_parsing_agrees_with_the_data_readers_on_released_completions(benchmark):
    """The released PaLM completions through dss-teacher's path (store records, vote, output) give dss-data's labels."""
    from dss_jax.tasks import metrics  # dss-data's teacher accuracy

    spec = teacher_prompts.shipped(benchmark)
    for disk_split in ("train", "test"):
        examples, completions = _released(benchmark, disk_split)
        inputs = [teacher.TeacherInput(e.input, e.input_b, e.label) for e in examples]
        samples = [[teacher.Sample(key=str(i), text=c, finish_reason="stop")] for i, c in enumerate(completions)]
        agg = teacher.aggregate(spec, inputs, samples)
        assert len(agg.rows) == len(examples)
        for row, e in zip(agg.rows, examples, strict=True):
            assert row.get("llm_label", "") == e.llm_label
            assert ("rationale" in row) == e.parse_ok and row.get("rationale", e.rationale) == e.rationale
        f = dataclasses.asdict(agg.figures)  # the summary's figures
        assert f["parse_failures"] == sum(not e.parse_ok for e in examples)
        assert f["teacher_accuracy"] == pytest.approx(metrics.teacher_accuracy(benchmark, examples), abs=1e-3)


def test_shipped_prompts_parse_their_own_exemplars_and_ship_with_the_package():
    for b in teacher_prompts.SHIPPED:
        spec = teacher_prompts.shipped(b)
        assert spec.version == f"{b}-cot-v1" and len(spec.exemplars) >= 4
        for ex in spec.exemplars:
            p = parsers.PARSERS[b](ex["output"])
            assert p.ok and p.rationale, (b, ex)
            assert spec.completion_prompt("x", "y").count(ex["output"]) == 1
        assert spec.completion_prompt("QUESTION?", "HYP").endswith(
            spec.query.replace("{input}", "QUESTION?").replace("{input_b}", "HYP") + "\n" + spec.answer_prefix
        )
        msgs = spec.chat_messages("QUESTION?", "HYP")
        assert msgs[0]["role"] == "system" and len(msgs) == 2 + 2 * len(spec.exemplars)
    setup = (REPO / "setup.py").read_text()
    assert '"prompts/*.json"' in setup and "dss-teacher=dss_jax.teacher.cli:main" in setup
    assert teacher_prompts.render("Q: {input} {x}", "a {input_b} b") == "Q: a {input_b} b {x}"  # braces in inputs are safe


def test_show_prompt_prints_the_prompt_without_asking(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")  # no key needed: nothing is sent
    base = ["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--benchmark", "svamp", "--split", "test",
            "--data_dir", str(SHARED_DATA), "--output", str(tmp_path / "o.jsonl"), "--show_prompt"]  # fmt: skip
    first = readers.read_split(SHARED_DATA, "svamp", "test")[0].input
    assert teacher.main(base) == 0
    assert capsys.readouterr().out.rstrip("\n").endswith(f"Q: {first}\nA:")
    assert teacher.main([*base, "--api", "chat"]) == 0
    msgs = json.loads(capsys.readouterr().out)
    assert msgs[-1] == {"role": "user", "content": f"Q: {first}"} and not (tmp_path / "o.jsonl").exists()


def test_help_explains_every_flag():
    p = teacher.build_parser()
    for a in p._actions:
        assert a.help and len(a.help) > 10, a.option_strings
    text = " ".join(p.format_help().split())
    assert "--api_key_env" in text and "never taken as a flag" in text and "Exit status" in text


def _one_line_error(capsys, argv: list[str], words: str, code: int = 2) -> None:
    assert teacher.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("dss-teacher: error:") and "\n" not in err and words in err, err
    assert KEY not in err


def test_bad_inputs_give_one_line_errors_and_the_key_is_never_written(tmp_path, capsys, monkeypatch):
    prompt = write_prompt(tmp_path)
    good = toy_inputs(tmp_path / "good.jsonl", 3)
    out = tmp_path / "o" / "out.jsonl"
    url = "http://127.0.0.1:9/v1"
    monkeypatch.delenv("OPENAI_API_KEY")
    _one_line_error(capsys, args(url, good, out, prompt), "environment variable OPENAI_API_KEY is not set")
    monkeypatch.setenv("MY_KEY", "")
    _one_line_error(capsys, args(url, good, out, prompt, "--api_key_env", "MY_KEY"), "MY_KEY is not set")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a b"}\n\n{"input": "c d"\n')
    _one_line_error(capsys, args(url, bad, out, prompt), f"{bad}:3: malformed JSON")
    bad.write_text('{"input": "a b"}\n{"label": "x"}\n')
    _one_line_error(capsys, args(url, bad, out, prompt), f"{bad}:2: missing field(s) ['input']")
    bad.write_text('{"input": "a b", "label": 3}\n')
    _one_line_error(capsys, args(url, bad, out, prompt), f"{bad}:1: field 'label' must be a string")
    bad.write_text('{"input": "a b"}\n{"input": "  "}\n')
    _one_line_error(capsys, args(url, bad, out, prompt), f"{bad}:2: field 'input' is empty")
    _one_line_error(capsys, args(url, tmp_path / "nope.jsonl", out, prompt), "nope.jsonl: no such file")
    broken = tmp_path / "p.json"
    broken.write_text(json.dumps({**PROMPT, "query": "no placeholder"}))
    _one_line_error(capsys, args(url, good, out, broken), "'query' must contain {input}")
    with pytest.raises(SystemExit):
        teacher.main(["--base_url", url, "--model", "m", "--input", str(good), "--output", str(out)])
    assert "--input needs --prompt_file" in capsys.readouterr().err

    with serving(FakeLLM()) as live:  # a wrong key: the endpoint's 401 ends the run with one line
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        _one_line_error(capsys, args(live, good, out, prompt), "HTTP 401")
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        assert teacher.main(args(live, good, out, prompt)) == 0
    printed = capsys.readouterr()
    assert KEY not in printed.out + printed.err
    for f in out.parent.iterdir():
        assert KEY.encode() not in f.read_bytes(), f


@pytest.mark.slow  # trains two tiny students and serves one (a few minutes on 2 cores)
def test_end_to_end_a_served_student_teaches_and_its_output_trains(tmp_path, toy_jsonl, toy_student):
    """dss-train (the session's toy student) -> dss-serve -> dss-teacher (from the served student) -> dss-train on
    the teacher's output."""
    import httpx
    from conftest import train_cmd, xla_env

    student = toy_student
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dss_jax.serve",
            f"--model_dir={student}",
            f"--port={port}",
            "--max_batch=4",
            "--max_wait_ms=20",
            "--no_precompile",
        ],
        env=xla_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert serve.poll() is None and time.time() < deadline, "dss-serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        inp = toy_inputs(tmp_path / "new_inputs.jsonl", 48, seed=7)
        prompt = tmp_path / "student_prompt.json"  # the student takes the bare input; its rationale is an extension field
        prompt.write_text(json.dumps({"format": teacher_prompts.FORMAT, "name": "toy", "version": "toy-student-v1",
                                      "parser": "dss-serve", "query": "{input}", "extra_body": {"rationale": True}}))  # fmt: skip
        out = tmp_path / "taught" / "toy_teacher.jsonl"
        argv = ["--base_url", url + "/v1", "--model", "student", "--input", str(inp), "--prompt_file", str(prompt),
                "--output", str(out), "--max_tokens", "24", "--concurrency", "8", "--no_progress"]  # fmt: skip
        p = _run_cli(argv)
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        n_served = httpx.get(url + "/health").json()["requests"]
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    s = summary_of(out)
    assert s["complete"] and s["this_run"]["requests"] == n_served == 48
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 48 and sum("rationale" in r for r in rows) >= 24, s
    gold = {json.loads(x)["id"]: json.loads(x)["label"] for x in inp.read_text().splitlines()}
    right = sum(r.get("llm_label") == gold[r["id"]] for r in rows)  # a 60-step student: graded, not required to be good
    assert s["teacher_accuracy"] == pytest.approx(100.0 * right / 48, abs=1e-3)

    trained = tmp_path / "trained_on_teacher"
    cmd = train_cmd(trained, out, "--gin.TRAIN_STEPS=4", "--gin.train.train.eval_every=0", "--gin.train.train.checkpoint_every=4",
                    "--gin.train.train.evaluate_test=False", "--gin.train.train.report_train_examples=0")  # fmt: skip
    cmd += [f"--gin.vocab.get_vocabulary.train_on='{toy_jsonl}'"]
    r = subprocess.run(cmd, env=xla_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (trained / "summary.json").exists()


def test_the_vote_keeps_every_distinct_rationale_of_the_winning_answer():
    """--n samples that agree on the answer give the output row a ``rationales`` list (first = ``rationale``), which
    DataOptions.rationales_per_input trains on; losing, truncated and repeated samples stay out."""
    spec = teacher_prompts.shipped("svamp")
    texts = [
        ("He has 3 and gets 2 more. The answer is (3 + 2).", "stop"),
        ("3 apples plus 2 apples. The answer is (2 + 3).", "stop"),  # the same value: the same answer
        ("He gives 2 away. The answer is (3 - 2).", "stop"),
        ("He has 3 and gets 2 more. The answer is (3 + 2).", "stop"),  # a repeat
        ("Add them up. The answer is (3 + 2).", "length"),  # cut by the token limit: never used
    ]
    v = teacher.majority(spec, [teacher.Sample(key=str(j), text=t, finish_reason=f) for j, (t, f) in enumerate(texts)])
    assert v.rationale == "He has 3 and gets 2 more."
    assert v.rationales == ["He has 3 and gets 2 more.", "3 apples plus 2 apples."]


def test_equivalent_svamp_equations_vote_together():
    """The SVAMP answers (8 + 2) and (2 + 8) are one answer (tasks/answers.answer_key): together they outvote
    (5 * 3), which was voted for first and would win a three-way tie of distinct texts."""
    spec = teacher_prompts.shipped("svamp")
    texts = [
        "5 bags of 3. The answer is (5 * 3).",
        "8 and 2 more. The answer is (8 + 2).",
        "2 and 8 more. The answer is (2 + 8).",
    ]
    samples = [teacher.Sample(key=str(j), text=t, finish_reason="stop") for j, t in enumerate(texts)]
    v = teacher.majority(spec, samples)
    assert v.label == "(8 + 2)" and sorted(v.counts.values()) == [1, 2]
    assert v.rationales == ["8 and 2 more.", "2 and 8 more."]
    agg = teacher.aggregate(spec, [teacher.TeacherInput("Q", label="(10)")], [samples])
    assert agg.rows[0]["llm_label"] == "(8 + 2)" and agg.figures.agreement == pytest.approx(2 / 3, abs=1e-3)
    assert agg.figures.teacher_accuracy == 100.0


# ----------------------------------------------------------------------------- failing fast and safely (CLI in subprocesses)


def _cli(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    return subprocess.run([sys.executable, "-m", "dss_jax.teacher", *argv], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kw)  # fmt: skip


def _lines(r: subprocess.CompletedProcess) -> list[str]:
    return (r.stdout + r.stderr).strip().splitlines()


def closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.mark.slow  # runs dss-teacher as a subprocess
def test_a_closed_port_stops_the_run_within_a_minute_with_one_line(tmp_path):
    """The circuit breaker, with the default retry settings: the time to give up does not grow with the inputs."""
    inp = toy_inputs(tmp_path / "in.jsonl", 40)
    prompt = write_prompt(tmp_path)
    out = tmp_path / "o" / "out.jsonl"
    port = closed_port()
    argv = ["--base_url", f"http://127.0.0.1:{port}/v1", "--model", "fake-1", "--input", str(inp), "--prompt_file",
            str(prompt), "--output", str(out), "--no_progress"]  # fmt: skip
    t0 = time.monotonic()
    r = _cli(argv, timeout=90)
    elapsed = time.monotonic() - t0
    lines = _lines(r)
    assert r.returncode == 3 and len(lines) == 1, (r.returncode, lines)
    assert lines[0].startswith("dss-teacher: error:") and f"127.0.0.1:{port}" in lines[0] and "refused" in lines[0], lines
    assert elapsed < 60, elapsed
    assert summary_of(out)["this_run"]["stopped"] and out.read_text() == ""


@pytest.mark.slow  # runs dss-teacher as a subprocess, twice
def test_an_endpoint_that_dies_mid_run_keeps_its_answers_and_a_rerun_completes(tmp_path):
    inp = toy_inputs(tmp_path / "in.jsonl", 12, seed=3)
    prompt = write_prompt(tmp_path)
    out, whole = tmp_path / "died" / "out.jsonl", tmp_path / "whole" / "out.jsonl"
    dying = FakeLLM(die_after=5)
    with serving(dying) as url:
        r = _cli(args(url, inp, out, prompt, "--concurrency", "1"), timeout=90)
    lines = _lines(r)
    assert r.returncode == 3 and len(lines) == 1 and url.rsplit("/", 1)[0] in lines[0], (r.returncode, lines)
    stored = store_keys(out)
    assert len(stored) == 5 and set(stored) == set(dying.answered())
    assert len(out.read_text().splitlines()) == summary_of(out)["inputs_complete"] == 5

    live = FakeLLM()
    with serving(live) as url:
        r = _cli(args(url, inp, out, prompt), timeout=120)
        assert r.returncode == 0, r.stderr
        assert not set(stored) & {e["key"] for e in live.log}, "a stored completion was asked for again"
        assert _cli(args(url, inp, whole, prompt), timeout=120).returncode == 0
    assert out.read_bytes() == whole.read_bytes() and len(out.read_text().splitlines()) == 12


@pytest.mark.slow  # runs dss-teacher as a subprocess, twice
def test_ctrl_c_gives_one_line_keeps_the_work_and_exits_130(tmp_path):
    inp = toy_inputs(tmp_path / "in.jsonl", 40, seed=4)
    prompt = write_prompt(tmp_path)
    out = tmp_path / "o" / "out.jsonl"
    fake = FakeLLM(delay=0.1)
    with serving(fake) as url:
        proc = _run_cli(args(url, inp, out, prompt, "--n", "2", "--concurrency", "4"))
        store = teacher.side_paths(out)["store"]
        deadline = time.time() + 60
        while not (store.exists() and store.read_bytes().count(b"\n") >= 12):
            assert proc.poll() is None, proc.communicate(timeout=60)
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        lines = (stdout + stderr).strip().splitlines()
        assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], (proc.returncode, stdout, stderr)
        stored = set(store_keys(out))
        assert len(stored) >= 12
        partial = out.read_text().splitlines()
        assert len(partial) == summary_of(out)["inputs_complete"] > 0
        n_before = len(fake.log)
        r = _cli(args(url, inp, out, prompt, "--n", "2", "--concurrency", "4"), timeout=120)
        assert r.returncode == 0, r.stderr
        assert not stored & {e["key"] for e in fake.log[n_before:]}, "a stored completion was asked for again"
    final = out.read_text().splitlines()
    assert len(final) == 40 and set(partial) <= set(final)


@pytest.mark.slow  # runs dss-teacher as a subprocess, twice
def test_an_output_that_cannot_be_written_is_refused_before_the_first_request(tmp_path):
    inp = toy_inputs(tmp_path / "in.jsonl", 3)
    prompt = write_prompt(tmp_path)
    (tmp_path / "a_file").write_text("x")
    fake = FakeLLM()
    with serving(fake) as url:
        for out, words in ((tmp_path, "is a directory"), (tmp_path / "a_file" / "out.jsonl", "cannot write")):
            r = _cli(args(url, inp, out, prompt), timeout=60)
            lines = _lines(r)
            assert r.returncode == 2 and len(lines) == 1 and str(out) in lines[0] and words in lines[0], lines
    assert fake.log == []


@pytest.mark.slow  # runs dss-teacher as a subprocess
def test_written_files_honour_the_umask(tmp_path):
    inp = toy_inputs(tmp_path / "in.jsonl", 3)
    prompt = write_prompt(tmp_path)
    out = tmp_path / "o" / "out.jsonl"
    with serving(FakeLLM()) as url:
        r = _cli(args(url, inp, out, prompt), timeout=60, preexec_fn=lambda: os.umask(0o002))
    assert r.returncode == 0, r.stderr
    for f in (out, *teacher.side_paths(out).values()):
        assert f.stat().st_mode & 0o777 == 0o664, (f, oct(f.stat().st_mode))


@pytest.mark.slow  # runs dss-teacher as a subprocess
def test_duplicate_ids_are_warned_about_in_one_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    ids = ["a", "b", "a", "c", "b", "a", "d"]
    inp.write_text(
        "".join(json.dumps({"id": i, "input": f"{w} pear", "label": w}) + "\n" for i, w in zip(ids, WORDS, strict=False))
    )
    prompt = write_prompt(tmp_path)
    with serving(FakeLLM()) as url:
        r = _cli(args(url, inp, tmp_path / "o" / "out.jsonl", prompt), timeout=60)
    assert r.returncode == 0, r.stderr
    warnings = [x for x in r.stderr.splitlines() if "duplicate" in x]
    assert len(warnings) == 1 and "2 ids" in warnings[0] and "'a', 'b'" in warnings[0] and str(inp) in warnings[0], r.stderr


@pytest.mark.slow  # runs dss-teacher as a subprocess, four times
def test_an_output_written_from_another_store_is_not_overwritten(tmp_path):
    inp = toy_inputs(tmp_path / "in.jsonl", 4)
    prompt = write_prompt(tmp_path)
    out = tmp_path / "o" / "out.jsonl"
    store_a, store_b = tmp_path / "a.store.jsonl", tmp_path / "b.store.jsonl"
    fake = FakeLLM()
    with serving(fake) as url:
        assert _cli(args(url, inp, out, prompt, "--store", str(store_a)), timeout=60).returncode == 0
        written = out.read_bytes()
        n_requests = len(fake.log)
        for other in (["--store", str(store_b)], []):  # another store, or the default one beside the output
            r = _cli(args(url, inp, out, prompt, *other), timeout=60)
            lines = _lines(r)
            assert r.returncode == 2 and len(lines) == 1 and str(store_a) in lines[0] and str(out) in lines[0], lines
        assert len(fake.log) == n_requests and out.read_bytes() == written
        r = _cli(args(url, inp, out, prompt, "--store", str(store_a)), timeout=60)  # the same store: a rerun
        assert r.returncode == 0 and len(fake.log) == n_requests, r.stderr


def test_an_endpoint_that_comes_up_late_is_waited_for(tmp_path):
    """A short outage (connections refused for the first 3 s) is probed through, not given up on."""
    import openai  # noqa: F401  (imported now, so the run's first request comes well inside the outage)
    import tqdm  # noqa: F401

    inp = toy_inputs(tmp_path / "in.jsonl", 6, seed=5)
    prompt = write_prompt(tmp_path)
    out = tmp_path / "o" / "out.jsonl"
    with serving(FakeLLM(), start_after=3.0) as url:
        argv = args(url, inp, out, prompt, "--concurrency", "4", "--backoff_base", "1", "--backoff_max", "60")
        assert teacher.main([*argv, "--max_connection_failures", "8"]) == 0
    s = summary_of(out)
    assert s["complete"] and s["this_run"]["retried_faults"]["connection"] >= 1, s["this_run"]


def test_the_breaker_counts_one_outage_once_whatever_the_concurrency():
    """Requests in flight when the endpoint goes away fail together: that is one failure, not --concurrency of them;
    then one request probes at a time, and any answer closes the breaker."""

    async def scenario() -> None:
        b = teacher.Breaker(limit=3, base=0.0, cap=0.0)
        in_flight = [object() for _ in range(8)]
        for r in in_flight:
            await asyncio.wait_for(b.turn(r), 1)  # closed: everyone may send
        for r in in_flight:
            await b.failed(r, "Connection refused")
        assert b.failures == 1 and b.prober is in_flight[0] and not b.tripped
        waiting = asyncio.ensure_future(b.turn(in_flight[1]))  # not the probe: waits for the breaker to close
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await b.reached()  # the probe got an answer
        await asyncio.wait_for(waiting, 1)
        assert b.failures == 0
        for _ in range(3):  # the probe fails three times in a row: tripped, and waiters are let go
            await asyncio.wait_for(b.turn(in_flight[0]), 1)
            await b.failed(in_flight[0], "Connection refused")
        assert b.tripped == "Connection refused"
        await asyncio.wait_for(b.turn(in_flight[5]), 1)

    asyncio.run(scenario())
