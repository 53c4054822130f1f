"""From an HTTP request to engine inputs: the body read (bounded in size and time), JSON,
auth, prompt token ids (special-token strings in user text stay text), max_tokens and the
sampling parameters; and the /tokenize and /detokenize bodies. Every check raises an
``APIError`` naming the field."""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from typing import Any

from fastapi import Request

from odma_mlu.engine.sampler import SEED_MAX, SEED_MIN, SamplingParams
from odma_mlu.errors import RequestRejected
from odma_mlu.server.protocol import APIError, GenerationRequest, bad, check_document, parse_messages
from odma_mlu.server.state import ServerState

async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The raw body, refusing oversized bodies before reading them whole and slow ones (a
    client trickling bytes holds a connection and a task) after ``timeout_s``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body was not received within {timeout_s:g} s "
                       "(server.body_read_timeout_s)", code="request_timeout",
                       headers={"Connection": "close"}) from None
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    check_document(body)
    return body


async def read_json(request: Request, state: ServerState) -> Any:
    srv = state.settings.server
    raw = await read_body(request, srv.max_body_bytes, srv.body_read_timeout_s)
    return await state.off_loop(lambda: parse_json(raw)) if len(raw) > 65536 else parse_json(raw)


def check_auth(request: Request, state: ServerState) -> None:
    key = state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


def encode_text(state: ServerState, text: str, parse_special: bool) -> list[int]:
    """Token ids of ``text``; special-token strings stay text unless ``parse_special``."""
    tok = state.tokenizer
    if parse_special or not any(s in text for s in state.special_strings):
        return list(tok.encode(text, add_special_tokens=False))
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def chat_ids(state: ServerState, messages: list[dict[str, str]], add_generation_prompt: bool = True,
              param: str = "messages") -> tuple[list[int], str]:
    """The chat template's ids, with the messages' text kept as text: a user who types
    ``<|im_end|>`` gets those characters, not the end-of-turn token."""
    tok = state.tokenizer
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template error is the client's messages' fault
        raise bad(f"the model's chat template rejected the messages: {type(e).__name__}: {e}", param) from None
    if not isinstance(text, str):
        raise bad("the model's chat template did not render text", param)
    if not any(s in m["content"] or s in m.get("name", "") for m in messages for s in state.special_strings):
        return list(tok.encode(text, add_special_tokens=False)), text
    # Render again with a unique marker for each message text, then tokenize the template's
    # own parts with special tokens and the message texts without.
    marks = [f"\x00odma{uuid.uuid4().hex}\x00" for _ in messages]
    marked = [{**m, "content": mk} for m, mk in zip(messages, marks)]
    rendered = tok.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    rest = rendered
    for m, mk in zip(messages, marks):
        before, found, rest_after = rest.partition(mk)
        if not found:  # the template dropped or transformed this message's text
            before, rest_after = "", rest
        ids += tok.encode(before, add_special_tokens=False) if before else []
        if found:
            ids += tok(m["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        rest = rest_after
    ids += tok.encode(rest, add_special_tokens=False) if rest else []
    return ids, text


def prompt_ids_of(state: ServerState, req: GenerationRequest) -> tuple[list[int], str | None]:
    """Token ids for the engine and the text the length predictor sees (runs on the pool)."""
    if req.kind == "chat":
        return chat_ids(state, list(req.messages or ()))
    if isinstance(req.prompt, str):
        return encode_text(state, req.prompt, req.parse_special_tokens), req.prompt
    return list(req.prompt or ()), None


def max_tokens_for(state: ServerState, req: GenerationRequest, prompt_tokens: int) -> int:
    param = "messages" if req.kind == "chat" else "prompt"
    room = state.context_tokens - prompt_tokens
    if prompt_tokens == 0:
        raise bad("the prompt is empty after tokenization", param)
    if room <= 0:
        raise bad(f"the prompt is {prompt_tokens} tokens; the model's context is {state.context_tokens} tokens "
                  "and must leave room for at least one generated token", param, "context_length_exceeded")
    if req.max_tokens is None:
        default = state.settings.server.default_max_tokens if req.kind == "completion" else state.max_new_tokens
        return max(min(default, room, state.max_new_tokens), min(req.min_tokens, room, state.max_new_tokens))
    max_tokens = req.max_tokens
    if prompt_tokens + max_tokens > state.context_tokens:
        raise bad(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {prompt_tokens + max_tokens} "
                  f"exceeds the model's context of {state.context_tokens} tokens; lower max_tokens to at "
                  f"most {room}", "max_tokens", "context_length_exceeded")
    if max_tokens > state.max_new_tokens:
        raise bad(f"max_tokens {max_tokens} exceeds this server's limit of {state.max_new_tokens} generated "
                  "tokens per request (scheduler.max_new_tokens)", "max_tokens")
    return max_tokens


def sampling_params_for(state: ServerState, req: GenerationRequest, prompt_tokens: int) -> list[SamplingParams]:
    """One SamplingParams per choice (``n``); seeded choices get seed, seed+1, ..."""
    max_tokens = max_tokens_for(state, req, prompt_tokens)
    if req.min_tokens > max_tokens:
        raise bad(f"'min_tokens' ({req.min_tokens}) exceeds the max_tokens this request gets ({max_tokens})",
                  "min_tokens")
    out = []
    for i in range(req.n):
        seed = req.seed
        if seed is not None and i:
            seed = SEED_MIN + (seed - SEED_MIN + i) % (SEED_MAX - SEED_MIN + 1)
        try:
            out.append(SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=seed,
                                      stop=req.stop, stop_token_ids=req.stop_token_ids, max_new_tokens=max_tokens,
                                      min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
                                      presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                      repetition_penalty=req.repetition_penalty, logprobs=req.logprobs))
        except RequestRejected as e:
            raise bad(str(e)) from None
    return out


def tokenize_body(state: ServerState, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    allowed = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise APIError(400, f"unrecognized argument(s) {unknown[:5]}; /tokenize accepts {sorted(allowed)}",
                       param=str(unknown[0]), code="unsupported_parameter")
    check_model(state, body)
    flags = {}
    for key, default in (("add_special_tokens", False), ("add_generation_prompt", True), ("return_token_strs", False)):
        v = body.get(key, default)
        if not isinstance(v, bool):
            raise bad(f"'{key}' must be a boolean, got {type(v).__name__}", key, "invalid_type")
        flags[key] = v
    if ("prompt" in body) == ("messages" in body):
        raise bad("send exactly one of 'prompt' (text) or 'messages' (chat)", "prompt", "missing_required_parameter")
    if "messages" in body:
        messages = list(parse_messages(body["messages"], state.template_uses_name))
        ids, _ = chat_ids(state, messages, flags["add_generation_prompt"])
    else:
        p = body["prompt"]
        if not isinstance(p, str):
            raise bad(f"'prompt' must be a string, got {type(p).__name__}", "prompt", "invalid_type")
        ids = encode_text(state, p, flags["add_special_tokens"])
    doc: dict[str, Any] = {"count": len(ids), "max_model_len": state.context_tokens, "tokens": ids}
    if flags["return_token_strs"]:
        doc["token_strs"] = state.tokenizer.convert_ids_to_tokens(ids)
    return doc


def detokenize_body(state: ServerState, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    unknown = sorted(k for k in body if k not in ("model", "tokens"))
    if unknown:
        raise APIError(400, f"unrecognized argument(s) {unknown[:5]}; /detokenize accepts ['model', 'tokens']",
                       param=str(unknown[0]), code="unsupported_parameter")
    check_model(state, body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("'tokens' must be a list of token ids (integers)", "tokens",
                  "missing_required_parameter" if tokens is None else "invalid_type")
    wrong = [t for t in tokens if not 0 <= t < state.vocab_size]
    if wrong:
        raise bad(f"token ids {wrong[:5]} are outside the vocabulary [0, {state.vocab_size})", "tokens")
    return {"prompt": state.tokenizer.decode(tokens, skip_special_tokens=False)}


def check_model(state: ServerState, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model!r:.80} does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")
