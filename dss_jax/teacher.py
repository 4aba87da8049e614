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
import email.utils
import fcntl
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dss_jax import teacher_prompts
from dss_jax.tasks import arithmetic, quality, readers
from dss_jax.tasks.parsers import Parsed

KEY_HEADER = "X-DSS-Teacher-Key"  # sent with each request so server logs can be matched to the store
CONNECT_TIMEOUT_S = 10.0  # the longest wait for a connection (--timeout if shorter)


class TeacherError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class TeacherInput:
    text: str
    text_b: str = ""
    label: str | None = None
    id: str | int | None = None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling parameters sent with every request (part of the store key)."""

    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None  # sample j sends seed + j; None sends no seed
    extra_body: dict

    def for_sample(self, j: int) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
            "seed": None if self.seed is None else self.seed + j,
            "extra_body": self.extra_body,
        }


def request_key(model: str, api: str, prompt: str | list, sampling: dict, sample: int) -> str:
    """The store key: what a completion costs to ask for, so equal requests are never paid for twice."""
    blob = json.dumps(
        {"model": model, "api": api, "prompt": prompt, "sampling": sampling, "sample": sample},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- inputs


def read_inputs(path: str | os.PathLike) -> list[TeacherInput]:
    """A user JSONL: ``input`` (required), ``label``, ``id``, ``input_b``; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise TeacherError(f"{path}: no such file")
    out = []
    for lineno, row in readers.read_jsonl_lines(path, ("input",)):
        for key in ("input", "label", "input_b"):
            if key in row and not isinstance(row[key], str):
                raise readers.DataFormatError(f"{path}:{lineno}: field {key!r} must be a string, got {type(row[key]).__name__}")
        if not row["input"].strip():
            raise readers.DataFormatError(f"{path}:{lineno}: field 'input' is empty")
        rid = row.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise readers.DataFormatError(f"{path}:{lineno}: field 'id' must be a string or an integer")
        label = row.get("label")
        out.append(TeacherInput(row["input"], row.get("input_b", ""), label if label and label.strip() else None, rid))
    return out


def benchmark_inputs(data_dir: Path, benchmark: str, split: str) -> list[TeacherInput]:
    return [TeacherInput(e.input, e.input_b, e.label) for e in readers.read_split(data_dir, benchmark, split)]


# ----------------------------------------------------------------------------- the store


class Store:
    """Append-only JSONL of completions, fsynced per record; a torn last line (SIGKILL mid-write) is cut off.

    One writer at a time: the file is locked while a run holds it.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
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
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # cannot happen with one writer; skip rather than refuse the store
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                self.records.setdefault(rec["key"], rec)

    def append(self, rec: dict) -> None:
        self._f.write((json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.setdefault(rec["key"], rec)

    def close(self) -> None:
        self._f.close()


def _umask() -> int:
    """The process umask (read from /proc where it can be: setting it to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, then os.replace: readers see the old file or the new one.

    The file gets the mode ``open()`` would give it (0666 less the umask), not mkstemp's private 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ----------------------------------------------------------------------------- asking


@dataclasses.dataclass(frozen=True)
class Job:
    index: int  # input row
    sample: int
    key: str
    prompt: str | list  # a completions prompt or chat messages
    sampling: dict


@dataclasses.dataclass
class RunStats:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    new_completions: int = 0
    tokens: int = 0  # prompt + completion tokens of this run's answered requests
    failed: int = 0  # samples given up on after --max_retries
    rejected: int = 0  # 4xx other than 408/409/429: the request itself was refused
    faults: dict = dataclasses.field(default_factory=dict)  # retried faults by kind
    last_error: str = ""
    stopped: str = ""  # why the run stopped early, if it did
    fatal: str = ""  # the endpoint refused the key or the model: no point asking again
    unreachable: str = ""  # the circuit breaker tripped: the endpoint cannot be reached
    interrupted: bool = False  # SIGINT (Ctrl-C)


class BadResponse(Exception):
    """A 2xx whose body is not a usable completion (truncated or malformed JSON, no choices)."""


def _retry_after(headers: Any) -> float | None:
    """Seconds from ``Retry-After-Ms`` / ``Retry-After`` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        v = headers.get(name)
        if v is None:
            continue
        try:
            return max(0.0, float(v) / scale)
        except ValueError:
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError, IndexError):
            return None
    return None


def backoff_delay(attempt: int, retry_after: float | None, base: float, cap: float) -> float:
    """Retry-After when the server gives one (never less, a little jitter above); else capped exponential with jitter."""
    if retry_after is not None:
        return min(retry_after, 600.0) * random.uniform(1.0, 1.1)
    return min(cap, base * 2.0**attempt) * random.uniform(0.5, 1.0)


class Breaker:
    """A circuit breaker on connection failures: ``limit`` in a row, across the whole run, stop it.

    Any answer from the endpoint (an HTTP status included) resets the count. After a connection failure the
    endpoint is probed by one request at a time, each after the next capped exponential backoff, while the other
    workers wait: an outage costs ``limit`` probes and a bounded wait, whatever the concurrency and the number of
    inputs. Requests already in flight when the outage was seen fail without counting again.
    """

    def __init__(self, limit: int, base: float, cap: float):
        self.limit, self.base, self.cap = limit, base, cap
        self.failures = 0  # in a row
        self.prober: object | None = None  # the request probing the endpoint while the breaker is open
        self.resume_at = 0.0  # monotonic time of the next probe
        self.tripped = ""  # the last failure's cause, once ``limit`` is reached
        self._cond = asyncio.Condition()

    async def turn(self, who: object) -> None:
        """Returns when ``who`` may send: at once while the endpoint answers; else as the one probe, after the backoff."""
        async with self._cond:
            while self.failures and not self.tripped:
                if self.prober is None or self.prober is who:
                    self.prober = who
                    delay = self.resume_at - time.monotonic()
                    if delay <= 0:
                        return
                    try:  # woken early if another request's answer closes the breaker
                        await asyncio.wait_for(self._cond.wait(), delay)
                    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                        pass
                else:
                    await self._cond.wait()

    async def reached(self) -> None:
        """The endpoint answered: close the breaker."""
        async with self._cond:
            if self.failures:
                self.failures, self.prober = 0, None
                self._cond.notify_all()

    async def failed(self, who: object, cause: str) -> None:
        """``who`` could not connect: count it if it was the first failure or the probe, and trip at the limit."""
        async with self._cond:
            if self.failures and self.prober is not who:
                return  # sent before the outage was seen: the same outage, counted already
            self.failures += 1
            self.prober = who
            if self.failures >= self.limit:
                self.tripped = cause
            else:
                self.resume_at = time.monotonic() + backoff_delay(self.failures - 1, None, self.base, self.cap)
            self._cond.notify_all()

    async def release(self, who: object) -> None:
        """``who`` gave up its request: another waiting request takes over the probing."""
        async with self._cond:
            if self.prober is who:
                self.prober = None
                self._cond.notify_all()


def _root_cause(e: BaseException) -> str:
    """The innermost exception's message ("Connection refused" under openai's "Connection error.")."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


def _extract(api: str, r: Any) -> dict:
    """(text, finish_reason, rationale extension, usage) from a parsed response; BadResponse if it is not one."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    if not isinstance(r, ChatCompletion if api == "chat" else Completion):
        raise BadResponse(f"the body is not a completion ({type(r).__name__})")
    try:
        c = r.choices[0]
        holder = c.message if api == "chat" else c
        text = holder.content if api == "chat" else holder.text
        extra = getattr(holder, "model_extra", None) or {}
        finish = c.finish_reason
        usage = getattr(r, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
    except (AttributeError, IndexError, TypeError, ValueError, KeyError) as e:
        raise BadResponse(f"malformed completion ({type(e).__name__})") from None
    if not isinstance(text, str):
        raise BadResponse("the completion has no text")
    rec = {"text": text, "finish_reason": finish if isinstance(finish, str) else None,
           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}  # fmt: skip
    if isinstance(extra.get("rationale"), str):  # dss-serve's extension: the student's explain: output
        rec["rationale_field"] = extra["rationale"]
    return rec


class Asker:
    """Bounded-concurrency requests with retries, budgets and a progress bar; each answer goes to the store."""

    def __init__(self, client: Any, args: argparse.Namespace, store: Store, progress: Any):
        self.client, self.args, self.store, self.progress = client, args, store, progress
        self.stats = RunStats()
        self.breaker = Breaker(args.max_connection_failures, args.backoff_base, args.backoff_max)
        try:
            import httpx2 as transport
        except ImportError:  # pragma: no cover - older openai clients use httpx
            import httpx as transport
        # connecting gives up sooner than answering may take: an unreachable host is found in seconds
        self.timeout = transport.Timeout(args.timeout, connect=min(args.timeout, CONNECT_TIMEOUT_S))
        self.connect_timeout = transport.ConnectTimeout

    def _budget_left(self) -> bool:
        a, s = self.args, self.stats
        if a.max_requests is not None and s.requests >= a.max_requests:
            s.stopped = s.stopped or f"--max_requests {a.max_requests} reached"
        elif a.max_tokens_total is not None and s.tokens >= a.max_tokens_total:
            s.stopped = s.stopped or f"--max_tokens_total {a.max_tokens_total} reached ({s.tokens} tokens)"
        return not s.stopped

    async def _send(self, job: Job) -> Any:
        s = job.sampling
        kw: dict[str, Any] = {
            "model": self.args.model,
            "temperature": s["temperature"],
            "top_p": s["top_p"],
            "max_tokens": s["max_tokens"],
            "extra_headers": {KEY_HEADER: job.key},
            "timeout": self.timeout,
        }
        if s["stop"]:
            kw["stop"] = s["stop"]
        if s["seed"] is not None:
            kw["seed"] = s["seed"]
        if s["extra_body"]:
            kw["extra_body"] = s["extra_body"]
        if self.args.api == "chat":
            return await self.client.chat.completions.create(messages=job.prompt, **kw)
        return await self.client.completions.create(prompt=job.prompt, **kw)

    def _fault(self, kind: str, message: str) -> None:
        self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1
        self.stats.last_error = message

    def _done(self) -> bool:
        """Nothing more is to be asked: a fatal answer, a tripped breaker or a spent budget."""
        if self.breaker.tripped and not self.stats.unreachable:
            self.stats.unreachable = self.breaker.tripped
            self.stats.stopped = f"{self.breaker.failures} connection failures in a row"
        return bool(self.stats.fatal or self.stats.unreachable) or not self._budget_left()

    async def ask(self, job: Job) -> dict | None:
        """One completion, retried on 429/5xx/timeouts/bad bodies/connection errors; None if given up or stopped."""
        try:
            return await self._ask(job)
        finally:  # a request that stops probing hands the probe to a waiting one
            await self.breaker.release(job)

    async def _ask(self, job: Job) -> dict | None:
        import openai

        try:
            import httpx2 as transport
        except ImportError:  # pragma: no cover - older openai clients use httpx
            import httpx as transport
        attempt = 0
        while True:
            await self.breaker.turn(job)
            if self._done():
                return None
            self.stats.requests += 1
            retry_after = None
            connection_failed = False
            try:
                rec = _extract(self.args.api, await self._send(job))
                await self.breaker.reached()
                return rec
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                await self.breaker.reached()
                self.stats.fatal = f"the endpoint refused the request (HTTP {e.status_code}): {_message(e)}"
                return None
            except openai.APIStatusError as e:
                await self.breaker.reached()
                if e.status_code in (408, 409, 429) or e.status_code >= 500:
                    retry_after = _retry_after(e.response.headers)
                    self._fault(f"http_{e.status_code}", f"HTTP {e.status_code}: {_message(e)}")
                else:
                    self.stats.rejected += 1
                    self.stats.last_error = f"HTTP {e.status_code}: {_message(e)}"
                    return None
            except openai.APITimeoutError as e:
                if isinstance(e.__cause__, self.connect_timeout):
                    connection_failed = True
                    self._fault("connection", f"connection error: no connection within {self.timeout.connect} s")
                    await self.breaker.failed(job, f"no connection within {self.timeout.connect} s")
                else:  # connected, but no answer in time: the endpoint is there
                    await self.breaker.reached()
                    self._fault("timeout", f"no answer within --timeout {self.args.timeout} s")
            except openai.APIConnectionError as e:
                connection_failed = True
                self._fault("connection", f"connection error: {_root_cause(e)}")
                await self.breaker.failed(job, _root_cause(e))
            except (BadResponse, json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError) as e:
                await self.breaker.reached()
                self._fault("bad_body", f"unusable response body: {e}")
            except transport.HTTPError as e:
                self._fault("transport", f"{type(e).__name__}: {e}")
            if attempt >= self.args.max_retries:
                self.stats.failed += 1
                return None
            attempt += 1
            self.stats.retries += 1
            if not connection_failed:  # after a connection failure the breaker paces the retry (in turn())
                await asyncio.sleep(backoff_delay(attempt - 1, retry_after, self.args.backoff_base, self.args.backoff_max))

    async def run(self, jobs: Iterable[Job]) -> None:
        queue = list(jobs)
        queue.reverse()  # pop() from the end: jobs go out in input order

        async def worker() -> None:
            while queue and not self.stats.fatal and not self.stats.stopped and not self.stats.unreachable:
                job = queue.pop()
                rec = await self.ask(job)
                if rec is None:
                    continue
                rec = {"key": job.key, "sample": job.sample, **rec}
                self.store.append(rec)
                self.stats.new_completions += 1
                self.stats.tokens += rec["usage"]["prompt_tokens"] + rec["usage"]["completion_tokens"]
                self.progress.update(1)
                self.progress.set_postfix(tokens=self.stats.tokens, retries=self.stats.retries, refresh=False)

        await asyncio.gather(*(worker() for _ in range(max(1, self.args.concurrency))))


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:300]
    return str(getattr(e, "message", e))[:300]


# ----------------------------------------------------------------------------- voting and output


def vote_key(benchmark: str | None, label: str) -> str:
    """What counts as the same answer: SVAMP equations by value, other labels by whitespace-normalised text."""
    if benchmark == "svamp":
        v = arithmetic.try_evaluate(label)
        if v is not None:
            return f"={round(v, 6):.6g}"
    return " ".join(label.split())


def vote(spec: teacher_prompts.PromptSpec, samples: list[dict | None]) -> dict:
    """Parse each sample and take the majority label; a tie goes to the label voted for first (lowest sample)."""
    parsed: list[Parsed | None] = []
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for j, s in enumerate(samples):
        if s is None:
            parsed.append(None)
            continue
        p = spec.parse(s["text"], s.get("rationale_field"))
        parsed.append(p)
        if p.ok and s.get("finish_reason") != "length":
            k = vote_key(spec.benchmark, p.label)
            counts[k] = counts.get(k, 0) + 1
            first.setdefault(k, j)
    winner = min(counts, key=lambda k: (-counts[k], first[k])) if counts else None
    out = {"parsed": parsed, "counts": counts, "winner": None, "label": "", "rationale": "", "usable": sum(counts.values())}
    if winner is not None:
        p = parsed[first[winner]]
        agreeing = [
            q.rationale
            for q, s in zip(parsed, samples, strict=True)
            if q is not None and q.ok and s.get("finish_reason") != "length" and vote_key(spec.benchmark, q.label) == winner
        ]
        out.update(winner=winner, label=p.label, rationale=p.rationale, rationales=list(dict.fromkeys(agreeing)))
    return out


def aggregate(spec: teacher_prompts.PromptSpec, inputs: list[TeacherInput], samples: list[list[dict | None]]) -> dict:
    """Output rows, raw rows and the summary's data figures from every input's stored samples (pure)."""
    rows, raw = [], []
    n_complete = truncated = parse_failures = used = dropped = from_teacher = 0
    graded = correct = unanimous = 0
    agreement: list[float] = []
    prompt_tokens = completion_tokens = 0
    for i, (x, ss) in enumerate(zip(inputs, samples, strict=True)):
        if any(s is None for s in ss):
            continue  # incomplete: left out so every written row equals the complete run's
        n_complete += 1
        v = vote(spec, ss)
        for s, p in zip(ss, v["parsed"], strict=True):
            used += 1
            prompt_tokens += s["usage"]["prompt_tokens"]
            completion_tokens += s["usage"]["completion_tokens"]
            if s.get("finish_reason") == "length":
                truncated += 1
            elif not p.ok:
                parse_failures += 1
        if v["winner"] is not None:
            agreement.append(v["counts"][v["winner"]] / v["usable"])
            unanimous += v["counts"][v["winner"]] == len(ss)
        if x.label is not None:
            graded += 1
            correct += v["winner"] is not None and quality.label_correct(spec.benchmark, x.label, v["label"])
        raw.append(
            {
                "index": i,
                **({"id": x.id} if x.id is not None else {}),
                "samples": [
                    {
                        "sample": j,
                        "key": s["key"],
                        "text": s["text"],
                        "finish_reason": s.get("finish_reason"),
                        **({"rationale_field": s["rationale_field"]} if "rationale_field" in s else {}),
                        "label": p.label,
                        "parsed": p.ok,
                    }  # fmt: skip
                    for j, (s, p) in enumerate(zip(ss, v["parsed"], strict=True))
                ],
                "votes": v["counts"],
                "llm_label": v["label"],
            }
        )
        if x.label is None and v["winner"] is None:
            dropped += 1  # no gold label and no teacher label: nothing to train on
            continue
        row: dict[str, Any] = {}
        if x.id is not None:
            row["id"] = x.id
        row["input"] = x.text
        if x.text_b:
            row["input_b"] = x.text_b
        row["label"] = x.label if x.label is not None else v["label"]
        from_teacher += x.label is None
        if v["winner"] is not None:
            row["rationale"] = v["rationale"]
            if len(v["rationales"]) > 1:  # several samples agree: DataOptions.rationales_per_input trains on them
                row["rationales"] = v["rationales"]
            row["llm_label"] = v["label"]
        rows.append(row)
    return {
        "rows": rows,
        "raw": raw,
        "figures": {
            "inputs_complete": n_complete,
            "rows_written": len(rows),
            "rows_dropped_no_label": dropped,
            "labels_from_teacher": from_teacher,
            "rows_with_rationale": sum("rationale" in r for r in rows),
            "completions": used,
            "truncated": truncated,
            "parse_failures": parse_failures,
            "teacher_accuracy": round(100.0 * correct / graded, 4) if graded else None,
            "graded_inputs": graded,
            "agreement": round(sum(agreement) / len(agreement), 4) if agreement else None,
            "unanimous_inputs": unanimous,
            "tokens": {"prompt": prompt_tokens, "completion": completion_tokens, "total": prompt_tokens + completion_tokens},
        },
    }


def dump_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


# ----------------------------------------------------------------------------- the command


def side_paths(output: Path) -> dict[str, Path]:
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


def _public_url(url: str) -> str:
    """The endpoint without userinfo or query (they can hold credentials), for the summary."""
    p = urlsplit(url)
    host = p.hostname or ""
    return urlunsplit((p.scheme, host + (f":{p.port}" if p.port else ""), p.path, "", ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dss-teacher", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("endpoint")
    g.add_argument("--base_url", required=True, help="the OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", required=True, help="the model name the endpoint serves")
    g.add_argument("--api_key_env", default="OPENAI_API_KEY",
                   help="name of the environment variable holding the API key (default OPENAI_API_KEY); the key is "
                        "never taken as a flag and never logged; for a server without auth set it to any value")  # fmt: skip
    g.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="completions: one few-shot text prompt, /v1/completions; chat: the exemplars as user/assistant "
                        "turns, /v1/chat/completions (default completions)")  # fmt: skip
    g = p.add_argument_group("inputs (one of)")
    g.add_argument("--benchmark", choices=readers.BENCHMARKS, help="a registered benchmark's split, read from the released data")
    g.add_argument("--split", default="train", help="the benchmark split: train, validation or test (default train)")
    g.add_argument("--data_dir", default=None, help="released data (default $DSS_DATA_DIR, else ../shared/data/dss)")
    g.add_argument("--input", help="your JSONL: 'input' (required), 'label', 'id', 'input_b' (optional) per line")
    g.add_argument("--limit", type=int, default=None, help="only the first N inputs")
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", choices=teacher_prompts.SHIPPED, default=None,
                   help="a shipped few-shot prompt (default: --benchmark's)")  # fmt: skip
    g.add_argument("--prompt_file", default=None,
                   help="your prompt file (JSON, format dss-teacher-prompt/1; see the README); needed with --input "
                        "unless --prompt names a shipped one")  # fmt: skip
    g.add_argument("--show_prompt", action="store_true", help="print the first input's prompt and exit (no requests)")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=1, help="samples per input; their parsed labels vote (default 1)")
    g.add_argument("--temperature", type=float, default=None, help="default 0 for --n 1, 0.7 for --n > 1")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--max_tokens", type=int, default=256, help="completion token limit per request (default 256)")
    g.add_argument("--seed", type=int, default=0,
                   help="sample j sends seed+j, so samples are reproducible where the endpoint supports seeds; "
                        "-1 sends no seed (default 0)")  # fmt: skip
    g = p.add_argument_group("throughput and cost")
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
    g = p.add_argument_group("output")
    g.add_argument("--output", required=True,
                   help="the user JSONL to write; the store, raw and summary files go beside it. Checked before the "
                        "first request: a directory, or a place that cannot be written, is refused")  # fmt: skip
    g.add_argument("--store", default=None,
                   help="the completion store (default: <output>.store.jsonl); share it between runs. The summary "
                        "records the store an output was written from, and an existing --output written from another "
                        "store is refused rather than replaced (continue with that --store, or pick another --output)")  # fmt: skip
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


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
        return _main(args)
    except (TeacherError, readers.DataFormatError, teacher_prompts.PromptError, OSError, ValueError) as e:
        print(f"dss-teacher: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the requests (those stop in _ask_all and still write the output)
        print("dss-teacher: interrupted; every completion received is in the store; rerun the same command to continue",
              file=sys.stderr)  # fmt: skip
        return 130


def _main(args: argparse.Namespace) -> int:
    if args.prompt_file:
        spec = teacher_prompts.load(args.prompt_file)
    else:
        spec = teacher_prompts.shipped(args.prompt or args.benchmark)
    if args.benchmark:
        data_dir = Path(args.data_dir) if args.data_dir else readers.default_data_dir()
        inputs = benchmark_inputs(data_dir, args.benchmark, args.split)
    else:
        inputs = read_inputs(args.input)
    if args.limit:
        inputs = inputs[: args.limit]
    warn_duplicate_ids(args.input or f"{args.benchmark} {args.split}", inputs)
    if args.show_prompt:
        x = inputs[0]
        prompt = spec.chat_messages(x.text, x.text_b) if args.api == "chat" else spec.completion_prompt(x.text, x.text_b)
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
    keys: list[list[str]] = []
    jobs: list[Job] = []
    queued: set[str] = set()
    cached = shared = 0
    output = Path(args.output)
    paths = side_paths(output)
    store_path = Path(args.store) if args.store else paths["store"]
    check_output(output, paths)
    check_store_owner(output, paths["summary"], store_path)
    store = Store(store_path)
    try:
        for i, x in enumerate(inputs):
            prompt = spec.chat_messages(x.text, x.text_b) if args.api == "chat" else spec.completion_prompt(x.text, x.text_b)
            row_keys = []
            for j in range(args.n):
                s = sampling.for_sample(j)
                k = request_key(args.model, args.api, prompt, s, j)
                row_keys.append(k)
                if k in store.records:
                    cached += 1
                elif k in queued:  # equal inputs share their completions
                    shared += 1
                else:
                    queued.add(k)
                    jobs.append(Job(i, j, k, prompt, s))
            keys.append(row_keys)
        if store.torn_bytes:
            print(f"dss-teacher: cut an unfinished last record ({store.torn_bytes} bytes) from {store.path}", file=sys.stderr)
        stats = asyncio.run(_ask_all(args, api_key, store, jobs)) if jobs else RunStats()
        samples = [[store.records.get(k) for k in row] for row in keys]
    finally:
        store.close()
    agg = aggregate(spec, inputs, samples)
    missing = sum(s is None for row in samples for s in row)
    summary = {
        "endpoint": {"base_url": _public_url(args.base_url), "model": args.model, "api": args.api},
        "store": str(store_path.resolve()),
        "prompt": {"name": spec.name, "version": spec.version, "sha256": spec.sha256, "file": spec.path},
        "source": {"benchmark": args.benchmark, "split": args.split} if args.benchmark else {"input": str(args.input)},
        "sampling": {"n": args.n, **sampling.for_sample(0), "seed": sampling.seed},
        "inputs": len(inputs),
        **agg["figures"],
        "complete": missing == 0,
        "missing_samples": missing,
        "this_run": {
            "requests": stats.requests,
            "retries": stats.retries,
            "retried_faults": stats.faults,
            "from_store": cached,
            "shared_with_equal_inputs": shared,
            "new_completions": stats.new_completions,
            "tokens": stats.tokens,
            "failed_samples": stats.failed,
            "rejected_requests": stats.rejected,
            "last_error": stats.last_error,
            "stopped": stats.stopped or None,
        },
    }
    check_store_owner(output, paths["summary"], store_path)  # again: another run may have written it meanwhile
    write_atomic(paths["raw"], dump_jsonl(agg["raw"]))
    write_atomic(output, dump_jsonl(agg["rows"]))
    write_atomic(paths["summary"], json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    kept = (f"kept {len(store.records)} completions ({stats.new_completions} new) in {store_path} and "
            f"{summary['inputs_complete']} complete inputs in {output}; rerun the same command to continue")  # fmt: skip
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
    return 0 if missing == 0 else 3


async def _ask_all(args: argparse.Namespace, api_key: str, store: Store, jobs: list[Job]) -> RunStats:
    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=args.base_url, api_key=api_key, max_retries=0, timeout=args.timeout)
    progress = tqdm(
        total=len(jobs), desc="dss-teacher", unit="req", disable=args.no_progress, file=sys.stderr, dynamic_ncols=True
    )
    asker = Asker(client, args, store, progress)
    run = asyncio.ensure_future(asker.run(jobs))

    def interrupt() -> None:  # Ctrl-C: stop asking; what is stored stays, and the output is written from it
        asker.stats.interrupted = True
        asker.stats.stopped = "interrupted"
        run.cancel()

    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
        handled = True
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread: Ctrl-C stays KeyboardInterrupt
        handled = False
    try:
        await run
    except asyncio.CancelledError:
        if not asker.stats.interrupted:
            raise
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)
        if asker.stats.interrupted or asker.stats.unreachable:
            progress.leave = False  # the one line that follows says where the run stands
        progress.close()
        await client.close()
    return asker.stats


def _print_summary(s: dict, output: Path, paths: dict[str, Path]) -> None:
    r = s["this_run"]
    acc = "" if s["teacher_accuracy"] is None else f"; teacher accuracy {s['teacher_accuracy']:.2f}% on {s['graded_inputs']}"
    agree = "" if s["agreement"] is None else f"; agreement {s['agreement']:.3f}"
    print(
        f"dss-teacher: {s['inputs']} inputs x {s['sampling']['n']}: {s['completions']} completions "
        f"({r['from_store']} from the store, {r['new_completions']} new), {s['truncated']} truncated, "
        f"{s['parse_failures']} parse failures{acc}{agree}"
    )
    print(
        f"dss-teacher: this run {r['requests']} requests, {r['retries']} retries, {r['tokens']} tokens; "
        f"all completions {s['tokens']['total']} tokens"
    )
    if r["stopped"]:
        print(f"dss-teacher: stopped: {r['stopped']}; rerun with a larger budget to continue from the store")
    if s["missing_samples"]:
        why = f" (last error: {r['last_error']})" if r["last_error"] else ""
        print(f"dss-teacher: incomplete: {s['missing_samples']} samples missing{why}; the output holds the complete inputs only")
    print(f"dss-teacher: wrote {output} ({s['rows_written']} rows), {paths['raw'].name}, {paths['summary'].name}")


if __name__ == "__main__":
    sys.exit(main())
