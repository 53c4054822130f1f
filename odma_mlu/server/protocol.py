"""OpenAI request validation and response shapes, with no framework in the way.

Requests are validated by hand rather than by pydantic models so every rejection carries an
OpenAI-style body (``{"error": {"message", "type", "param", "code"}}``) naming the exact
field and the fix, and so ``true`` can never pass as an integer (``bool`` is an ``int`` in
Python). Fields the runtime does not implement are rejected when set to a non-default value
instead of being silently ignored: a client asking for ``n=3`` must not get one answer.
Unknown fields are ignored, as the OpenAI API does (clients add vendor fields freely).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

MAX_STOP_STRINGS = 4
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


class APIError(Exception):
    """An HTTP error with an OpenAI-style body; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completion or chat request, before tokenization."""

    kind: str  # "completion" | "chat"
    model: str
    prompt: str | tuple[int, ...] | None
    messages: tuple[dict[str, str], ...] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    return_token_ids: bool = False
    """Extension (as in vLLM): add the generated ids to each choice, for exact checks."""


# -- typed field readers ---------------------------------------------------------------------
def _int(body: Mapping[str, Any], key: str, default: int | None, *, minimum: int | None = None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{key}' must be an integer, got {type(v).__name__} {v!r}", key, "invalid_type")
    if minimum is not None and v < minimum:
        raise bad(f"'{key}' must be >= {minimum}, got {v}", key)
    return v


def _float(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
        raise bad(f"'{key}' must be a number, got {type(v).__name__} {v!r}", key, "invalid_type")
    v = float(v)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return v


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean, got {type(v).__name__} {v!r}", key, "invalid_type")
    return v


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad("'stop' must be a non-empty string or a list of non-empty strings", "stop", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(items)}", "stop")
    return tuple(items)


def _unsupported(body: Mapping[str, Any]) -> None:
    """Reject options this runtime would otherwise silently ignore."""
    n = _int(body, "n", 1, minimum=1)
    if n != 1:
        raise bad(f"'n' must be 1 (one choice per request), got {n}; send {n} requests instead", "n")
    for key in ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "suffix"):
        v = body.get(key)
        if v not in (None, False, 0, {}, []):
            raise bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
    for key in ("presence_penalty", "frequency_penalty"):
        if _float(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise bad(f"'{key}' is not supported by this server (only 0)", key, "unsupported_parameter")
    if body.get("echo") not in (None, False):
        raise bad("'echo' is not supported by this server", "echo", "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise bad("'best_of' must be 1", "best_of", "unsupported_parameter")


def _model(body: Mapping[str, Any]) -> str:
    if "model" not in body:
        raise bad("you must provide a 'model' parameter", "model", "missing_required_parameter")
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise bad(f"'model' must be a non-empty string, got {model!r}", "model", "invalid_type")
    return model


def _common(body: Mapping[str, Any], kind: str, max_tokens_key: str) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    _unsupported(body)
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, Mapping) or not isinstance(opts.get("include_usage", False), bool)):
        raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options",
                  "invalid_type")
    max_tokens = _int(body, max_tokens_key, None, minimum=1)
    if max_tokens is None and kind == "chat":
        max_tokens = _int(body, "max_tokens", None, minimum=1)
    return dict(model=_model(body), max_tokens=max_tokens,
                temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                top_k=_int(body, "top_k", 0, minimum=0) or 0,
                seed=_int(body, "seed", None), stop=_stop(body), stream=_bool(body, "stream", False),
                include_usage=bool(opts and opts.get("include_usage")),
                ignore_eos=_bool(body, "ignore_eos", False),
                return_token_ids=_bool(body, "return_token_ids", False))


def parse_completion(body: Any) -> GenerationRequest:
    common = _common(body, "completion", "max_tokens")
    if "prompt" not in body:
        raise bad("you must provide a 'prompt' parameter", "prompt", "missing_required_parameter")
    p = body["prompt"]
    # OpenAI accepts a batch of prompts; one request per prompt keeps usage and errors simple.
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("'prompt' must not be empty", "prompt")
        prompt: str | tuple[int, ...] = p
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        prompt = tuple(p)
    else:
        raise bad("'prompt' must be a non-empty string or a non-empty list of token ids (one prompt per "
                  "request)", "prompt", "invalid_type")
    return GenerationRequest(kind="completion", prompt=prompt, messages=None, **common)


def parse_chat(body: Any) -> GenerationRequest:
    common = _common(body, "chat", "max_completion_tokens")
    if "messages" not in body:
        raise bad("you must provide a 'messages' parameter", "messages", "missing_required_parameter")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                  "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", where, "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise bad(f"'{where}.role' must be one of {list(CHAT_ROLES)}, got {role!r}", f"{where}.role")
        if isinstance(content, list):  # content parts: only text is understood by a text model
            if not all(isinstance(c, Mapping) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise bad(f"'{where}.content' parts must all be {{\"type\": \"text\", \"text\": ...}}",
                          f"{where}.content", "invalid_type")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string, got {type(content).__name__}", f"{where}.content",
                      "invalid_type")
        out.append({"role": role, "content": content})
    return GenerationRequest(kind="chat", prompt=None, messages=tuple(out), **common)


# -- responses ---------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(req: GenerationRequest, rid: str, model: str, text: str, finish_reason: str | None,
                  prompt_tokens: int, token_ids: tuple[int, ...]) -> dict[str, Any]:
    created = int(time.time())
    if req.kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    if req.return_token_ids:
        choice["token_ids"] = list(token_ids)
    completion_tokens = len(token_ids)
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(req: GenerationRequest, rid: str, model: str, created: int, text: str | None,
                 finish_reason: str | None, *, first: bool = False,
                 usage_doc: dict[str, int] | None = None) -> dict[str, Any]:
    """One SSE chunk; with ``usage_doc`` the final usage-only chunk (``choices`` empty)."""
    if req.kind == "completion":
        obj = "text_completion"
        choices = [] if usage_doc else [{"index": 0, "text": text or "", "logprobs": None,
                                         "finish_reason": finish_reason}]
    else:
        obj = "chat.completion.chunk"
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choices = [] if usage_doc else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    doc: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if req.include_usage:
        doc["usage"] = usage_doc
    return doc
