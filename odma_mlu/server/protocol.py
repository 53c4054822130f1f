"""OpenAI request validation and response shapes, with no framework in the way.

Requests are validated by hand rather than by pydantic models so every rejection carries an
OpenAI-style body (``{"error": {"message", "type", "param", "code"}}``) naming the exact
field, the value and what is allowed, and so ``true`` can never pass as an integer (``bool``
is an ``int`` in Python). Every field is either honoured or rejected by name: unknown fields
are refused as the OpenAI API itself refuses them ("Unrecognized request argument"), and
fields the runtime does not implement (tools, ``logit_bias``, JSON mode, ...) are refused
when set to anything but their no-op value. Every integer is range-checked here, before the
request gets anywhere near the engine (a ``top_k`` of 2**70 must be a 400, not an overflow
inside a batched step).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from odma_mlu.engine.sampler import MAX_LOGPROBS, MAX_TOP_K, SEED_MAX, SEED_MIN

MAX_STOP_STRINGS = 4
MAX_STOP_TOKEN_IDS = 64
MAX_N = 16
MAX_JSON_DEPTH = 32
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
MESSAGE_KEYS = ("role", "content", "name", "reasoning_content")

# Fields accepted and honoured (or harmless metadata), per route.
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "best_of", "seed",
           "stop", "stop_token_ids", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
           "logprobs", "stream", "stream_options", "ignore_eos", "return_token_ids", "skip_special_tokens",
           "response_format", "user", "logit_bias", "tools", "functions", "tool_choice", "function_call",
           "parallel_tool_calls", "echo", "suffix", "min_p"}
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "parse_special_tokens"})
CHAT_FIELDS = frozenset(_COMMON | {"messages", "top_logprobs"})


class APIError(Exception):
    """An HTTP error with an OpenAI-style body; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


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
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    """Alternatives per token to return (completions' ``logprobs``, chat's ``top_logprobs``);
    None: no log-probabilities."""
    skip_special_tokens: bool = True
    parse_special_tokens: bool = False
    """Extension: a completion prompt's special-token strings become special tokens. By
    default they stay text, as any user text does."""


# -- safety of the raw document ---------------------------------------------------------------
def check_document(body: Any) -> None:
    """Reject JSON nested deeper than ``MAX_JSON_DEPTH`` and strings that are not valid Unicode
    (a lone surrogate, ``"\\ud800"``, parses in Python but cannot be encoded or tokenized)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels (at '{path}')",
                      path.split(".")[0].split("[")[0] or None, "invalid_json")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise bad(f"'{path}' is not valid Unicode text: {e.reason} at character {e.start} "
                          f"({v[e.start:e.end]!r}); send UTF-8 text without lone surrogates",
                          path or None, "invalid_string") from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((x, f"{path}.{k}" if path else str(k), depth + 1))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                stack.append((x, f"{path}[{i}]", depth + 1))


# -- typed field readers ---------------------------------------------------------------------
def _int(body: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer() and lo <= v <= hi:
            return int(v)  # 5.0 from a JavaScript client
        raise bad(f"'{key}' must be an integer in [{lo}, {hi}], got {type(v).__name__} {v!r:.60}", key,
                  "invalid_type")
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be an integer in [{lo}, {hi}], got {v}", key)
    return v


def _float(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise bad(f"'{key}' must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {type(v).__name__} "
                  f"{v!r:.60}", key, "invalid_type")
    v = float(v)
    if v < lo or v > hi or (lo_open and v == lo):
        raise bad(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", key)
    return v


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean, got {type(v).__name__} {v!r:.60}", key, "invalid_type")
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


def _stop_token_ids(body: Mapping[str, Any], vocab_size: int) -> tuple[int, ...]:
    v = body.get("stop_token_ids")
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad("'stop_token_ids' must be a list of token ids (integers)", "stop_token_ids", "invalid_type")
    if len(v) > MAX_STOP_TOKEN_IDS:
        raise bad(f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(v)}", "stop_token_ids")
    wrong = [t for t in v if not 0 <= t < vocab_size]
    if wrong:
        raise bad(f"'stop_token_ids' {wrong[:5]} are outside the vocabulary [0, {vocab_size})", "stop_token_ids")
    return tuple(v)


def _noop_or_reject(body: Mapping[str, Any]) -> None:
    """Fields this runtime does not implement: accepted only with their no-op value."""
    for key, what in (("logit_bias", "logit bias"), ("tools", "tool calling"), ("functions", "function calling")):
        v = body.get(key)
        if v not in (None, {}, []):
            raise unsupported(f"'{key}' ({what}) is not supported by this server; remove it", key)
    for key in ("tool_choice", "function_call"):
        v = body.get(key)
        if v not in (None, "none"):
            raise unsupported(f"'{key}' = {v!r:.60} needs tools, which this server does not support; "
                              "remove it or send \"none\"", key)
    if body.get("parallel_tool_calls") is not None:
        _bool(body, "parallel_tool_calls", False)  # meaningless without tools: type-checked only
    if body.get("echo") not in (None, False):
        raise unsupported("'echo' is not supported by this server; remove it or send false", "echo")
    if body.get("suffix") not in (None, ""):
        raise unsupported("'suffix' (insertion) is not supported by this server", "suffix")
    if _float(body, "min_p", 0.0, 0.0, 1.0) != 0.0:
        raise unsupported("'min_p' is not supported by this server (only 0); use top_p or top_k", "min_p")
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, Mapping) or not isinstance(rf.get("type"), str):
            raise bad("'response_format' must be an object like {\"type\": \"text\"}", "response_format",
                      "invalid_type")
        if rf["type"] != "text":
            raise unsupported(f"'response_format' type {rf['type']!r:.40} is not supported: this server has no "
                              "constrained (JSON) decoding; only {\"type\": \"text\"}. Ask for JSON in the prompt "
                              "and validate it client-side", "response_format")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad(f"'user' must be a string, got {type(user).__name__}", "user", "invalid_type")


def _model(body: Mapping[str, Any]) -> str:
    if "model" not in body:
        raise bad("you must provide a 'model' parameter", "model", "missing_required_parameter")
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise bad(f"'model' must be a non-empty string, got {model!r:.60}", "model", "invalid_type")
    return model


def _common(body: Any, kind: str, vocab_size: int) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    known = COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise unsupported(f"unrecognized request argument(s) {unknown[:5]}; this route accepts {sorted(known)}",
                          str(unknown[0]))
    _noop_or_reject(body)
    n = _int(body, "n", 1, 1, MAX_N) or 1
    best_of = _int(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise unsupported(f"'best_of' = {best_of} must equal 'n' ({n}): choosing the best of several samples is "
                          "not supported", "best_of")
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, Mapping) or set(opts) - {"include_usage", "continuous_usage_stats"}
                             or not isinstance(opts.get("include_usage", False), bool)):
        raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options",
                  "invalid_type")
    limit = 2**31 - 1
    max_tokens = _int(body, "max_tokens", None, 1, limit)
    max_completion = _int(body, "max_completion_tokens", None, 1, limit)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise bad(f"'max_tokens' ({max_tokens}) and 'max_completion_tokens' ({max_completion}) disagree; send one",
                  "max_completion_tokens")
    max_tokens = max_completion if max_completion is not None else max_tokens
    min_tokens = _int(body, "min_tokens", 0, 0, limit) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad(f"'min_tokens' ({min_tokens}) must be <= max_tokens ({max_tokens})", "min_tokens")
    top_k = _int(body, "top_k", 0, -1, MAX_TOP_K) or 0
    if kind == "completion":
        logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    else:
        want = _bool(body, "logprobs", False)
        top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not want:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if want else None
    return dict(model=_model(body), max_tokens=max_tokens, n=n,
                temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                top_k=max(top_k, 0),
                seed=_int(body, "seed", None, SEED_MIN, SEED_MAX), stop=_stop(body),
                stop_token_ids=_stop_token_ids(body, vocab_size), min_tokens=min_tokens,
                presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
                frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
                repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
                logprobs=logprobs, stream=stream,
                include_usage=bool(opts and opts.get("include_usage")),
                ignore_eos=_bool(body, "ignore_eos", False),
                return_token_ids=_bool(body, "return_token_ids", False),
                skip_special_tokens=_bool(body, "skip_special_tokens", True))


def parse_completion(body: Any, vocab_size: int) -> GenerationRequest:
    common = _common(body, "completion", vocab_size)
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
        wrong = [t for t in p if not 0 <= t < vocab_size]
        if wrong:
            raise bad(f"prompt token ids {wrong[:5]} are outside the vocabulary [0, {vocab_size})", "prompt")
        prompt = tuple(p)
    else:
        raise bad("'prompt' must be a non-empty string or a non-empty list of token ids (one prompt per "
                  "request)", "prompt", "invalid_type")
    return GenerationRequest(kind="completion", prompt=prompt, messages=None,
                             parse_special_tokens=_bool(body, "parse_special_tokens", False), **common)


def parse_messages(msgs: Any, template_uses_name: bool) -> tuple[dict[str, str], ...]:
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages",
                  "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", where, "invalid_type")
        extra = sorted(k for k in m if k not in MESSAGE_KEYS)
        if extra:
            raise unsupported(f"'{where}' has unsupported key(s) {extra[:5]} (tool calls are not supported); "
                              f"a message takes {list(MESSAGE_KEYS)}", f"{where}.{extra[0]}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise bad(f"'{where}.role' must be one of {list(CHAT_ROLES)}, got {role!r:.40}", f"{where}.role")
        if isinstance(content, list):  # content parts: only text is understood by a text model
            if not all(isinstance(c, Mapping) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise bad(f"'{where}.content' parts must all be {{\"type\": \"text\", \"text\": ...}} (this is a "
                          "text-only model)", f"{where}.content", "invalid_type")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string, got {type(content).__name__}", f"{where}.content",
                      "invalid_type")
        msg = {"role": role, "content": content}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str) or not name:
                raise bad(f"'{where}.name' must be a non-empty string", f"{where}.name", "invalid_type")
            if not template_uses_name:
                raise unsupported(f"'{where}.name' cannot be honoured: the model's chat template does not use "
                                  "message names; remove it or put the name in the content", f"{where}.name")
            msg["name"] = name
        # reasoning_content of earlier assistant turns is dropped, as R1's template does.
        out.append(msg)
    return tuple(out)


def parse_chat(body: Any, vocab_size: int, template_uses_name: bool = False) -> GenerationRequest:
    common = _common(body, "chat", vocab_size)
    if "messages" not in body:
        raise bad("you must provide a 'messages' parameter", "messages", "missing_required_parameter")
    return GenerationRequest(kind="chat", prompt=None, messages=parse_messages(body["messages"], template_uses_name),
                             **common)


# -- responses ---------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    return doc


@dataclass
class Choice:
    """One finished choice, ready to render."""

    index: int
    text: str
    finish_reason: str | None
    token_ids: tuple[int, ...]
    logprobs: Any = None
    reasoning: str | None = None


def full_response(req: GenerationRequest, rid: str, model: str, choices: list[Choice],
                  prompt_tokens: int) -> dict[str, Any]:
    created = int(time.time())
    docs = []
    for c in choices:
        if req.kind == "completion":
            doc: dict[str, Any] = {"index": c.index, "text": c.text, "logprobs": c.logprobs,
                                   "finish_reason": c.finish_reason}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            if c.reasoning is not None:
                message["reasoning_content"] = c.reasoning
            doc = {"index": c.index, "message": message, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
        if req.return_token_ids:
            doc["token_ids"] = list(c.token_ids)
        docs.append(doc)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return {"id": rid, "object": "text_completion" if req.kind == "completion" else "chat.completion",
            "created": created, "model": model, "choices": docs, "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(req: GenerationRequest, rid: str, model: str, created: int, text: str | None,
                 finish_reason: str | None, *, first: bool = False, index: int = 0,
                 usage_doc: dict[str, Any] | None = None, reasoning: str | None = None,
                 logprobs: Any = None) -> dict[str, Any]:
    """One SSE chunk; with ``usage_doc`` the final usage-only chunk (``choices`` empty)."""
    if req.kind == "completion":
        obj = "text_completion"
        choices = [] if usage_doc else [{"index": index, "text": text or "", "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    else:
        obj = "chat.completion.chunk"
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
            delta["content"] = ""
        if reasoning:
            delta["reasoning_content"] = reasoning
        if text:
            delta["content"] = text
        choices = [] if usage_doc else [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    doc: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if req.include_usage:
        doc["usage"] = usage_doc
    return doc
