"""``dss-serve``: a trained student behind an OpenAI-compatible HTTP API, with dynamic batching.

    dss-serve --model_dir DIR [--host 127.0.0.1] [--port 8000] [--max_batch 16] [--max_wait_ms 5]

Endpoints: ``POST /v1/completions`` (``prompt``: a string or a list), ``POST /v1/chat/completions`` (the last
user message is the input), ``GET /v1/models``, ``GET /health``. Extensions to OpenAI's request body:
``input_b`` (the NLI hypothesis) and ``rationale: true`` (also run the ``explain:`` task and return its text
in each choice's ``rationale``). Requests that arrive within ``max_wait_ms`` of each other and share their
sampling parameters decode together, up to ``max_batch`` rows, in one fixed-shape batch (one compile per
sampling setting). Bad requests get a 4xx with an OpenAI-style ``{"error": {...}}`` body; the server keeps
serving. It binds to 127.0.0.1 unless told otherwise. No TensorFlow or seqio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

try:  # FastAPI resolves the handlers' annotations in this module's globals
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("dss-serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from e

from dss_jax import decoding
from dss_jax.infer import Predictor

MAX_PROMPTS_PER_REQUEST = 64


class RequestError(Exception):
    """A bad request: becomes an HTTP 4xx with this message."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding settings; requests batch together only when these are equal."""

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


class Batcher:
    """Collects rows for up to ``max_wait_ms`` (or ``max_batch`` rows) and decodes them in one padded batch."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_ms: float):
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.stats = ServeStats()
        self._task: asyncio.Task | None = None

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
            key = pending[0].sampling
            batch = [j for j in pending if j.sampling == key][: self.max_batch]
            pending = [j for j in pending if all(j is not b for b in batch)]
            try:
                outs = await loop.run_in_executor(None, self._decode, [j.ids for j in batch], key)
                for j, out in zip(batch, outs):
                    if not j.future.done():
                        j.future.set_result(out)
            except Exception as e:  # a decode failure fails its requests, never the server
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)

    def _decode(self, rows: list[np.ndarray], s: Sampling) -> list[tuple[list[int], bool]]:
        p = self.predictor
        batch = np.zeros((self.max_batch, p.inputs_length), np.int32)  # fixed shape: one compile per setting
        for i, r in enumerate(rows):
            batch[i, : len(r)] = r
        sample = s.temperature > 0
        tokens = decoding.decode(
            p.params,
            batch,
            p.config,
            s.max_tokens,
            rng=jax.random.PRNGKey(s.seed),
            sample=sample,
            temperature=s.temperature if sample else 1.0,
            top_k=s.top_k if sample else 0,
            top_p=s.top_p if sample else 1.0,
        )
        self.stats.batches += 1
        self.stats.rows += len(rows)
        eos = p.config.eos_token_id
        out = []
        for row in np.asarray(tokens)[: len(rows)].tolist():
            stopped = eos in row
            out.append((row[: row.index(eos)] if stopped else row, stopped))
        return out


def _number(body: dict, name: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(400, f"'{name}' must be a {kind.__name__}, got {v!r}", name)
    if not lo <= v <= hi:
        raise RequestError(400, f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return kind(v)


class StudentService:
    """Request validation and formatting around a :class:`Batcher` (independent of the HTTP framework)."""

    def __init__(self, predictor: Predictor, model_name: str, max_batch: int = 16, max_wait_ms: float = 5.0):
        self.predictor, self.model_name = predictor, model_name
        self.batcher = Batcher(predictor, max_batch, max_wait_ms)

    def sampling(self, body: dict) -> Sampling:
        limit = self.predictor.max_decode_length
        if _number(body, "n", 1, int, 1, 1) != 1:
            raise RequestError(400, "'n' must be 1", "n")
        return Sampling(
            max_tokens=_number(body, "max_tokens", limit, int, 1, limit),
            temperature=_number(body, "temperature", 0.0, float, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, float, 1e-6, 1.0),
            top_k=_number(body, "top_k", 0, int, 0, self.predictor.config.vocab_size),
            seed=_number(body, "seed", 0, int, 0, 2**31 - 1),
        )

    def check_model(self, body: dict) -> None:
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise RequestError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}", "model")

    def encode(self, text: str, text_b: str, prefix: str) -> np.ndarray:
        ids, truncated = self.predictor.encode(text, text_b, prefix)
        if truncated:  # refuse rather than answer a question the model never fully saw
            limit = self.predictor.inputs_length
            raise RequestError(400, f"input is longer than the model's {limit} input tokens (its training length)", "prompt")
        return ids

    async def complete(self, prompts: list[str], text_b: str, body: dict) -> dict:
        self.check_model(body)
        s = self.sampling(body)
        want_rationale = body.get("rationale", False)
        if not isinstance(want_rationale, bool):
            raise RequestError(400, "'rationale' must be true or false", "rationale")
        fmt = self.predictor.format
        if want_rationale and not fmt.get("rationale_prefix"):
            raise RequestError(400, "this model was not trained with rationales (method is not 'dss')", "rationale")
        tasks = [("label", fmt.get("label_prefix", ""))] + ([("rationale", fmt["rationale_prefix"])] if want_rationale else [])
        jobs = []
        for p in prompts:
            for _, prefix in tasks:
                jobs.append(self.batcher.submit(self.encode(p, text_b, prefix), s))
        outs = await asyncio.gather(*jobs)
        self.batcher.stats.requests += 1
        sp = self.predictor.sp
        choices, completion_tokens = [], 0
        for i in range(len(prompts)):
            label_ids, stopped = outs[i * len(tasks)]
            completion_tokens += len(label_ids)
            choice = {
                "index": i,
                "text": sp.decode([t for t in label_ids if t < sp.get_piece_size()]),
                "finish_reason": "stop" if stopped else "length",
                "logprobs": None,
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


def build_app(service: StudentService) -> Any:
    """The FastAPI app over ``service``."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield

    app = FastAPI(title="dss-serve", docs_url=None, redoc_url=None, lifespan=lifespan)

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        service.batcher.stats.errors += 1
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        text_b = body.get("input_b", "")
        if not isinstance(text_b, str):
            raise RequestError(400, "'input_b' must be a string", "input_b")
        return body

    @app.exception_handler(RequestError)
    async def _bad_request(_request: Request, e: RequestError) -> JSONResponse:
        return error(e.status, e.message, e.param)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/health")
    async def health() -> dict:
        s = service.batcher.stats
        return {"status": "ok", "model": service.model_name, **dataclasses.asdict(s),
                "batch_fill": s.batch_fill(service.batcher.max_batch)}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "dss_jax"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await body_of(request)
        return await service.complete(_prompts(body), body.get("input_b", ""), body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await body_of(request)
        out = await service.complete([_chat_input(body)], body.get("input_b", ""), body)
        c = out["choices"][0]
        message = {"role": "assistant", "content": c["text"]}
        if "rationale" in c:
            message["rationale"] = c["rationale"]
        out.update(id=out["id"].replace("cmpl", "chatcmpl"), object="chat.completion")
        out["choices"] = [{"index": 0, "message": message, "finish_reason": c["finish_reason"]}]
        return out

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dss-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a dss-train model dir")
    p.add_argument("--checkpoint", default=None, help="a checkpoints/<step> dir (default: best, else latest)")
    p.add_argument("--model_name", default=None, help="the model id clients send (default: the model dir's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch", type=int, default=16, help="rows decoded together")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="how long the first request waits for others")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.max_wait_ms < 0:
        p.error("--max_batch must be >= 1 and --max_wait_ms >= 0")
    try:
        predictor = Predictor(args.model_dir, args.checkpoint, batch_size=args.max_batch)
    except (FileNotFoundError, ValueError) as e:
        print(f"dss-serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    name = args.model_name or Path(args.model_dir).resolve().name
    service = StudentService(predictor, name, args.max_batch, args.max_wait_ms)
    print(f"dss-serve: {name} from {predictor.step_dir} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(build_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
