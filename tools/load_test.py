"""Bounded load test of an odma-mlu server on loopback: requests/s, latency, nothing lost.

Either points at a running server (``--url``, loopback only) or starts one in-process on a
free loopback port (``--config`` / ``--model``). Sends ``--requests`` completions with at
most ``--concurrency`` in flight, stops issuing new ones after ``--max-seconds``, and
reports requests/s, p50/p99 latency, p50 time to first token (streamed requests), and
``lost``: requests that got neither a complete answer nor an explicit refusal (429/503).
Afterwards /metrics must show no request running and no KV reserved::

    python tools/make_tiny_model.py out/tiny-qwen2
    python tools/load_test.py --config deploy/emulator-cpu.yaml --requests 400 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_REQUESTS = 20_000
MAX_SECONDS = 600.0
WORDS = "the cache model serve request hello world of memory and bucket token page block slab".split()


def _loopback_url(url: str) -> str:
    host = urlparse(url).hostname or ""
    ok = host == "localhost"
    try:
        ok = ok or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not ok:
        raise SystemExit(f"--url {url}: this tool only targets loopback servers (127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _one(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> tuple[str, float, float | None]:
    """('ok' | 'refused' | 'lost', latency_s, ttft_s)."""
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post(url, json=body)
            if r.status_code in (429, 503):
                return "refused", time.perf_counter() - t0, None
            ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
            return ("ok" if ok else "lost"), time.perf_counter() - t0, None
        ttft, finished, done = None, False, False
        async with client.stream("POST", url, json={**body, "stream": True}) as r:
            if r.status_code in (429, 503):
                return "refused", time.perf_counter() - t0, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                doc = json.loads(line[6:])
                if ttft is None and doc.get("choices") and doc["choices"][0].get("text"):
                    ttft = time.perf_counter() - t0
                if doc.get("choices") and doc["choices"][0].get("finish_reason"):
                    finished = True
        return ("ok" if finished and done else "lost"), time.perf_counter() - t0, ttft
    except (httpx.HTTPError, ValueError, KeyError):
        return "lost", time.perf_counter() - t0, None


async def run(base: str, model: str, n: int, concurrency: int, max_tokens: int, max_seconds: float,
              stream_every: int, api_key: str | None) -> dict:
    url = base + "/v1/completions"
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[tuple[str, float, float | None]] = []
    deadline = time.perf_counter() + max_seconds
    skipped = 0

    async def task(i: int, client: httpx.AsyncClient) -> None:
        nonlocal skipped
        async with sem:
            if time.perf_counter() > deadline:
                skipped += 1
                return
            prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 40))
            body = {"model": model, "prompt": prompt, "max_tokens": 1 + (i * 7) % max_tokens, "temperature": 0,
                    "ignore_eos": True}
            results.append(await _one(client, url, body, stream_every > 0 and i % stream_every == 0))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=max_seconds + 60, limits=limits, headers=headers) as client:
        await asyncio.gather(*(task(i, client) for i in range(n)))
        makespan = time.perf_counter() - t0
        metrics = (await client.get(base + "/metrics")).text
    from odma_mlu.server.metrics import parse_metrics

    m = parse_metrics(metrics)
    lat = [r[1] for r in results if r[0] == "ok"]
    ttft = [r[2] for r in results if r[0] == "ok" and r[2] is not None]
    done = sum(r[0] == "ok" for r in results)
    return {"requests": n, "sent": len(results), "not_sent_time_limit": skipped, "completed": done,
            "refused": sum(r[0] == "refused" for r in results), "lost": sum(r[0] == "lost" for r in results),
            "concurrency": concurrency, "makespan_s": makespan, "rps": done / makespan if makespan else 0.0,
            "latency_p50_s": _pct(lat, 0.5), "latency_p99_s": _pct(lat, 0.99), "ttft_p50_s": _pct(ttft, 0.5),
            "generated_tokens": m.get("odma_generation_tokens_total", float("nan")),
            "server_after": {k: m.get(f"odma_{k}") for k in ("requests_running", "requests_waiting",
                                                             "kv_reserved_tokens", "kv_live_reservations",
                                                             "preemptions_total", "overflows_total",
                                                             "migrations_total", "reservation_efficiency")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    src.add_argument("--config", help="start an in-process server from this serve YAML")
    src.add_argument("--model", help="start an in-process server on this model folder (cpu)")
    p.add_argument("--served-model", default=None, help="model name to request (default: ask /v1/models)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop issuing requests after this long")
    p.add_argument("--stream-every", type=int, default=4, help="every k-th request streams (0: none)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", default=None, metavar="OUT")
    ns = p.parse_args(argv)
    if not 1 <= ns.requests <= MAX_REQUESTS or not 1 <= ns.concurrency <= 1024:
        raise SystemExit(f"--requests must be in [1, {MAX_REQUESTS}] and --concurrency in [1, 1024]")
    if not 0 < ns.max_seconds <= MAX_SECONDS or ns.max_tokens < 1:
        raise SystemExit(f"--max-seconds must be in (0, {MAX_SECONDS}] and --max-tokens >= 1")
    server = None
    if ns.url:
        base = _loopback_url(ns.url)
    else:
        from odma_mlu.server.app import create_app
        from odma_mlu.server.settings import build_engine, settings_from_args
        from odma_mlu.server.thread_server import ThreadedServer

        settings = settings_from_args(argparse.Namespace(config=ns.config, model=ns.model,
                                                         backend=None if ns.config else "cpu", kv_policy=None,
                                                         predictor=None, host="127.0.0.1", port=0,
                                                         api_key=ns.api_key))
        server = ThreadedServer(create_app(build_engine(settings), settings)).start()
        base = server.base_url
    try:
        model = ns.served_model
        if model is None:
            headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
            model = httpx.get(base + "/v1/models", headers=headers).json()["data"][0]["id"]
        res = asyncio.run(run(base, model, ns.requests, ns.concurrency, ns.max_tokens, ns.max_seconds,
                              ns.stream_every, ns.api_key))
    finally:
        if server is not None:
            server.stop()
    print(f"{res['completed']}/{res['requests']} completed, {res['refused']} refused, {res['lost']} lost, "
          f"{res['not_sent_time_limit']} not sent (time limit) in {res['makespan_s']:.2f} s")
    print(f"requests/s {res['rps']:.1f}   latency p50 {res['latency_p50_s'] * 1e3:.0f} ms   "
          f"p99 {res['latency_p99_s'] * 1e3:.0f} ms   ttft p50 {res['ttft_p50_s'] * 1e3:.0f} ms   "
          f"(concurrency {res['concurrency']})")
    print(f"server after: {res['server_after']}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(res, indent=2))
    after = res["server_after"]
    clean = res["lost"] == 0 and not after["requests_running"] and not after["kv_reserved_tokens"]
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
