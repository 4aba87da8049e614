"""Asking the endpoint: store keys, bounded-concurrency requests with retries and budgets; every answer is stored.

A request is keyed by a hash of (model, API, full prompt, sampling parameters, sample index), so a completion
the store holds is never asked for twice, and equal inputs share their completions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import json
import os
import signal
import sys
from collections.abc import Container, Iterable
from typing import Any

from dss_jax.teacher.inputs import TeacherInput
from dss_jax.teacher.prompts import PromptSpec
from dss_jax.teacher.retry import Breaker, backoff_delay, parse_retry_after
from dss_jax.teacher.store import Sample, Store

KEY_HEADER = "X-DSS-Teacher-Key"  # sent with each request so server logs can be matched to the store
CONNECT_TIMEOUT_S = 10.0  # the longest wait for a connection (--timeout if shorter)


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


@dataclasses.dataclass(frozen=True)
class Options:
    """How to ask: the endpoint and API, and the retry, pacing and budget limits (the CLI's flags)."""

    base_url: str
    model: str
    api: str  # "completions" or "chat"
    timeout: float  # seconds for one answer
    max_retries: int  # per request
    max_connection_failures: int  # in a row, across the run: the breaker trips
    backoff_base: float
    backoff_max: float
    concurrency: int
    max_requests: int | None = None
    max_tokens_total: int | None = None
    progress: bool = True


def request_key(model: str, api: str, prompt: str | list, sampling: dict, sample: int) -> str:
    """The store key: what a completion costs to ask for, so equal requests are never paid for twice."""
    blob = json.dumps(
        {"model": model, "api": api, "prompt": prompt, "sampling": sampling, "sample": sample},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def prompt_for(spec: PromptSpec, api: str, x: TeacherInput) -> str | list[dict[str, str]]:
    """An input's prompt: chat messages for the chat API, one few-shot text for completions."""
    return spec.chat_messages(x.text, x.text_b) if api == "chat" else spec.completion_prompt(x.text, x.text_b)


@dataclasses.dataclass(frozen=True)
class Job:
    index: int  # input row
    sample: int
    key: str
    prompt: str | list  # a completions prompt or chat messages
    sampling: dict


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every input's sample keys, and the requests the store lacks."""

    keys: list[list[str]]  # per input, the store key of each sample
    jobs: list[Job]  # one per key neither stored nor already queued, in input order
    cached: int  # samples the store holds
    shared: int  # samples an equal earlier input asks for


def plan(spec: PromptSpec, inputs: list[TeacherInput], opts: Options, n: int, sampling: Sampling,
         stored: Container[str]) -> Plan:  # fmt: skip
    keys: list[list[str]] = []
    jobs: list[Job] = []
    queued: set[str] = set()
    cached = shared = 0
    for i, x in enumerate(inputs):
        prompt = prompt_for(spec, opts.api, x)
        row_keys = []
        for j in range(n):
            s = sampling.for_sample(j)
            k = request_key(opts.model, opts.api, prompt, s, j)
            row_keys.append(k)
            if k in stored:
                cached += 1
            elif k in queued:  # equal inputs share their completions
                shared += 1
            else:
                queued.add(k)
                jobs.append(Job(i, j, k, prompt, s))
        keys.append(row_keys)
    return Plan(keys, jobs, cached, shared)


@dataclasses.dataclass
class RunStats:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    new_completions: int = 0
    tokens: int = 0  # prompt + completion tokens of this run's answered requests
    failed: int = 0  # samples given up on after --max_retries
    rejected: int = 0  # 4xx other than 408/409/429: the request itself was refused
    faults: dict[str, int] = dataclasses.field(default_factory=dict)  # retried faults by kind
    last_error: str = ""
    stopped: str = ""  # why the run stopped early, if it did
    fatal: str = ""  # the endpoint refused the key or the model: no point asking again
    unreachable: str = ""  # the circuit breaker tripped: the endpoint cannot be reached
    interrupted: bool = False  # SIGINT (Ctrl-C)


class BadResponse(Exception):
    """A 2xx whose body is not a usable completion (truncated or malformed JSON, no choices)."""


def _transport() -> Any:
    """The HTTP library under the openai client (its timeout and error types)."""
    try:
        return importlib.import_module("httpx2")
    except ImportError:  # pragma: no cover - older openai clients use httpx
        return importlib.import_module("httpx")


def _root_cause(e: BaseException) -> str:
    """The innermost exception's message ("Connection refused" under openai's "Connection error.")."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:300]
    return str(getattr(e, "message", e))[:300]


def _extract(api: str, r: Any, job: Job) -> Sample:
    """The stored sample from a parsed response; BadResponse if it is not a completion."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    if not isinstance(r, ChatCompletion if api == "chat" else Completion):
        raise BadResponse(f"the body is not a completion ({type(r).__name__})")
    try:
        c: Any = r.choices[0]  # a chat or a completions choice
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
    field = extra.get("rationale")  # dss-serve's extension: the student's explain: output
    return Sample(key=job.key, sample=job.sample, text=text, finish_reason=finish if isinstance(finish, str) else None,
                  prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  rationale_field=field if isinstance(field, str) else None)  # fmt: skip


class Asker:
    """Bounded-concurrency requests with retries, budgets and a progress bar; each answer goes to the store."""

    def __init__(self, client: Any, opts: Options, store: Store, progress: Any):
        self.client, self.opts, self.store, self.progress = client, opts, store, progress
        self.stats = RunStats()
        self.breaker = Breaker(opts.max_connection_failures, opts.backoff_base, opts.backoff_max)
        transport = _transport()
        # connecting gives up sooner than answering may take: an unreachable host is found in seconds
        self.timeout = transport.Timeout(opts.timeout, connect=min(opts.timeout, CONNECT_TIMEOUT_S))
        self.connect_timeout = transport.ConnectTimeout

    def _budget_left(self) -> bool:
        o, s = self.opts, self.stats
        if o.max_requests is not None and s.requests >= o.max_requests:
            s.stopped = s.stopped or f"--max_requests {o.max_requests} reached"
        elif o.max_tokens_total is not None and s.tokens >= o.max_tokens_total:
            s.stopped = s.stopped or f"--max_tokens_total {o.max_tokens_total} reached ({s.tokens} tokens)"
        return not s.stopped

    async def _send(self, job: Job) -> Any:
        s = job.sampling
        kw: dict[str, Any] = {
            "model": self.opts.model,
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
        if self.opts.api == "chat":
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

    async def ask(self, job: Job) -> Sample | None:
        """One completion, retried on 429/5xx/timeouts/bad bodies/connection errors; None if given up or stopped."""
        try:
            return await self._ask(job)
        finally:  # a request that stops probing hands the probe to a waiting one
            await self.breaker.release(job)

    async def _ask(self, job: Job) -> Sample | None:
        import openai

        transport = _transport()
        attempt = 0
        while True:
            await self.breaker.turn(job)
            if self._done():
                return None
            self.stats.requests += 1
            retry_after = None
            connection_failed = False
            try:
                sample = _extract(self.opts.api, await self._send(job), job)
                await self.breaker.reached()
                return sample
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                await self.breaker.reached()
                self.stats.fatal = f"the endpoint refused the request (HTTP {e.status_code}): {_message(e)}"
                return None
            except openai.APIStatusError as e:
                await self.breaker.reached()
                if e.status_code in (408, 409, 429) or e.status_code >= 500:
                    retry_after = parse_retry_after(e.response.headers)
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
                    self._fault("timeout", f"no answer within --timeout {self.opts.timeout} s")
            except openai.APIConnectionError as e:
                connection_failed = True
                self._fault("connection", f"connection error: {_root_cause(e)}")
                await self.breaker.failed(job, _root_cause(e))
            except (BadResponse, json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError) as e:
                await self.breaker.reached()
                self._fault("bad_body", f"unusable response body: {e}")
            except transport.HTTPError as e:
                self._fault("transport", f"{type(e).__name__}: {e}")
            if attempt >= self.opts.max_retries:
                self.stats.failed += 1
                return None
            attempt += 1
            self.stats.retries += 1
            if not connection_failed:  # after a connection failure the breaker paces the retry (in turn())
                await asyncio.sleep(backoff_delay(attempt - 1, retry_after, self.opts.backoff_base, self.opts.backoff_max))

    async def run(self, jobs: Iterable[Job]) -> None:
        queue = list(jobs)
        queue.reverse()  # pop() from the end: jobs go out in input order

        async def worker() -> None:
            while queue and not self.stats.fatal and not self.stats.stopped and not self.stats.unreachable:
                job = queue.pop()
                sample = await self.ask(job)
                if sample is None:
                    continue
                self.store.append(sample)
                self.stats.new_completions += 1
                self.stats.tokens += sample.prompt_tokens + sample.completion_tokens
                self.progress.update(1)
                self.progress.set_postfix(tokens=self.stats.tokens, retries=self.stats.retries, refresh=False)

        await asyncio.gather(*(worker() for _ in range(max(1, self.opts.concurrency))))


async def ask_all(opts: Options, api_key: str, store: Store, jobs: list[Job]) -> RunStats:
    """Ask for every job, storing each answer; Ctrl-C stops asking and returns what was stored."""
    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=opts.base_url, api_key=api_key, max_retries=0, timeout=opts.timeout)
    progress = tqdm(
        total=len(jobs), desc="dss-teacher", unit="req", disable=not opts.progress, file=sys.stderr, dynamic_ncols=True
    )
    asker = Asker(client, opts, store, progress)
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
            progress.leave = False  # the one line that follows says where the run stopped
        progress.close()
        await client.close()
    return asker.stats
