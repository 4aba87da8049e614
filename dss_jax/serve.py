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
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:  # FastAPI resolves the handlers' annotations in this module's globals
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("dss-serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from e

from dss_jax import decoding, serve_api
from dss_jax.infer import ModelDirError, Predictor

DEFAULT_MAX_BODY_BYTES = 1 << 20
SMALLEST_DECODE_BUCKET = 16


@dataclasses.dataclass(eq=False)  # compared by identity: ``ids`` is an array
class _Job:
    ids: np.ndarray
    sampling: serve_api.Sampling
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

    async def submit(self, ids: np.ndarray, sampling: serve_api.Sampling) -> tuple[list[int], bool]:
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

    def _run_decode(
        self, rows: list[np.ndarray], samplings: list[serve_api.Sampling], batch_size: int, length: int
    ) -> np.ndarray:
        p = self.predictor
        batch = decoding.pad_rows(rows, batch_size, p.inputs_length)
        seeds, max_tokens = np.zeros(batch_size, np.uint32), np.zeros(batch_size, np.int32)  # padding rows: 0 tokens
        temperature, top_p, top_k = (
            np.zeros(batch_size, np.float32),
            np.ones(batch_size, np.float32),
            np.zeros(batch_size, np.int32),
        )
        for i, s in enumerate(samplings):
            seeds[i], max_tokens[i] = s.seed, s.max_tokens
            temperature[i], top_p[i], top_k[i] = s.temperature, s.top_p, s.top_k
        tokens = decoding.decode_rows(p.params, batch, p.config, length, seeds, temperature, top_k, top_p, max_tokens)
        return np.asarray(tokens)

    def _decode(self, rows: list[np.ndarray], samplings: list[serve_api.Sampling]) -> list[tuple[list[int], bool]]:
        b = _bucket(len(rows), self.batch_sizes)
        n = _bucket(max(s.max_tokens for s in samplings), self.decode_lengths)
        tokens = self._run_decode(rows, samplings, b, n)
        self.stats.batches += 1
        self.stats.rows += len(rows)
        eos = self.predictor.config.eos_token_id
        return [
            decoding.cut_at_eos(row[: s.max_tokens], eos) for row, s in zip(tokens[: len(rows)].tolist(), samplings, strict=True)
        ]


class StudentService:
    """Request validation and formatting around a :class:`Batcher` (independent of the HTTP framework)."""

    def __init__(self, predictor: Predictor, model_name: str, max_batch: int = 16, max_wait_ms: float = 5.0):
        self.predictor, self.model_name = predictor, model_name
        self.batcher = Batcher(predictor, max_batch, max_wait_ms)

    def sampling(self, body: dict) -> serve_api.Sampling:
        return serve_api.sampling(body, self.predictor.max_decode_length, self.predictor.config.vocab_size)

    def check_model(self, body: dict) -> None:
        serve_api.check_model(body, self.model_name)

    def encode(self, text: str, text_b: str, prefix: str) -> np.ndarray:
        ids, truncated = self.predictor.encode(text, text_b, prefix)
        if truncated:  # refuse rather than answer a question the model never fully saw
            limit = self.predictor.inputs_length
            raise serve_api.RequestError(
                400, f"input is longer than the model's {limit} input tokens (its training length)", "prompt"
            )
        return ids

    def validate(self, body: dict, endpoint: str) -> None:
        """Every check that does not need the model: unsupported fields, types, text."""
        serve_api.validate(body, endpoint, self.model_name, self.predictor.max_decode_length, self.predictor.config.vocab_size)

    async def complete(self, prompts: list[str], text_b: str, body: dict) -> dict:
        """The completion as a dict; each choice also carries its label's token ids under ``_ids`` (for streaming)."""
        self.check_model(body)
        s = self.sampling(body)
        stops = serve_api.stop_strings(body)
        want_rationale = serve_api.flag(body, "rationale")
        fmt = self.predictor.format
        if want_rationale and not fmt.get("rationale_prefix"):
            raise serve_api.RequestError(400, "this model was not trained with rationales (method is not 'dss')", "rationale")
        tasks = [("label", fmt.get("label_prefix", ""))] + ([("rationale", fmt["rationale_prefix"])] if want_rationale else [])
        encoded = [self.encode(p, text_b, prefix) for p in prompts for _, prefix in tasks]
        outs = await asyncio.gather(*(self.batcher.submit(ids, s) for ids in encoded))
        self.batcher.stats.requests += 1
        sp = self.predictor.sp
        choices, completion_tokens = [], 0
        for i in range(len(prompts)):
            label_ids, stopped = outs[i * len(tasks)]
            label_ids = [t for t in label_ids if t < sp.get_piece_size()]
            text, cut = serve_api.cut_at_stop(sp.decode(label_ids), stops)
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
        return serve_api.completion(self.model_name, choices, prompt_tokens, completion_tokens)

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


def _compiled_programs() -> int:
    """Decode programs compiled in this process so far (entries of the jitted decode's cache; -1 if unknown)."""
    return getattr(decoding.decode_rows, "_cache_size", lambda: -1)()


def _add_error_handlers(app: FastAPI, service: StudentService) -> None:
    """Bad requests get a 4xx with an OpenAI-style error body, internal errors a 500; a client gone costs a line."""

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        service.batcher.stats.errors += 1
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)

    @app.exception_handler(serve_api.RequestError)
    async def _bad_request(_request: Request, e: serve_api.RequestError) -> JSONResponse:
        return error(e.status, e.message, e.param)

    @app.exception_handler(serve_api.ClientGone)
    async def _gone(request: Request, _e: serve_api.ClientGone) -> Response:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        print(
            f"dss-serve: {client} disconnected before its request body arrived ({request.url.path})", file=sys.stderr, flush=True
        )
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {e}")


def build_app(service: StudentService, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, precompile: bool = False) -> Any:
    """The FastAPI app over ``service``; ``precompile`` compiles every decode program before it serves."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if precompile:
            service.batcher.precompile()
        service.batcher.start()
        yield

    app = FastAPI(title="dss-serve", docs_url=None, redoc_url=None, lifespan=lifespan)

    _add_error_handlers(app, service)

    async def body_of(request: Request, endpoint: str) -> dict:
        body = await serve_api.read_body(request, max_body_bytes)
        service.validate(body, endpoint)
        return body

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
        if serve_api.flag(body, "stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(events(service.pieces, out, usage), media_type="text/event-stream")
        return serve_api.without_ids(out)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await body_of(request, "completions")
        out = await service.complete(serve_api.prompts(body), body.get("input_b", ""), body)
        return respond(body, out, serve_api.completion_events)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        body = await body_of(request, "chat")
        out = serve_api.to_chat(await service.complete([serve_api.chat_input(body)], body.get("input_b", ""), body))
        if serve_api.flag(body, "stream"):
            return respond(body, out, serve_api.chat_events)
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
