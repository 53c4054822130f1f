"""Issue 13 "What was seen": each hostile or careless input, then the next request is served
and /metrics shows no KV held.

Engine-killing values, a request that fails inside a step, the engine loop dying (health
503 and a non-zero exit), slow bodies, megabyte prompts tokenized off the event loop, lone
surrogates, deep JSON, the drain deadline, and Retry-After on 429/503.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.errors import RequestRejected
from odma_mlu.server.thread_server import ThreadedServer
from test_server import MODEL, _assert_kv_free, _engine, _metrics, _server


@pytest.fixture(scope="module")
def srv(tiny_model_dir: Path):
    server = _server(tiny_model_dir, _engine(tiny_model_dir), max_body_bytes=4 << 20, body_read_timeout_s=1.0)
    yield server
    server.stop()


def _next_request_ok(srv: ThreadedServer) -> None:
    """The server answers the next request, and afterwards no KV is held."""
    r = httpx.post(srv.base_url + "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(srv.base_url + "/health").status_code == 200
    _assert_kv_free(srv)


def _post(srv: ThreadedServer, body: object, route: str = "completions", **kw: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{srv.base_url}/v1/{route}", content=content, headers={"content-type": "application/json"},
                      timeout=60, **kw)  # type: ignore[arg-type]


# -- engine-killing values -----------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("top_k", 2**70), ("seed", 2**70), ("seed", -(2**70)),
                                         ("max_tokens", 2**70), ("min_tokens", 2**70), ("n", 2**70),
                                         ("stop_token_ids", [2**70]), ("logprobs", 2**70),
                                         ("temperature", 1e308 * 10), ("top_k", 1.5)])
def test_out_of_range_integers_are_400_and_engine_keeps_serving(srv: ThreadedServer, field: str,
                                                                value: object) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, field: value}
    raw = json.dumps(body).replace("Infinity", "1e999").encode()
    r = _post(srv, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error", err
    _next_request_ok(srv)


def test_engine_rejects_bad_seed_before_queueing(tiny_model_dir: Path) -> None:
    """A seed torch cannot take fails in SamplingParams, before the scheduler sees anything."""
    with pytest.raises(RequestRejected, match="seed must be an integer in"):
        SamplingParams(temperature=1.0, seed=2**70)
    eng = _engine(tiny_model_dir)
    with pytest.raises(RequestRejected, match="params must be SamplingParams"):
        eng.add_request("hello", {"seed": 1})  # type: ignore[arg-type]
    assert not eng.has_unfinished() and eng.policy.reserved_tokens() == 0
    assert eng.generate(["hello"], SamplingParams(max_new_tokens=3))[0].finished


def test_a_request_that_fails_in_a_step_fails_alone(srv: ThreadedServer) -> None:
    """A failure tied to one request inside engine.step() (here: its stop check) ends that
    request with a 500; a request running beside it is unaffected and the engine stays up."""
    state = srv.app.state.odma
    engine: LLMEngine = state.engine.engine
    original = engine._advance
    poison = "poison-me"

    def advance(s, lv, tok, lp):  # type: ignore[no-untyped-def]
        if lv.params.stop == (poison,):
            raise ValueError("boom in the stop check")
        return original(s, lv, tok, lp)

    engine._advance = advance  # type: ignore[method-assign]
    try:
        async def both() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                good = {"model": MODEL, "prompt": "hello world", "max_tokens": 40, "ignore_eos": True}
                bad = {"model": MODEL, "prompt": "hello world", "max_tokens": 40, "stop": [poison]}
                return await asyncio.gather(c.post(srv.base_url + "/v1/completions", json=good),
                                            c.post(srv.base_url + "/v1/completions", json=bad))

        ok, failed = asyncio.run(both())
    finally:
        engine._advance = original  # type: ignore[method-assign]
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 40, ok.text
    assert failed.status_code == 500 and "boom in the stop check" in failed.json()["error"]["message"]
    assert failed.json()["error"]["code"] == "engine_error"
    assert state.engine.alive and not state.engine.dead
    _next_request_ok(srv)


def test_engine_death_fails_health_and_exits_nonzero(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If engine.step() itself raises, clients get 503, /health 503, and `odma-mlu serve`
    returns a non-zero status (systemd's Restart=on-failure fires)."""
    from odma_mlu import cli
    from odma_mlu.server import commands

    real_build = commands.build_engine

    def build(settings):  # type: ignore[no-untyped-def]
        eng = real_build(settings)

        def broken_schedule():  # type: ignore[no-untyped-def]
            raise RuntimeError("allocator invariant broken")

        eng.scheduler.schedule = broken_schedule
        return eng

    monkeypatch.setattr(commands, "build_engine", build)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(cli.main(["serve", "--model", str(tiny_model_dir), "--backend",
                                                             "cpu", "--port", str(port)])), daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.1)
    r = httpx.post(url + "/v1/completions", json={"model": tiny_model_dir.name, "prompt": "hi", "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 503 and r.json()["error"]["message"], r.text
    t.join(60)
    assert not t.is_alive(), "the server did not exit after the engine died"
    assert rc == [commands.EXIT_ENGINE_DIED]


# -- hangs ----------------------------------------------------------------------------------------
def test_slow_body_is_408_and_server_keeps_serving(srv: ThreadedServer) -> None:
    host, port = "127.0.0.1", srv.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        t0 = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        waited = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert waited < 5, waited
    _next_request_ok(srv)


# -- stalls ---------------------------------------------------------------------------------------
def test_megabyte_prompts_do_not_stall_health(srv: ThreadedServer) -> None:
    """Three ~1 MB prompts are tokenized off the event loop: /health stays responsive."""
    big = "hello cache model serve " * 42_000  # ~1 MB

    async def run() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(timeout=120) as c:
            posts = [asyncio.ensure_future(c.post(srv.base_url + "/v1/completions",
                                                  json={"model": MODEL, "prompt": big, "max_tokens": 1}))
                     for _ in range(3)]
            await asyncio.sleep(0.3)  # bodies sent, tokenization running
            worst = 0.0
            while not all(p.done() for p in posts):
                t0 = time.perf_counter()
                h = await c.get(srv.base_url + "/health")
                assert h.status_code == 200
                worst = max(worst, time.perf_counter() - t0)
                await asyncio.sleep(0.05)
            return [p.result() for p in posts], worst

    responses, worst = asyncio.run(run())
    for r in responses:  # far over the tiny model's 2048-token context: a named 400
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert worst < 1.0, f"/health took {worst:.2f} s while prompts were tokenized"
    _next_request_ok(srv)


# -- 500 where 400 is due -----------------------------------------------------------------------
@pytest.mark.parametrize("raw,param", [
    (b'{"model": "tiny", "prompt": "ab\\ud800cd", "max_tokens": 2}', "prompt"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
    (b'{"model": "tiny", "prompt": "hi", "stop": ["\\ud83d"]}', "stop[0]"),
])
def test_lone_surrogates_are_400(srv: ThreadedServer, raw: bytes, param: str) -> None:
    route = "chat/completions" if b"messages" in raw else "completions"
    r = _post(srv, raw, route)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_string" and r.json()["error"]["param"] == param
    _next_request_ok(srv)


@pytest.mark.parametrize("raw", [b"[" * 200_000 + b"]" * 200_000,
                                 b'{"model": "tiny", "prompt": "hi", "user": ' + b"[" * 100 + b"]" * 100 + b"}",
                                 b'{"a": ' * 5000 + b"1" + b"}" * 5000])
def test_deeply_nested_json_is_400(srv: ThreadedServer, raw: bytes) -> None:
    r = _post(srv, raw)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    _next_request_ok(srv)


def test_drain_deadline_answers_plain_and_streamed_requests(tiny_model_dir: Path) -> None:
    """Past the drain deadline, a plain request gets a JSON 503 with Retry-After and a stream
    an error event followed by [DONE]; new requests are refused while draining."""
    server = _server(tiny_model_dir, _engine(tiny_model_dir))
    try:
        state = server.app.state.odma
        long = {"model": MODEL, "prompt": "hello", "max_tokens": 500, "ignore_eos": True}
        slow = state.engine.engine
        original = slow.step

        def slow_step():  # type: ignore[no-untyped-def]
            time.sleep(0.01)
            return original()

        slow.step = slow_step  # 500 tokens take > 5 s: the drain deadline (0.5 s) comes first

        async def run() -> tuple[httpx.Response, list[str], httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                plain = asyncio.ensure_future(c.post(server.base_url + "/v1/completions", json=long))
                lines: list[str] = []

                async def stream() -> None:
                    async with c.stream("POST", server.base_url + "/v1/completions",
                                        json={**long, "stream": True}) as r:
                        async for line in r.aiter_lines():
                            if line:
                                lines.append(line)

                streamed = asyncio.ensure_future(stream())
                await asyncio.sleep(0.5)
                server.run_on_loop(lambda: _begin(state))
                refused = await c.post(server.base_url + "/v1/completions", json=long)
                await streamed
                return await plain, lines, refused

        async def _begin(st):  # type: ignore[no-untyped-def]
            st.begin_drain(0.5)

        plain, lines, refused = asyncio.run(run())
        assert plain.status_code == 503 and plain.headers.get("retry-after"), plain.text
        assert "drain timeout" in plain.json()["error"]["message"]
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "shutting_down", lines[-3:]
        assert httpx.get(server.base_url + "/health").status_code == 503
        m = _metrics(server)
        deadline = time.monotonic() + 10
        while m["odma_kv_reserved_tokens"] and time.monotonic() < deadline:
            time.sleep(0.05)
            m = _metrics(server)
        assert m["odma_kv_reserved_tokens"] == 0 and m["odma_requests_running"] == 0
        slow.step = original
    finally:
        server.stop()


def test_429_and_503_carry_retry_after(tiny_model_dir: Path) -> None:
    server = _server(tiny_model_dir, _engine(tiny_model_dir, max_num_seqs=1), max_waiting_requests=1)
    try:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                body = {"model": MODEL, "prompt": "hi", "max_tokens": 64, "ignore_eos": True}
                return await asyncio.gather(*(c.post(server.base_url + "/v1/completions", json=body)
                                              for _ in range(8)))

        responses = asyncio.run(burst())
        refused = [r for r in responses if r.status_code == 429]
        assert refused and all(r.headers.get("retry-after") == "1" for r in refused)
        _assert_kv_free(server)
    finally:
        server.stop()


def test_tokenize_endpoint_errors_are_400(srv: ThreadedServer) -> None:
    for body in ({"prompt": 5}, {"tokens": [10**12]}, {"prompt": "a", "messages": []}, [1]):
        route = "detokenize" if isinstance(body, dict) and "tokens" in body else "tokenize"
        r = httpx.post(f"{srv.base_url}/{route}", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] != "x", r.text
    _next_request_ok(srv)


def test_engine_config_zero_seqs_is_refused() -> None:
    """``scheduler.max_num_seqs: 0`` used to be accepted and every request waited forever."""
    from odma_mlu.config import SchedulerConfig
    from odma_mlu.errors import ConfigError

    with pytest.raises(ConfigError, match=r"scheduler.max_num_seqs = 0 is out of range"):
        replace(SchedulerConfig(), max_num_seqs=0)


def test_sub_second_drain_timeout_is_not_forever(tmp_path: Path) -> None:
    """`drain_timeout_s: 0.5` used to become uvicorn's "no limit" (int(0.5) == 0): now SIGTERM
    ends a long stream after 0.5 s with an error event and [DONE], and the process exits 0."""
    import signal
    import sys

    from serve_process import start_server

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tools"))
    from make_tiny_model import main as make_tiny

    assert make_tiny([str(tmp_path / "out" / "tiny-qwen2")]) == 0
    cfg = (root / "deploy" / "emulator-cpu.yaml").read_text().replace("drain_timeout_s: 30", "drain_timeout_s: 0.5")
    assert "drain_timeout_s: 0.5" in cfg
    (tmp_path / "serve.yaml").write_text(cfg)
    proc, url = start_server("serve.yaml", tmp_path)
    try:
        body = {"model": "tiny-qwen2", "prompt": "hello", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data: "))
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in lines if ln]
        assert time.monotonic() - t0 < 15
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
