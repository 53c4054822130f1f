"""The FastAPI application: OpenAI-compatible routes, /tokenize, /detokenize, /health, /metrics.

Handlers run on the event loop and never call the engine: they read the body (bounded in
size and time), validate every field (``protocol.py``), tokenize on a small thread pool (a
megabyte prompt must not stall ``/health`` and every stream), then talk to the engine
thread through ``AsyncEngine``. Each request's stream is released exactly once, in
``finally`` blocks that also run when the client disconnects, so an abandoned request is
aborted and its KV freed.

Drain (SIGTERM): ``begin_drain`` refuses new requests with 503 and gives in-flight ones
``server.drain_timeout_s``; at the deadline the engine fails what is left, and those
clients get a JSON 503 (plain requests) or an error event followed by ``[DONE]`` (streams)
before uvicorn closes the connections.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from odma_mlu.engine.llm_engine import LLMEngine, RequestOutput
from odma_mlu.engine.sampler import TokenLogprobs, SamplingParams, SEED_MAX, SEED_MIN
from odma_mlu.errors import RequestRejected
from odma_mlu.server.async_engine import Accepted, AsyncEngine, Failed, RequestStream
from odma_mlu.server.metrics import CONTENT_TYPE, ServerMetrics
from odma_mlu.server.openapi import openapi_document
from odma_mlu.server.protocol import (APIError, Choice, GenerationRequest, bad, check_document, full_response,
                                      new_id, parse_chat, parse_completion, parse_messages, stream_chunk, usage)
from odma_mlu.server.settings import ServeSettings
from odma_mlu.server.streaming import Detokenizer, ReasoningParser, chat_logprobs, completion_logprobs

log = logging.getLogger("odma_mlu.server")

T = TypeVar("T")
RETRY_AFTER_S = 1
TOKENIZER_THREADS = 2


class ServerState:
    """Everything the handlers share; created once per app."""

    def __init__(self, engine: LLMEngine, settings: ServeSettings, tokenizer: Any, model_name: str) -> None:
        self.settings = settings
        self.tokenizer = tokenizer  # handler copy, used on the tokenizer pool; the engine keeps its own
        self.model_name = model_name
        self.context_tokens = engine.spec.max_position_embeddings
        self.max_new_tokens = engine.scheduler.config.max_new_tokens
        self.vocab_size = engine.spec.vocab_size
        self.engine = AsyncEngine(engine, max_waiting=settings.server.max_waiting_requests)
        self.metrics = ServerMetrics(lambda: self.engine.snapshot, engine.policy.name, model_name)
        self.engine._on_finish = self.metrics.on_finish
        self.engine._on_token_gap = self.metrics.on_token_gap
        self.reasoning_parser = settings.server.reasoning_parser
        template = getattr(tokenizer, "chat_template", None)
        self.template_uses_name = isinstance(template, str) and "name" in template.replace("m['role']", "")
        added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
        self.special_strings = tuple(sorted(added, key=len, reverse=True))
        self.pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="odma-tokenize")
        self.draining = False
        self._drain_task: asyncio.Task | None = None
        self.created = int(time.time())

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """Run CPU-heavy work (tokenization, templating) on the tokenizer pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    def begin_drain(self, timeout_s: float) -> None:
        """Refuse new requests; fail what is still running after ``timeout_s``. Idempotent."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d requests in flight, up to %.1f s", self.engine.inflight, timeout_s)

        async def deadline() -> None:
            if not await self.engine.drain(timeout_s):
                log.warning("drain timeout of %.1f s exceeded: failing %d requests", timeout_s, self.engine.inflight)
                self.engine.fail_all(f"the server is shutting down: the drain timeout of {timeout_s:g} s was "
                                     "exceeded; retry on another replica", 503)

        self._drain_task = asyncio.get_running_loop().create_task(deadline())


class _EngineStreamResponse(StreamingResponse):
    """A StreamingResponse that releases its engine requests however the response ends
    (finished, client disconnect, or never started)."""

    def __init__(self, content: AsyncIterator[str], state: ServerState, streams: list[RequestStream]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._state, self._streams = state, streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self._streams:
                self._state.engine.release(stream)


def _error_response(e: APIError, state: ServerState | None = None) -> JSONResponse:
    if state is not None:
        state.metrics.http_errors.labels(str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
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


def _parse_json(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    check_document(body)
    return body


async def _read_json(request: Request, state: ServerState) -> Any:
    srv = state.settings.server
    raw = await _read_body(request, srv.max_body_bytes, srv.body_read_timeout_s)
    return await state.off_loop(lambda: _parse_json(raw)) if len(raw) > 65536 else _parse_json(raw)


def _check_auth(request: Request, state: ServerState) -> None:
    key = state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


def _encode(state: ServerState, text: str, parse_special: bool) -> list[int]:
    """Token ids of ``text``; special-token strings stay text unless ``parse_special``."""
    tok = state.tokenizer
    if parse_special or not any(s in text for s in state.special_strings):
        return list(tok.encode(text, add_special_tokens=False))
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _chat_ids(state: ServerState, messages: list[dict[str, str]], add_generation_prompt: bool = True,
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


def _prompt(state: ServerState, req: GenerationRequest) -> tuple[list[int], str | None]:
    """Token ids for the engine and the text the length predictor sees (runs on the pool)."""
    if req.kind == "chat":
        return _chat_ids(state, list(req.messages or ()))
    if isinstance(req.prompt, str):
        return _encode(state, req.prompt, req.parse_special_tokens), req.prompt
    return list(req.prompt or ()), None


def _max_tokens(state: ServerState, req: GenerationRequest, prompt_tokens: int) -> int:
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


def _sampling(state: ServerState, req: GenerationRequest, prompt_tokens: int) -> list[SamplingParams]:
    """One SamplingParams per choice (``n``); seeded choices get seed, seed+1, ..."""
    max_tokens = _max_tokens(state, req, prompt_tokens)
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


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _failed_error(item: Failed) -> APIError:
    if item.rejected:
        return APIError(item.status, item.message, type="invalid_request_error", code="request_rejected")
    headers = {"Retry-After": str(RETRY_AFTER_S)} if item.status == 503 else None
    return APIError(item.status, item.message, type="server_error",
                    code="shutting_down" if item.status == 503 else "engine_error", headers=headers)


class _Result:
    """One choice's engine outputs gathered: ids and log-probabilities."""

    def __init__(self) -> None:
        self.out: RequestOutput | None = None
        self.logprobs: list[TokenLogprobs] = []


async def _collect(request: Request, stream: RequestStream) -> _Result | None:
    """The final output, or None if the client disconnected first."""
    gone = asyncio.ensure_future(_wait_disconnect(request))
    res = _Result()
    try:
        while True:
            get = asyncio.ensure_future(stream.queue.get())
            done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return None
            item = get.result()
            if isinstance(item, Failed):
                stream.finished = True
                raise _failed_error(item)
            if isinstance(item, RequestOutput):
                if item.logprobs is not None:
                    res.logprobs.append(item.logprobs)
                if item.finished:
                    stream.finished = True
                    res.out = item
                    return res
    finally:
        gone.cancel()


def _choice(state: ServerState, req: GenerationRequest, index: int, res: _Result) -> Choice:
    out = res.out
    assert out is not None
    detok = Detokenizer(state.tokenizer, req.stop, req.skip_special_tokens)
    detok.update(out.token_ids, True)
    text, reasoning = detok.text, None
    if req.kind == "chat" and state.reasoning_parser:
        reasoning, text = ReasoningParser.split(text)
    lp = None
    if req.logprobs is not None:
        lp = (completion_logprobs(state.tokenizer, res.logprobs) if req.kind == "completion"
              else chat_logprobs(state.tokenizer, res.logprobs))
    return Choice(index, text, out.finish_reason, out.token_ids, lp, reasoning)


def _sse_error(item: Failed) -> str:
    return f"data: {json.dumps(_failed_error(item).body())}\n\n"


async def _sse(state: ServerState, req: GenerationRequest, streams: list[RequestStream], rid: str,
               prompt_tokens: int) -> AsyncIterator[str]:
    created = int(time.time())
    name = state.model_name
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        while True:
            item = await stream.queue.get()
            await merged.put((i, item))
            if isinstance(item, Failed) or (isinstance(item, RequestOutput) and item.finished):
                return

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    detoks = [Detokenizer(state.tokenizer, req.stop, req.skip_special_tokens) for _ in streams]
    parsers = [ReasoningParser() if req.kind == "chat" and state.reasoning_parser else None for _ in streams]
    pending: list[list[TokenLogprobs]] = [[] for _ in streams]
    offsets = [0] * len(streams)
    counts = [0] * len(streams)
    left = len(streams)
    try:
        if req.kind == "chat":  # OpenAI sends the role first, with empty content
            for i in range(len(streams)):
                yield f"data: {json.dumps(stream_chunk(req, rid, name, created, '', None, first=True, index=i))}\n\n"
        while left:
            i, item = await merged.get()
            stream = streams[i]
            if isinstance(item, Failed):
                stream.finished = True
                left -= 1
                yield _sse_error(item)
                continue
            if not isinstance(item, RequestOutput):
                continue
            counts[i] = len(item.token_ids)
            if item.logprobs is not None:
                pending[i].append(item.logprobs)
            text = detoks[i].update(item.token_ids, item.finished)
            reasoning = None
            if parsers[i] is not None:
                reasoning, text = parsers[i].update(text, final=item.finished)
            if item.finished:
                stream.finished = True
                left -= 1
            if text or reasoning or item.finished:
                lp = None
                if req.logprobs is not None:
                    lp = (completion_logprobs(state.tokenizer, pending[i], offsets[i]) if req.kind == "completion"
                          else chat_logprobs(state.tokenizer, pending[i]))
                    pending[i] = []
                offsets[i] += len(text)
                chunk = stream_chunk(req, rid, name, created, text, item.finish_reason if item.finished else None,
                                     index=i, reasoning=reasoning, logprobs=lp)
                yield f"data: {json.dumps(chunk)}\n\n"
        if req.include_usage:
            last = stream_chunk(req, rid, name, created, None, None, usage_doc=usage(prompt_tokens, sum(counts)))
            yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for p in pumps:
            p.cancel()


def _check_open(state: ServerState, want: int) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    if state.engine.dead or not state.engine.alive or not state.engine.healthy:
        raise APIError(503, "the engine is not running; see the server log", type="server_error",
                       code="engine_unavailable")
    waiting = state.engine.waiting_estimate()
    if waiting + want > state.engine.max_waiting:
        raise APIError(429, f"{waiting} requests are already waiting (limit {state.engine.max_waiting}); "
                       "retry later", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)})


async def _generate(request: Request, state: ServerState, kind: str) -> Response:
    _check_auth(request, state)
    body = await _read_json(request, state)
    if kind == "completion":
        req = parse_completion(body, state.vocab_size)
    else:
        req = parse_chat(body, state.vocab_size, state.template_uses_name)
    if req.model != state.model_name:
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")
    ids, text = await state.off_loop(lambda: _prompt(state, req))
    prompt_tokens = len(ids)
    params = _sampling(state, req, prompt_tokens)
    _check_open(state, len(params))
    rid = new_id(kind)
    streams = [state.engine.submit(ids, p, f"{rid}-{i}-{uuid.uuid4().hex[:6]}", text) for i, p in enumerate(params)]
    handed_over = False
    try:
        for stream in streams:
            first = await stream.queue.get()
            if isinstance(first, Failed):
                stream.finished = True
                raise _failed_error(first)
            assert isinstance(first, Accepted), f"first item of a request must be Accepted, got {first!r}"
        state.metrics.on_prompt(prompt_tokens)
        if req.stream:
            handed_over = True
            return _EngineStreamResponse(_sse(state, req, streams, rid, prompt_tokens), state, streams)
        results = []
        for stream in streams:
            res = await _collect(request, stream)
            if res is None:  # client gone: nobody to answer; release() below aborts the requests
                return Response(status_code=499)
            results.append(res)
        choices = await state.off_loop(lambda: [_choice(state, req, i, r) for i, r in enumerate(results)])
        return JSONResponse(full_response(req, rid, state.model_name, choices, prompt_tokens))
    finally:
        if not handed_over:
            for stream in streams:
                state.engine.release(stream)


def _tokenize(state: ServerState, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    allowed = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise APIError(400, f"unrecognized argument(s) {unknown[:5]}; /tokenize accepts {sorted(allowed)}",
                       param=str(unknown[0]), code="unsupported_parameter")
    _model_matches(state, body)
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
        ids, _ = _chat_ids(state, messages, flags["add_generation_prompt"])
    else:
        p = body["prompt"]
        if not isinstance(p, str):
            raise bad(f"'prompt' must be a string, got {type(p).__name__}", "prompt", "invalid_type")
        ids = _encode(state, p, flags["add_special_tokens"])
    doc: dict[str, Any] = {"count": len(ids), "max_model_len": state.context_tokens, "tokens": ids}
    if flags["return_token_strs"]:
        doc["token_strs"] = state.tokenizer.convert_ids_to_tokens(ids)
    return doc


def _detokenize(state: ServerState, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    unknown = sorted(k for k in body if k not in ("model", "tokens"))
    if unknown:
        raise APIError(400, f"unrecognized argument(s) {unknown[:5]}; /detokenize accepts ['model', 'tokens']",
                       param=str(unknown[0]), code="unsupported_parameter")
    _model_matches(state, body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("'tokens' must be a list of token ids (integers)", "tokens",
                  "missing_required_parameter" if tokens is None else "invalid_type")
    wrong = [t for t in tokens if not 0 <= t < state.vocab_size]
    if wrong:
        raise bad(f"token ids {wrong[:5]} are outside the vocabulary [0, {state.vocab_size})", "tokens")
    return {"prompt": state.tokenizer.decode(tokens, skip_special_tokens=False)}


def _model_matches(state: ServerState, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model!r:.80} does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")


def create_app(engine: LLMEngine, settings: ServeSettings, *, model_path: str | Path | None = None) -> FastAPI:
    """The app around an already-built engine (tests build the engine themselves)."""
    from odma_mlu.models.loader import load_tokenizer

    path = Path(model_path or settings.engine.model)
    tokenizer = load_tokenizer(path, engine.spec.vocab_size)
    state = ServerState(engine, settings, tokenizer, settings.server.served_model_name or path.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        log.info("serving %s (KV %d tokens, policy %s)", state.model_name, engine.policy.capacity_tokens,
                 engine.policy.name)
        yield
        # uvicorn has stopped accepting connections and waited for in-flight HTTP requests
        # (begin_drain failed any left at the deadline); this is the engine-side safety net.
        state.begin_drain(settings.server.drain_timeout_s)
        if not await state.engine.drain(min(settings.server.drain_timeout_s, 5.0)):
            log.warning("stopping the engine with %d requests in flight", state.engine.inflight)
        await state.engine.stop()
        state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="odma-mlu", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.odma = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e, state)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind, code=None), state)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal server error ({type(e).__name__})", type="server_error",
                                        code="internal_error"), state)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, state, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, state, "chat")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        _check_auth(request, state)
        body = await _read_json(request, state)
        return JSONResponse(await state.off_loop(lambda: _tokenize(state, body)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        _check_auth(request, state)
        body = await _read_json(request, state)
        return JSONResponse(await state.off_loop(lambda: _detokenize(state, body)))

    def _card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "odma-mlu",
                "max_model_len": state.context_tokens}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _check_auth(request, state)
        return JSONResponse({"object": "list", "data": [_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        _check_auth(request, state)
        if model_id != state.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return JSONResponse(_card())

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.engine.alive and state.engine.healthy and not state.draining and not state.engine.dead
        status = "ok" if ok else ("draining" if state.draining else "unhealthy")
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(openapi_document(state.model_name))

    return app
