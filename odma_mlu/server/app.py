"""The FastAPI application: OpenAI-compatible routes, /health and /metrics.

Handlers run on the event loop and never call the engine: they validate, tokenize (to check
the context and count usage), then talk to the engine thread through ``AsyncEngine``. Each
request's stream is released exactly once, in ``finally`` blocks that also run when the
client disconnects, so an abandoned request is aborted and its KV freed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from odma_mlu.engine.llm_engine import LLMEngine, RequestOutput
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.errors import RequestRejected
from odma_mlu.server.async_engine import Accepted, AsyncEngine, Failed, RequestStream
from odma_mlu.server.metrics import CONTENT_TYPE, ServerMetrics
from odma_mlu.server.protocol import (APIError, GenerationRequest, bad, full_response, new_id, parse_chat,
                                      parse_completion, stream_chunk, usage)
from odma_mlu.server.settings import ServeSettings
from odma_mlu.server.streaming import Detokenizer

log = logging.getLogger("odma_mlu.server")


class ServerState:
    """Everything the handlers share; created once per app."""

    def __init__(self, engine: LLMEngine, settings: ServeSettings, tokenizer: Any, model_name: str) -> None:
        self.settings = settings
        self.tokenizer = tokenizer  # event-loop copy; the engine thread keeps engine.tokenizer
        self.model_name = model_name
        self.context_tokens = engine.spec.max_position_embeddings
        self.max_new_tokens = engine.scheduler.config.max_new_tokens
        self.vocab_size = engine.spec.vocab_size
        self.engine = AsyncEngine(engine, max_waiting=settings.server.max_waiting_requests)
        self.metrics = ServerMetrics(lambda: self.engine.snapshot, engine.policy.name)
        self.engine._on_finish = self.metrics.on_finish
        self.draining = False
        self.created = int(time.time())


class _EngineStreamResponse(StreamingResponse):
    """A StreamingResponse that releases its engine request however the response ends
    (finished, client disconnect, or never started)."""

    def __init__(self, content: AsyncIterator[str], state: ServerState, stream: RequestStream) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._state, self._stream = state, stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._state.engine.release(self._stream)


def _error_response(e: APIError, state: ServerState | None = None) -> JSONResponse:
    if state is not None:
        state.metrics.http_errors.labels(str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing oversized bodies before reading them whole."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _check_auth(request: Request, state: ServerState) -> None:
    key = state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


def _prompt(state: ServerState, req: GenerationRequest) -> tuple[str | tuple[int, ...], int]:
    """What the engine gets (text keeps the predictor's text features) and its token count."""
    tok = state.tokenizer
    if req.kind == "chat":
        try:
            text = tok.apply_chat_template(list(req.messages or ()), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template error is the client's messages' fault
            raise bad(f"the model's chat template rejected the messages: {e}", "messages") from None
        return text, len(tok.encode(text, add_special_tokens=False))
    if isinstance(req.prompt, str):
        return req.prompt, len(tok.encode(req.prompt, add_special_tokens=False))
    ids = tuple(req.prompt or ())
    wrong = [t for t in ids if not 0 <= t < state.vocab_size]
    if wrong:
        raise bad(f"prompt token ids {wrong[:5]} are outside the vocabulary [0, {state.vocab_size})", "prompt")
    return ids, len(ids)


def _sampling(state: ServerState, req: GenerationRequest, prompt_tokens: int) -> SamplingParams:
    param = "messages" if req.kind == "chat" else "prompt"
    room = state.context_tokens - prompt_tokens
    if room <= 0:
        raise bad(f"the prompt is {prompt_tokens} tokens; the model's context is {state.context_tokens} tokens "
                  "and must leave room for at least one generated token", param, "context_length_exceeded")
    if req.max_tokens is None:
        default = state.settings.server.default_max_tokens if req.kind == "completion" else state.max_new_tokens
        max_tokens = min(default, room, state.max_new_tokens)
    else:
        max_tokens = req.max_tokens
        if prompt_tokens + max_tokens > state.context_tokens:
            raise bad(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {prompt_tokens + max_tokens} "
                      f"exceeds the model's context of {state.context_tokens} tokens; lower max_tokens to at "
                      f"most {room}", "max_tokens", "context_length_exceeded")
        if max_tokens > state.max_new_tokens:
            raise bad(f"max_tokens {max_tokens} exceeds this server's limit of {state.max_new_tokens} generated "
                      "tokens per request (scheduler.max_new_tokens)", "max_tokens")
    try:
        return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                              stop=req.stop, max_new_tokens=max_tokens, ignore_eos=req.ignore_eos)
    except RequestRejected as e:
        raise bad(str(e)) from None


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _raise_failed(item: Failed) -> None:
    raise APIError(item.status, item.message,
                   type="invalid_request_error" if item.rejected else "server_error",
                   code="request_rejected" if item.rejected else "engine_error")


async def _collect(request: Request, stream: RequestStream) -> RequestOutput | None:
    """The final output, or None if the client disconnected first."""
    gone = asyncio.ensure_future(_wait_disconnect(request))
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
                _raise_failed(item)
            if isinstance(item, RequestOutput) and item.finished:
                stream.finished = True
                return item
    finally:
        gone.cancel()


async def _sse(state: ServerState, req: GenerationRequest, stream: RequestStream, rid: str,
               prompt_tokens: int) -> AsyncIterator[str]:
    created = int(time.time())
    detok = Detokenizer(state.tokenizer, req.stop)
    name = state.model_name
    if req.kind == "chat":  # OpenAI sends the role first, with empty content
        yield f"data: {json.dumps(stream_chunk(req, rid, name, created, '', None, first=True))}\n\n"
    n = 0
    while True:
        item = await stream.queue.get()
        if isinstance(item, Failed):
            stream.finished = True
            err = APIError(item.status, item.message, type="server_error", code="engine_error")
            yield f"data: {json.dumps(err.body())}\n\n"
            break
        if not isinstance(item, RequestOutput):
            continue
        n = len(item.token_ids)
        text = detok.update(item.token_ids, item.finished)
        if item.finished:
            stream.finished = True
        if text or item.finished:
            chunk = stream_chunk(req, rid, name, created, text, item.finish_reason if item.finished else None)
            yield f"data: {json.dumps(chunk)}\n\n"
        if item.finished:
            if req.include_usage:
                last = stream_chunk(req, rid, name, created, None, None, usage_doc=usage(prompt_tokens, n))
                yield f"data: {json.dumps(last)}\n\n"
            break
    yield "data: [DONE]\n\n"


async def _generate(request: Request, state: ServerState, kind: str) -> Response:
    _check_auth(request, state)
    body = await _read_json(request, state.settings.server.max_body_bytes)
    req = parse_completion(body) if kind == "completion" else parse_chat(body)
    if req.model != state.model_name:
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")
    prompt, prompt_tokens = _prompt(state, req)
    params = _sampling(state, req, prompt_tokens)
    if state.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if not state.engine.alive or not state.engine.healthy:
        raise APIError(503, "the engine is not running; see the server log", type="server_error",
                       code="engine_unavailable")
    waiting = state.engine.waiting_estimate()
    if waiting >= state.engine.max_waiting:
        raise APIError(429, f"{waiting} requests are already waiting (limit {state.engine.max_waiting}); "
                       "retry later", type="rate_limit_error", code="queue_full")
    rid = new_id(kind)
    stream = state.engine.submit(prompt, params, f"{rid}-{uuid.uuid4().hex[:6]}")
    handed_over = False
    try:
        first = await stream.queue.get()
        if isinstance(first, Failed):
            stream.finished = True
            _raise_failed(first)
        assert isinstance(first, Accepted), f"first item of a request must be Accepted, got {first!r}"
        state.metrics.prompt_tokens.inc(prompt_tokens)
        if req.stream:
            handed_over = True
            return _EngineStreamResponse(_sse(state, req, stream, rid, prompt_tokens), state, stream)
        out = await _collect(request, stream)
        if out is None:  # client gone: nobody to answer; release() below aborts the request
            return Response(status_code=499)
        detok = Detokenizer(state.tokenizer, req.stop)
        detok.update(out.token_ids, True)
        return JSONResponse(full_response(req, rid, state.model_name, detok.text, out.finish_reason, prompt_tokens,
                                          out.token_ids))
    finally:
        if not handed_over:
            state.engine.release(stream)


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
        # uvicorn has stopped accepting connections and waited for in-flight HTTP requests;
        # this is the engine-side safety net before the thread stops.
        state.draining = True
        if not await state.engine.drain(settings.server.drain_timeout_s):
            log.warning("drain timed out with %d requests in flight", state.engine.inflight)
        await state.engine.stop()

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
        ok = state.engine.alive and state.engine.healthy and not state.draining
        return JSONResponse({"status": "ok" if ok else ("draining" if state.draining else "unhealthy")},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app
