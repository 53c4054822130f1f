"""The OpenAI-compatible server against a tiny random Qwen2, on a real loopback socket.

Checks what clients rely on: the official ``openai`` client works (completion, streamed
chat, 64 concurrent requests), greedy output equals the engine's and the ``generate`` CLI's,
no KV is left reserved afterwards, every bad input gets the right status and an OpenAI
error body without hurting the next request, a client that disconnects mid-stream is
aborted, and ``odma-mlu serve --config deploy/emulator-cpu.yaml`` starts and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from odma_mlu.config import EngineConfig, SchedulerConfig, ServerConfig
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.errors import ConfigError
from odma_mlu.predictor.simple import SimplePredictor
from odma_mlu.server.app import create_app
from odma_mlu.server.metrics import parse_metrics
from odma_mlu.server.settings import ServeSettings, load_serve_file
from odma_mlu.server.thread_server import ThreadedServer

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
MAX_NEW = 512
PROMPTS = ["the cache model serve request", "hello world of memory and bucket", "a",
           "what is the length of a contiguous slab", "power hour game line end"]


def _engine(model_dir: Path, capacity: int = 4096, max_num_seqs: int = 64) -> LLMEngine:
    sched = replace(SchedulerConfig(), max_new_tokens=MAX_NEW, max_num_seqs=max_num_seqs)
    return LLMEngine(model_dir, kv_policy="odma", backend="cpu", kv_capacity_tokens=capacity,
                     predictor=SimplePredictor(), scheduler=sched)


def _server(model_dir: Path, engine: LLMEngine, api_key: str | None = None, **server_kw: object) -> ThreadedServer:
    settings = ServeSettings(engine=EngineConfig(model=str(model_dir)),
                             server=ServerConfig(served_model_name=MODEL, **server_kw),  # type: ignore[arg-type]
                             api_key=api_key)
    return ThreadedServer(create_app(engine, settings)).start()


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path):
    server = _server(tiny_model_dir, _engine(tiny_model_dir), max_body_bytes=64 * 1024)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ref_engine(tiny_model_dir: Path) -> LLMEngine:
    return _engine(tiny_model_dir)


def _client(srv: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _reference(engine: LLMEngine, prompt: str, max_tokens: int) -> tuple[int, ...]:
    return engine.generate([prompt], SamplingParams(max_new_tokens=max_tokens))[0].token_ids


def _metrics(srv: ThreadedServer) -> dict[str, float]:
    return parse_metrics(httpx.get(srv.base_url + "/metrics").text)


def _assert_kv_free(srv: ThreadedServer) -> None:
    deadline = time.monotonic() + 10
    while True:
        m = _metrics(srv)
        if m["odma_kv_reserved_tokens"] == 0 and m["odma_requests_running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert m["odma_kv_reserved_tokens"] == 0 and m["odma_kv_live_reservations"] == 0, m
    assert m["odma_requests_running"] == 0 and m["odma_requests_waiting"] == 0, m
    state = srv.app.state.odma

    def check(engine: LLMEngine) -> tuple[int, int]:
        engine.policy.check_integrity()
        return engine.policy.reserved_tokens(), engine.policy.num_live()

    assert srv.run_on_loop(lambda: state.engine.call(check)) == (0, 0)
    assert state.engine.inflight == 0


# -- happy paths ---------------------------------------------------------------------------------
def test_completion_matches_engine_and_generate_cli(srv: ThreadedServer, ref_engine: LLMEngine,
                                                    tiny_model_dir: Path, tmp_path: Path) -> None:
    prompt, n = PROMPTS[1], 12
    r = _client(srv).completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                        extra_body={"return_token_ids": True})
    ref = _reference(ref_engine, prompt, n)
    choice = r.choices[0]
    assert tuple(choice.model_extra["token_ids"]) == ref
    assert choice.text == ref_engine.decode(ref)
    assert r.usage.completion_tokens == len(ref)
    assert r.usage.prompt_tokens == len(ref_engine.tokenizer.encode(prompt, add_special_tokens=False))
    # The CLI (static policy: it needs no predictor; tokens never depend on the policy).
    out = tmp_path / "gen.json"
    subprocess.run([sys.executable, "-m", "odma_mlu.cli", "generate", "--model", str(tiny_model_dir), "--prompt",
                    prompt, "--max-new-tokens", str(n), "--kv-policy", "static", "--backend", "cpu", "--json",
                    str(out)], check=True, capture_output=True, timeout=120)
    assert tuple(json.loads(out.read_text())["token_ids"]) == ref


def test_streamed_chat(srv: ThreadedServer, ref_engine: LLMEngine) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello cache"}]
    client = _client(srv)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant" and len(finals) == 1
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    templated = ref_engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = _reference(ref_engine, templated, 20)
    assert text == ref_engine.decode(ref)
    assert chunks[-1].usage.completion_tokens == len(ref)
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert full.choices[0].message.content == text and full.usage == chunks[-1].usage
    # The raw stream ends with the [DONE] sentinel.
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", timeout=30,
                      json={"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"


def test_64_concurrent_requests(srv: ThreadedServer, ref_engine: LLMEngine) -> None:
    jobs = [(PROMPTS[i % len(PROMPTS)] + f" {i}", 4 + i % 29, i % 2 == 0) for i in range(64)]

    async def one(client: openai.AsyncOpenAI, prompt: str, n: int, stream: bool) -> str:
        if not stream:
            r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
            return r.choices[0].text
        parts = []
        async for c in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                       stream=True):
            parts.append(c.choices[0].text)
        return "".join(parts)

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, p, n, s) for p, n, s in jobs))

    texts = asyncio.run(main())
    refs = ref_engine.generate([p for p, _, _ in jobs], [SamplingParams(max_new_tokens=n) for _, n, _ in jobs])
    assert texts == [ref_engine.decode(r.token_ids) for r in refs]
    _assert_kv_free(srv)


# -- bad inputs ------------------------------------------------------------------------------------
BAD = [
    ("completions", b"{not json", 400, "invalid_json", None),
    ("completions", b"[1, 2]", 400, "invalid_type", None),
    ("completions", {"prompt": "hi"}, 400, "missing_required_parameter", "model"),
    ("completions", {"model": MODEL}, 400, "missing_required_parameter", "prompt"),
    ("completions", {"model": MODEL, "prompt": 5}, 400, "invalid_type", "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "invalid_type", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": True}, 400, "invalid_type", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "invalid_value", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000}, 400, "context_length_exceeded",
     "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1000}, 400, "invalid_value", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi " * 2100}, 400, "context_length_exceeded", "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "invalid_value", "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "invalid_value", "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 17}, 400, "invalid_value", "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "invalid_value", "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "invalid_type", "stream"),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found", "model"),
    ("completions", {"model": MODEL, "prompt": "x" * 70_000}, 413, "request_too_large", None),
    ("chat/completions", {"model": MODEL, "messages": "hi"}, 400, "invalid_type", "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "invalid_value", "messages[0].role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400, "invalid_type",
     "messages[0].content"),
    ("chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model_not_found", "model"),
]


@pytest.mark.parametrize("route,body,status,code,param", BAD, ids=[f"{i}-{b[2]}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_then_next_request_works(srv: ThreadedServer, route: str, body: object, status: int, code: str,
                                           param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{srv.base_url}/v1/{route}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["param"] == param, err
    ok = httpx.post(f"{srv.base_url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_errors(srv: ThreadedServer) -> None:
    client = _client(srv)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(srv.base_url + "/health").json() == {"status": "ok"}
    assert httpx.get(srv.base_url + "/v1/nothing").status_code == 404


def test_client_disconnect_mid_stream_aborts(srv: ThreadedServer) -> None:
    before = _metrics(srv).get('odma_requests_total{finish_reason="abort"}', 0.0)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=30) as resp:
        got = 0
        for line in resp.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while _metrics(srv).get('odma_requests_total{finish_reason="abort"}', 0.0) <= before:
        assert time.monotonic() < deadline, "the disconnected request was not aborted"
        time.sleep(0.05)
    _assert_kv_free(srv)


# -- security and back-pressure ------------------------------------------------------------------
def test_api_key_and_backpressure(tiny_model_dir: Path) -> None:
    # One running sequence at a time and at most 2 waiting: a burst of 12 must see 429s.
    server = _server(tiny_model_dir, _engine(tiny_model_dir, max_num_seqs=1), max_waiting_requests=2,
                     api_key="s3cret")
    try:
        url, auth = server.base_url, {"Authorization": "Bearer s3cret"}
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        wrong = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60, headers=auth) as c:
                long = {"model": MODEL, "prompt": "hi", "max_tokens": 128, "ignore_eos": True}
                return await asyncio.gather(*(c.post(url + "/v1/completions", json=long) for _ in range(12)))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        # The bound counts a request as waiting until the engine reports it running, so
        # at least the first two are served and the rest of the burst is refused, not queued.
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        refused = next(r for r in responses if r.status_code == 429).json()["error"]
        assert refused["type"] == "rate_limit_error" and refused["code"] == "queue_full"
        ok = _client_with(server, "s3cret").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert ok.choices[0].finish_reason in ("length", "stop")
        _assert_kv_free(server)
    finally:
        server.stop()


def _client_with(server: ThreadedServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def test_serve_file_rejects_unknown_keys(tmp_path: Path) -> None:
    engine, server = load_serve_file(ROOT / "deploy" / "emulator-cpu.yaml")
    assert engine.backend == "emulated" and server.served_model_name == "tiny-qwen2"
    engine, server = load_serve_file(ROOT / "deploy" / "mlu370-x4" / "deepseek-r1-distill-qwen-7b.yaml")
    assert engine.dtype == "float16" and engine.cache.policy == "odma" and engine.profile
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nserver:\n  max_waiting: 3\n")
    with pytest.raises(ConfigError, match="max_waiting"):
        load_serve_file(bad)


# -- the command line on a fresh checkout ---------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_emulator_config_starts_and_drains_on_sigterm(tmp_path: Path) -> None:
    from tool_module import load_tool

    tool = load_tool("make_tiny_model")
    assert tool.main([str(tmp_path / "out" / "tiny-qwen2")]) == 0
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "ODMA_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "odma_mlu.cli", "serve", "--config",
                             str(ROOT / "deploy" / "emulator-cpu.yaml"), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)
        # SIGTERM while a stream is in flight: it must finish, then the process exits 0.
        body = {"model": "tiny-qwen2", "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_client_disconnect_before_a_plain_response_aborts(srv: ThreadedServer) -> None:
    before = _metrics(srv).get('odma_requests_total{finish_reason="abort"}', 0.0)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(srv.base_url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.15))
    deadline = time.monotonic() + 10
    while _metrics(srv).get('odma_requests_total{finish_reason="abort"}', 0.0) <= before:
        assert time.monotonic() < deadline, "the abandoned request was not aborted"
        time.sleep(0.05)
    _assert_kv_free(srv)


def test_metrics_report_odma_safety_pool_and_hold(srv: ThreadedServer) -> None:
    """The safety pool's size, the room held ahead of growth and the runs moved out of a
    growing request's way come from the policy's stats (a key mismatch once left the safety
    pool gauges at 0)."""
    _client(srv).completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_NEW, temperature=0)
    m = _metrics(srv)
    policy = srv.app.state.odma.engine.engine.policy
    assert policy.safety is not None
    assert m["odma_safety_pool_tokens"] == policy.safety.capacity_tokens * policy.unit > 0
    # No device profile on this CPU engine: the room held ahead is chunk_tokens, and no run moves.
    assert m["odma_hold_ahead_tokens"] == policy.config.chunk_tokens
    assert m["odma_moved_runs_total"] == policy.moved_runs == 0
    policy.moved_runs = 3  # as if three runs had moved: the counter follows the policy's stats
    _client(srv).completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=2, temperature=0)
    assert _metrics(srv)["odma_moved_runs_total"] == 3
    _assert_kv_free(srv)
