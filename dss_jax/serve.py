"""``dss-serve``: a trained student behind an OpenAI-compatible HTTP API, with dynamic batching.

    dss-serve --model_dir DIR [--host 127.0.0.1] [--port 8000] [--max_batch 16] [--max_wait_ms 5]

Endpoints: ``POST /v1/completions`` (``prompt``: a string or a list), ``POST /v1/chat/completions`` (the last
user message is the input), ``GET /v1/models``, ``GET /health``.

Request fields: ``model``, ``prompt`` / ``messages``, ``max_tokens`` (chat: also ``max_completion_tokens``),
``temperature`` (0: greedy), ``top_p``, ``top_k`` (0: off), ``seed`` (the same seeded request gives the same
text whatever shares its batch; without a seed each sampled request draws a fresh one), ``stop`` (a string or up
to 4: the text ends before the first one, finish_reason "stop"), ``stream`` (server-sent events; the answer is
decoded whole, then sent as one chunk per token, so the chunks concatenate to the non-streamed answer) with
``stream_options.include_usage``, and ``user`` (accepted and ignored). Extensions: ``input_b`` (the NLI
hypothesis) and ``rationale: true`` (also run the ``explain:`` task and return its text in each choice's
``rationale``). Every other field, and ``echo``, ``logprobs``, ``best_of``, ``n``, ``suffix``, ``logit_bias``,
``frequency_penalty``, ``presence_penalty`` set to anything but their no-op value (false, null, 1, 0, {}),
gets a 400 that names it: nothing is silently ignored.

Batching: requests that arrive within ``max_wait_ms`` of each other decode together, up to ``max_batch`` rows,
whatever their sampling settings (those are per-row values, not compile keys). Only shapes compile, and they
come from a fixed set: the batch is padded to a power of two up to ``max_batch`` (and ``max_batch`` itself),
and the decode length is the smallest of 16, 32, 64, ... up to the model's ``targets_length`` that fits the
batch's largest ``max_tokens``. That set (e.g. 5 batch sizes x 4 lengths = 20 programs for ``--max_batch 16``
and ``targets_length`` 128) is printed and compiled at start-up, so no request ever waits for a compile
(``--no_precompile`` compiles each on first use instead). ``/health`` reports it.

Limits: request bodies over ``--max_body_bytes`` get 413 before they are read whole; bad requests get a 4xx
with an OpenAI-style ``{"error": {...}}`` body and the server keeps serving; a client that leaves before its
body arrives costs one log line. A model dir missing ``dss_config.json``, ``spiece.model`` or
``inference.json`` (or holding an invalid one) is refused at start-up in one line naming the file. It binds to 127.0.0.1 unless told
otherwise. No TensorFlow or seqio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:  # FastAPI resolves the handlers' annotations in this module's globals
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.requests import ClientDisconnect
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("dss-serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from e

from dss_jax import decoding
from dss_jax.infer import ModelDirError, Predictor

MAX_PROMPTS_PER_REQUEST = 64
MAX_STOP_STRINGS = 4
DEFAULT_MAX_BODY_BYTES = 1 << 20
SMALLEST_DECODE_BUCKET = 16

# Request fields, by endpoint. A field outside these is refused with a 400 naming it.
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options"}
_COMMON_FIELDS |= {"n", "user", "input_b", "rationale"}
_FIELDS = {
    "completions": _COMMON_FIELDS | {"prompt"},
    "chat": _COMMON_FIELDS | {"messages", "max_completion_tokens"},
}
# OpenAI fields this server does not implement: accepted only at the value that changes nothing.
_NO_OP_VALUES: dict[str, tuple] = {
    "echo": (False,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "best_of": (1,),
    "suffix": ("",),
    "logit_bias": ({},),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
}


class RequestError(Exception):
    """A bad request: becomes an HTTP 4xx with this message."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class _ClientGone(Exception):
    """The client closed the connection before its body arrived: nobody to answer."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's decoding settings: per-row values of the compiled decode, so any mix batches together."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclasses.dataclass(eq=False)  # compared by identity: ``ids`` is an array
class _Job:
    ids: np.ndarray
    sampling: Sampling
    future: asyncio.Future


@dataclasses.dataclass
class ServeStats:
    requests: int = 0
    rows: int = 0
    batches: int = 0
    errors: int = 0

    def batch_fill(self, max_batch: int) -> float:
        return self.rows / max(1, self.batches * max_batch)


def size_buckets(limit: int, smallest: int) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``limit``, then ``limit``: the sizes a padded dimension may take."""
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= 2
    return (*out, limit)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


class Batcher:
    """Collects rows for up to ``max_wait_ms`` (or ``max_batch`` rows) and decodes them in one padded batch.

    The batch is padded to a size in ``batch_sizes`` and decoded for a length in ``decode_lengths``: those
    pairs are the only programs ever compiled, whatever the requests' sampling settings."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_ms: float):
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000.0
        self.batch_sizes = size_buckets(max_batch, 1)
        self.decode_lengths = size_buckets(predictor.max_decode_length, min(SMALLEST_DECODE_BUCKET, predictor.max_decode_length))
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.stats = ServeStats()
        self._task: asyncio.Task | None = None

    @property
    def programs(self) -> list[tuple[int, int]]:
        """Every (batch size, decode length) this batcher can compile."""
        return [(b, n) for b in self.batch_sizes for n in self.decode_lengths]

    def precompile(self) -> None:
        """Compiles every program now (runs each on an empty batch whose rows end at once)."""
        for b, n in self.programs:
            self._run_decode([], [], b, n)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, ids: np.ndarray, sampling: Sampling) -> tuple[list[int], bool]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(ids, sampling, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: list[_Job] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
            deadline = loop.time() + self.max_wait
            while len(pending) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    pending.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch, pending = pending[: self.max_batch], pending[self.max_batch :]
            try:
                outs = await loop.run_in_executor(None, self._decode, [j.ids for j in batch], [j.sampling for j in batch])
                for j, out in zip(batch, outs, strict=True):
                    if not j.future.done():
                        j.future.set_result(out)
            except Exception as e:  # a decode failure fails its requests, never the server
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)

    def _run_decode(self, rows: list[np.ndarray], samplings: list[Sampling], batch_size: int, length: int) -> np.ndarray:
        p = self.predictor
        batch = np.zeros((batch_size, p.inputs_length), np.int32)
        seeds, max_tokens = np.zeros(batch_size, np.uint32), np.zeros(batch_size, np.int32)  # padding rows: 0 tokens
        temperature, top_p, top_k = (
            np.zeros(batch_size, np.float32),
            np.ones(batch_size, np.float32),
            np.zeros(batch_size, np.int32),
        )
        for i, (r, s) in enumerate(zip(rows, samplings, strict=True)):
            batch[i, : len(r)] = r
            seeds[i], max_tokens[i] = s.seed, s.max_tokens
            temperature[i], top_p[i], top_k[i] = s.temperature, s.top_p, s.top_k
        tokens = decoding.decode_rows(p.params, batch, p.config, length, seeds, temperature, top_k, top_p, max_tokens)
        return np.asarray(tokens)

    def _decode(self, rows: list[np.ndarray], samplings: list[Sampling]) -> list[tuple[list[int], bool]]:
        b = _bucket(len(rows), self.batch_sizes)
        n = _bucket(max(s.max_tokens for s in samplings), self.decode_lengths)
        tokens = self._run_decode(rows, samplings, b, n)
        self.stats.batches += 1
        self.stats.rows += len(rows)
        eos = self.predictor.config.eos_token_id
        out = []
        for row, s in zip(tokens[: len(rows)].tolist(), samplings, strict=True):
            row = row[: s.max_tokens]
            stopped = eos in row
            out.append((row[: row.index(eos)] if stopped else row, stopped))
        return out


def _number(body: dict, name: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    ok_type = isinstance(v, int) or (isinstance(v, float) and (kind is float or v.is_integer()))
    if isinstance(v, bool) or not ok_type:
        raise RequestError(400, f"'{name}' must be a {kind.__name__}, got {str(v)[:40]!r}", name)
    if not lo <= v <= hi:  # exact for ints of any size; False for NaN
        raise RequestError(400, f"'{name}' must be in [{lo}, {hi}], got {str(v)[:40]}", name)
    return kind(v)


def _check_fields(body: dict, endpoint: str) -> None:
    """400 for a field this server does not implement, rather than silently ignoring it."""
    for k, v in body.items():
        if k in _FIELDS[endpoint] or v is None:
            continue
        if k in _NO_OP_VALUES:
            if any(v == ok and isinstance(v, bool) == isinstance(ok, bool) for ok in _NO_OP_VALUES[k]):
                continue
            raise RequestError(400, f"'{k}' is not supported by dss-serve (only its no-op value is accepted)", k)
        raise RequestError(400, f"'{k}' is not a field dss-serve supports (see dss-serve --help)", k)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops) or len(stops) > MAX_STOP_STRINGS:
        raise RequestError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    return stops


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first occurrence of any stop string, and whether one occurred."""
    at = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(400, f"'{name}' must be true or false", name)
    return v


def _bad_string(x: Any) -> bool:
    """True for a string that is not valid Unicode text (a lone surrogate from a JSON \\ud800 escape)."""
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_text(value: Any, field: str) -> None:
    """400 naming ``field`` when any string inside ``value`` is not encodable text."""
    stack = [value]
    while stack:
        x = stack.pop()
        if isinstance(x, str) and _bad_string(x):
            raise RequestError(400, f"'{field}' holds a string that is not valid Unicode (a lone surrogate)", field)
        if isinstance(x, dict):
            if any(isinstance(k, str) and _bad_string(k) for k in x):
                raise RequestError(400, f"'{field}' holds a key that is not valid Unicode (a lone surrogate)", field)
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


class StudentService:
    """Request validation and formatting around a :class:`Batcher` (independent of the HTTP framework)."""

    def __init__(self, predictor: Predictor, model_name: str, max_batch: int = 16, max_wait_ms: float = 5.0):
        self.predictor, self.model_name = predictor, model_name
        self.batcher = Batcher(predictor, max_batch, max_wait_ms)

    def sampling(self, body: dict) -> Sampling:
        limit = self.predictor.max_decode_length
        if _number(body, "n", 1, int, 1, 2**31) != 1:
            raise RequestError(400, "'n' > 1 is not supported by dss-serve: send n requests with different seeds", "n")
        max_tokens = _number(body, "max_tokens", limit, int, 1, limit)
        if body.get("max_completion_tokens") is not None:
            other = _number(body, "max_completion_tokens", limit, int, 1, limit)
            if "max_tokens" in body and body["max_tokens"] is not None and other != max_tokens:
                raise RequestError(400, "'max_tokens' and 'max_completion_tokens' differ", "max_completion_tokens")
            max_tokens = other
        temperature = _number(body, "temperature", 0.0, float, 0.0, 2.0)
        seed = _number(body, "seed", None, int, 0, 2**31 - 1)
        return Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=_number(body, "top_p", 1.0, float, 1e-6, 1.0),
            top_k=_number(body, "top_k", 0, int, 0, self.predictor.config.vocab_size),
            seed=secrets.randbelow(2**31) if seed is None else seed,
        )

    def check_model(self, body: dict) -> None:
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise RequestError(404, f"model {str(model)[:80]!r} does not exist; this server serves {self.model_name!r}", "model")

    def encode(self, text: str, text_b: str, prefix: str) -> np.ndarray:
        ids, truncated = self.predictor.encode(text, text_b, prefix)
        if truncated:  # refuse rather than answer a question the model never fully saw
            limit = self.predictor.inputs_length
            raise RequestError(400, f"input is longer than the model's {limit} input tokens (its training length)", "prompt")
        return ids

    def validate(self, body: dict, endpoint: str) -> None:
        """Every check that does not need the model: unsupported fields, types, text."""
        _check_fields(body, endpoint)
        for k, v in body.items():
            _check_text(v, k)
        self.check_model(body)
        self.sampling(body)
        _stop_strings(body)
        _flag(body, "stream")
        opts = body.get("stream_options")
        if opts is not None:
            if (
                not isinstance(opts, dict)
                or set(opts) - {"include_usage"}
                or not isinstance(opts.get("include_usage", False), bool)
            ):
                raise RequestError(400, "'stream_options' may only hold include_usage: true or false", "stream_options")
            if not _flag(body, "stream"):
                raise RequestError(400, "'stream_options' needs 'stream': true", "stream_options")
        if not isinstance(body.get("user", ""), str):
            raise RequestError(400, "'user' must be a string", "user")

    async def complete(self, prompts: list[str], text_b: str, body: dict) -> dict:
        """The completion as a dict; each choice also carries its label's token ids under ``_ids`` (for streaming)."""
        self.check_model(body)
        s = self.sampling(body)
        stops = _stop_strings(body)
        want_rationale = _flag(body, "rationale")
        fmt = self.predictor.format
        if want_rationale and not fmt.get("rationale_prefix"):
            raise RequestError(400, "this model was not trained with rationales (method is not 'dss')", "rationale")
        tasks = [("label", fmt.get("label_prefix", ""))] + ([("rationale", fmt["rationale_prefix"])] if want_rationale else [])
        encoded = [self.encode(p, text_b, prefix) for p in prompts for _, prefix in tasks]
        outs = await asyncio.gather(*(self.batcher.submit(ids, s) for ids in encoded))
        self.batcher.stats.requests += 1
        sp = self.predictor.sp
        choices, completion_tokens = [], 0
        for i in range(len(prompts)):
            label_ids, stopped = outs[i * len(tasks)]
            label_ids = [t for t in label_ids if t < sp.get_piece_size()]
            text, cut = _cut_at_stop(sp.decode(label_ids), stops)
            completion_tokens += len(sp.encode(text)) if cut else len(label_ids)
            choice = {
                "index": i,
                "text": text,
                "finish_reason": "stop" if stopped or cut else "length",
                "logprobs": None,
                "_ids": label_ids,
            }
            if want_rationale:
                r_ids, _ = outs[i * len(tasks) + 1]
                choice["rationale"] = sp.decode([t for t in r_ids if t < sp.get_piece_size()])
            choices.append(choice)
        prompt_tokens = sum(len(sp.encode(p)) for p in prompts)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def pieces(self, ids: list[int], text: str) -> Iterator[str]:
        """``text`` in one piece per token of ``ids`` where the tokens' decoded prefixes allow; the pieces always
        concatenate to ``text`` (a stop string may have cut it short of the tokens)."""
        sp, sent = self.predictor.sp, ""
        for k in range(1, len(ids) + 1):
            t = sp.decode(ids[:k])
            if len(t) > len(sent) and t.startswith(sent) and text.startswith(t):
                yield t[len(sent) :]
                sent = t
        if len(text) > len(sent):
            yield text[len(sent) :]


def _prompts(body: dict) -> list[str]:
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    if not isinstance(p, list) or not p or not all(isinstance(x, str) for x in p):
        raise RequestError(400, "'prompt' must be a non-empty string or a non-empty list of strings", "prompt")
    if len(p) > MAX_PROMPTS_PER_REQUEST:
        raise RequestError(400, f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", "prompt")
    if any(not x.strip() for x in p):
        raise RequestError(400, "'prompt' holds an empty string", "prompt")
    return p


def _chat_input(body: dict) -> str:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str) or not users[-1].strip():
        raise RequestError(400, "'messages' needs a user message with string content", "messages")
    return users[-1]


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _completion_events(service: StudentService, out: dict, include_usage: bool) -> Iterator[bytes]:
    head = {k: out[k] for k in ("id", "object", "created", "model")}
    for c in out["choices"]:
        for piece in service.pieces(c["_ids"], c["text"]):
            yield _sse({**head, "choices": [{"index": c["index"], "text": piece, "finish_reason": None, "logprobs": None}]})
        last = {"index": c["index"], "text": "", "finish_reason": c["finish_reason"], "logprobs": None}
        if "rationale" in c:
            last["rationale"] = c["rationale"]
        yield _sse({**head, "choices": [last]})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": out["usage"]})
    yield b"data: [DONE]\n\n"


def _chat_events(service: StudentService, out: dict, include_usage: bool) -> Iterator[bytes]:
    head = {"id": out["id"], "object": "chat.completion.chunk", "created": out["created"], "model": out["model"]}
    c = out["choices"][0]
    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    for piece in service.pieces(c["_ids"], c["text"]):
        yield _sse({**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    delta = {"rationale": c["rationale"]} if "rationale" in c else {}
    yield _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": c["finish_reason"]}]})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": out["usage"]})
    yield b"data: [DONE]\n\n"


def _without_ids(out: dict) -> dict:
    out["choices"] = [{k: v for k, v in c.items() if k != "_ids"} for c in out["choices"]]
    return out


def _to_chat(out: dict) -> dict:
    c = out["choices"][0]
    message = {"role": "assistant", "content": c["text"]}
    if "rationale" in c:
        message["rationale"] = c["rationale"]
    out.update(id=out["id"].replace("cmpl", "chatcmpl"), object="chat.completion")
    out["choices"] = [{"index": 0, "message": message, "finish_reason": c["finish_reason"], "_ids": c["_ids"], "text": c["text"]}]
    return out


def _compiled_programs() -> int:
    """Decode programs compiled in this process so far (entries of the jitted decode's cache; -1 if unknown)."""
    return getattr(decoding.decode_rows, "_cache_size", lambda: -1)()


def build_app(service: StudentService, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, precompile: bool = False) -> Any:
    """The FastAPI app over ``service``; ``precompile`` compiles every decode program before it serves."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if precompile:
            service.batcher.precompile()
        service.batcher.start()
        yield

    app = FastAPI(title="dss-serve", docs_url=None, redoc_url=None, lifespan=lifespan)

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        service.batcher.stats.errors += 1
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)

    async def body_of(request: Request, endpoint: str) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise RequestError(
                413, f"request body of {declared} bytes is over the {max_body_bytes}-byte limit (--max_body_bytes)"
            )
        raw = bytearray()
        try:
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > max_body_bytes:
                    raise RequestError(413, f"request body is over the {max_body_bytes}-byte limit (--max_body_bytes)")
        except ClientDisconnect:
            raise _ClientGone() from None
        try:
            body = json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise RequestError(400, f"malformed JSON body: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        text_b = body.get("input_b", "")
        if not isinstance(text_b, str):
            raise RequestError(400, "'input_b' must be a string", "input_b")
        service.validate(body, endpoint)
        return body

    @app.exception_handler(RequestError)
    async def _bad_request(_request: Request, e: RequestError) -> JSONResponse:
        return error(e.status, e.message, e.param)

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, _e: _ClientGone) -> Response:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        print(
            f"dss-serve: {client} disconnected before its request body arrived ({request.url.path})", file=sys.stderr, flush=True
        )
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/health")
    async def health() -> dict:
        s, b = service.batcher.stats, service.batcher
        return {"status": "ok", "model": service.model_name, **dataclasses.asdict(s),
                "batch_fill": s.batch_fill(b.max_batch), "batch_sizes": list(b.batch_sizes),
                "decode_lengths": list(b.decode_lengths), "decode_programs": len(b.programs),
                "compiled_programs": _compiled_programs()}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "dss_jax"}]}

    def respond(body: dict, out: dict, events: Any) -> Any:
        if _flag(body, "stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(events(service, out, usage), media_type="text/event-stream")
        return _without_ids(out)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await body_of(request, "completions")
        out = await service.complete(_prompts(body), body.get("input_b", ""), body)
        return respond(body, out, _completion_events)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        body = await body_of(request, "chat")
        out = _to_chat(await service.complete([_chat_input(body)], body.get("input_b", ""), body))
        if _flag(body, "stream"):
            return respond(body, out, _chat_events)
        out["choices"] = [{k: v for k, v in c.items() if k not in ("_ids", "text")} for c in out["choices"]]
        return out

    return app


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 0..65535")
    return port


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): the flag and what is wrong with it."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    p = _OneLineParser(prog="dss-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a dss-train model dir")
    p.add_argument("--checkpoint", default=None, help="a checkpoints/<step> dir (default: best, else latest)")
    p.add_argument("--model_name", default=None, help="the model id clients send (default: the model dir's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0..65535 (0: any free port)")
    p.add_argument("--max_batch", type=int, default=16, help="rows decoded together")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="how long the first request waits for others")
    p.add_argument(
        "--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger request bodies get 413 (default 1 MiB)"
    )
    p.add_argument("--no_precompile", action="store_true", help="compile each decode program on first use, not at start-up")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.max_body_bytes < 1:
        p.error("--max_batch and --max_body_bytes must be >= 1 and --max_wait_ms >= 0")
    try:
        predictor = Predictor(args.model_dir, args.checkpoint, batch_size=args.max_batch, tool="dss-serve")
    except (FileNotFoundError, ValueError, ModelDirError) as e:
        print(f"dss-serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    name = args.model_name or Path(args.model_dir).resolve().name
    service = StudentService(predictor, name, args.max_batch, args.max_wait_ms)
    b = service.batcher
    when = "on first use" if args.no_precompile else "now"
    print(
        f"dss-serve: {len(b.programs)} decode programs, compiled {when} (batch sizes {list(b.batch_sizes)} x "
        f"decode lengths {list(b.decode_lengths)}); no request compiles another",
        file=sys.stderr,
        flush=True,
    )
    app = build_app(service, args.max_body_bytes, precompile=not args.no_precompile)
    print(f"dss-serve: {name} from {predictor.step_dir} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
