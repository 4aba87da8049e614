"""dss-serve's OpenAI request parsing and validation, and its response and stream formats (no model here).

Each check raises :class:`RequestError`, which the app turns into a 4xx with an OpenAI-style error body naming
the field.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from starlette.requests import ClientDisconnect, Request

# (token ids, text) -> the text in one piece per token: StudentService.pieces
Pieces = Callable[[list[int], str], Iterator[str]]

MAX_PROMPTS_PER_REQUEST = 64
MAX_STOP_STRINGS = 4
# Request fields, by endpoint. A field outside these is refused with a 400 naming it.
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options"}
COMMON_FIELDS |= {"n", "user", "input_b", "rationale"}
FIELDS = {
    "completions": COMMON_FIELDS | {"prompt"},
    "chat": COMMON_FIELDS | {"messages", "max_completion_tokens"},
}
# OpenAI fields this server does not implement: accepted only at the value that changes nothing.
NO_OP_VALUES: dict[str, tuple] = {
    "echo": (False,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "best_of": (1,),
    "suffix": ("",),
    "logit_bias": ({},),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
}


class ClientGone(Exception):
    """The client closed the connection before its body arrived: nobody to answer."""


class RequestError(Exception):
    """A bad request: becomes an HTTP 4xx with this message."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's decoding settings: per-row values of the compiled decode, so any mix batches together."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


def number(body: dict, name: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    ok_type = isinstance(v, int) or (isinstance(v, float) and (kind is float or v.is_integer()))
    if isinstance(v, bool) or not ok_type:
        raise RequestError(400, f"'{name}' must be a {kind.__name__}, got {str(v)[:40]!r}", name)
    if not lo <= v <= hi:  # exact for ints of any size; False for NaN
        raise RequestError(400, f"'{name}' must be in [{lo}, {hi}], got {str(v)[:40]}", name)
    return kind(v)


def check_fields(body: dict, endpoint: str) -> None:
    """400 for a field this server does not implement, rather than silently ignoring it."""
    for k, v in body.items():
        if k in FIELDS[endpoint] or v is None:
            continue
        if k in NO_OP_VALUES:
            if any(v == ok and isinstance(v, bool) == isinstance(ok, bool) for ok in NO_OP_VALUES[k]):
                continue
            raise RequestError(400, f"'{k}' is not supported by dss-serve (only its no-op value is accepted)", k)
        raise RequestError(400, f"'{k}' is not a field dss-serve supports (see dss-serve --help)", k)


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops) or len(stops) > MAX_STOP_STRINGS:
        raise RequestError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    return stops


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first occurrence of any stop string, and whether one occurred."""
    at = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(400, f"'{name}' must be true or false", name)
    return v


def bad_string(x: Any) -> bool:
    """True for a string that is not valid Unicode text (a lone surrogate from a JSON \\ud800 escape)."""
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(value: Any, field: str) -> None:
    """400 naming ``field`` when any string inside ``value`` is not encodable text."""
    stack = [value]
    while stack:
        x = stack.pop()
        if isinstance(x, str) and bad_string(x):
            raise RequestError(400, f"'{field}' holds a string that is not valid Unicode (a lone surrogate)", field)
        if isinstance(x, dict):
            if any(isinstance(k, str) and bad_string(k) for k in x):
                raise RequestError(400, f"'{field}' holds a key that is not valid Unicode (a lone surrogate)", field)
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def prompts(body: dict) -> list[str]:
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


def chat_input(body: dict) -> str:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    users = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1], str) or not users[-1].strip():
        raise RequestError(400, "'messages' needs a user message with string content", "messages")
    return users[-1]


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def completion_events(pieces: Pieces, out: dict, include_usage: bool) -> Iterator[bytes]:
    head = {k: out[k] for k in ("id", "object", "created", "model")}
    for c in out["choices"]:
        for piece in pieces(c["_ids"], c["text"]):
            yield sse({**head, "choices": [{"index": c["index"], "text": piece, "finish_reason": None, "logprobs": None}]})
        last = {"index": c["index"], "text": "", "finish_reason": c["finish_reason"], "logprobs": None}
        if "rationale" in c:
            last["rationale"] = c["rationale"]
        yield sse({**head, "choices": [last]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": out["usage"]})
    yield b"data: [DONE]\n\n"


def chat_events(pieces: Pieces, out: dict, include_usage: bool) -> Iterator[bytes]:
    head = {"id": out["id"], "object": "chat.completion.chunk", "created": out["created"], "model": out["model"]}
    c = out["choices"][0]
    yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    for piece in pieces(c["_ids"], c["text"]):
        yield sse({**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    delta = {"rationale": c["rationale"]} if "rationale" in c else {}
    yield sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": c["finish_reason"]}]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": out["usage"]})
    yield b"data: [DONE]\n\n"


def without_ids(out: dict) -> dict:
    out["choices"] = [{k: v for k, v in c.items() if k != "_ids"} for c in out["choices"]]
    return out


def to_chat(out: dict) -> dict:
    c = out["choices"][0]
    message = {"role": "assistant", "content": c["text"]}
    if "rationale" in c:
        message["rationale"] = c["rationale"]
    out.update(id=out["id"].replace("cmpl", "chatcmpl"), object="chat.completion")
    out["choices"] = [{"index": 0, "message": message, "finish_reason": c["finish_reason"], "_ids": c["_ids"], "text": c["text"]}]
    return out


def sampling(body: dict, limit: int, vocab_size: int) -> Sampling:
    """The request's decoding settings (``limit``: the model's longest decode; a request without a seed gets a
    fresh one)."""
    if number(body, "n", 1, int, 1, 2**31) != 1:
        raise RequestError(400, "'n' > 1 is not supported by dss-serve: send n requests with different seeds", "n")
    max_tokens = number(body, "max_tokens", limit, int, 1, limit)
    if body.get("max_completion_tokens") is not None:
        other = number(body, "max_completion_tokens", limit, int, 1, limit)
        if "max_tokens" in body and body["max_tokens"] is not None and other != max_tokens:
            raise RequestError(400, "'max_tokens' and 'max_completion_tokens' differ", "max_completion_tokens")
        max_tokens = other
    temperature = number(body, "temperature", 0.0, float, 0.0, 2.0)
    seed = number(body, "seed", None, int, 0, 2**31 - 1)
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=number(body, "top_p", 1.0, float, 1e-6, 1.0),
        top_k=number(body, "top_k", 0, int, 0, vocab_size),
        seed=secrets.randbelow(2**31) if seed is None else seed,
    )


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model", model_name)
    if model != model_name:
        raise RequestError(404, f"model {str(model)[:80]!r} does not exist; this server serves {model_name!r}", "model")


def validate(body: dict, endpoint: str, model_name: str, limit: int, vocab_size: int) -> None:
    """Every check that does not need the model: unsupported fields, types, text."""
    check_fields(body, endpoint)
    for k, v in body.items():
        check_text(v, k)
    check_model(body, model_name)
    sampling(body, limit, vocab_size)
    stop_strings(body)
    flag(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(opts.get("include_usage", False), bool):
            raise RequestError(400, "'stream_options' may only hold include_usage: true or false", "stream_options")
        if not flag(body, "stream"):
            raise RequestError(400, "'stream_options' needs 'stream': true", "stream_options")
    if not isinstance(body.get("user", ""), str):
        raise RequestError(400, "'user' must be a string", "user")


async def read_body(request: Request, max_body_bytes: int) -> dict:
    """The request's JSON object, read in chunks: 413 past ``max_body_bytes`` (declared or streamed), 400 for
    anything but a JSON object or a non-string ``input_b``; :class:`ClientGone` when the client leaves first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise RequestError(413, f"request body of {declared} bytes is over the {max_body_bytes}-byte limit (--max_body_bytes)")
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise RequestError(413, f"request body is over the {max_body_bytes}-byte limit (--max_body_bytes)")
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        body = json.loads(bytes(raw))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(400, f"malformed JSON body: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    if not isinstance(body.get("input_b", ""), str):
        raise RequestError(400, "'input_b' must be a string", "input_b")
    return body


def completion(model_name: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """An OpenAI ``text_completion`` object."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
