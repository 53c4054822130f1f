"""The FastAPI application: OpenAI-compatible routes, /tokenize, /detokenize, /health, /metrics.

Handlers run on the event loop and never call the engine: they read the body (bounded in
size and time) and validate every field (``inputs.py``, ``protocol.py``), tokenize on a
small thread pool (a megabyte prompt must not stall ``/health`` and every stream), then talk
to the engine thread through ``AsyncEngine`` (shared state: ``state.py``). Each request's stream is released exactly once, in
``finally`` blocks that also run when the client disconnects, so an abandoned request is
aborted and its KV freed.

Drain (SIGTERM): ``begin_drain`` refuses new requests with 503 and gives in-flight ones
``server.drain_timeout_s``; at the deadline the engine fails what is left, and those
clients get a JSON 503 (plain requests) or an error event followed by ``[DONE]`` (streams)
before uvicorn closes the connections.
"""

from __future__ import annotations

import asyncio
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
from odma_mlu.engine.sampler import TokenLogprobs
from odma_mlu.server.async_engine import Accepted, Failed, RequestStream
from odma_mlu.server.metrics import CONTENT_TYPE
from odma_mlu.server.openapi import openapi_document
from odma_mlu.server.inputs import (check_auth, detokenize_body, prompt_ids_of, read_json, sampling_params_for,
                                    tokenize_body)
from odma_mlu.server.protocol import (APIError, Choice, GenerationRequest, full_response, new_id, parse_chat,
                                      parse_completion, stream_chunk, usage)
from odma_mlu.server.settings import ServeSettings
from odma_mlu.server.state import RETRY_AFTER_S, ServerState
from odma_mlu.server.streaming import Detokenizer, ReasoningParser, chat_logprobs, completion_logprobs

log = logging.getLogger("odma_mlu.server")

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
    check_auth(request, state)
    body = await read_json(request, state)
    if kind == "completion":
        req = parse_completion(body, state.vocab_size)
    else:
        req = parse_chat(body, state.vocab_size, state.template_uses_name)
    if req.model != state.model_name:
        raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")
    ids, text = await state.off_loop(lambda: prompt_ids_of(state, req))
    prompt_tokens = len(ids)
    params = sampling_params_for(state, req, prompt_tokens)
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


def create_app(engine: LLMEngine, settings: ServeSettings, *, model_path: str | Path | None = None) -> FastAPI:
    """The app around an already-built engine (tests build the engine themselves)."""
    from odma_mlu.models.loader import load_tokenizer

    path = Path(model_path or settings.engine.model)
    tokenizer = load_tokenizer(path, engine.spec.vocab_size)
    state = ServerState(engine, settings, tokenizer, settings.server.served_model_name or path.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        swap = engine.scheduler.swap_capacity_tokens
        log.info("serving %s (KV %d tokens, policy %s, %s)", state.model_name, engine.policy.capacity_tokens,
                 engine.policy.name, f"preemptions swap to host memory for up to {swap} tokens" if swap
                 else "preemptions recompute (no swap space)")
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
        check_auth(request, state)
        body = await read_json(request, state)
        return JSONResponse(await state.off_loop(lambda: tokenize_body(state, body)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        check_auth(request, state)
        body = await read_json(request, state)
        return JSONResponse(await state.off_loop(lambda: detokenize_body(state, body)))

    def _card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "odma-mlu",
                "max_model_len": state.context_tokens}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_auth(request, state)
        return JSONResponse({"object": "list", "data": [_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        check_auth(request, state)
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
