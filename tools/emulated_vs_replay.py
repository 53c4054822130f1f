"""Load-test the emulated server and compare its TTFT/TPOT with the replay's prediction.

The emulated server (``odma-mlu serve --config deploy/emulator-cpu.yaml``) computes tokens
with a tiny model but paces every step to the 7B shape's cost on the MLU370-X4 profile and
caps KV at that card's capacity. The replay prices the same arrivals with the same step-cost
function. This tool sends one request per trace record at its arrival time (prompt as token
ids of the record's length, ``max_tokens`` = its output length, ``ignore_eos``), reads
the server's own TTFT/TPOT (/metrics histogram means) and each request's end-to-end
latency on the client, replays the same records, and prints both side by side::

    python tools/make_tiny_model.py out/tiny-qwen2
    python tools/emulated_vs_replay.py --requests 300 --rate 4 --json out/emulated-vs-replay.json

Requests come from the Alpaca/Vicuna lengths file (``--trace``), arrivals are Poisson at
``--rate`` requests/s with a fixed seed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emulator.bench import resolve_predictor  # noqa: E402
from emulator.profile import load_profile  # noqa: E402
from emulator.replay import kv_capacity_tokens, replay  # noqa: E402
from emulator.traces import Trace, TraceRequest, load_trace  # noqa: E402
from odma_mlu.config import EngineConfig, from_mapping, load_model_spec, read_yaml_mapping  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_requests(trace_path: str, n: int, rate_per_s: float, max_new_tokens: int, seed: int) -> list[TraceRequest]:
    src = load_trace(trace_path, seed=seed, max_requests=n, max_new_tokens=max_new_tokens)
    rng = random.Random(seed)
    t = 0.0
    out = []
    for r in src.requests[:n]:
        out.append(TraceRequest(r.request_id, t, r.prompt_tokens, max(1, min(r.output_tokens, max_new_tokens))))
        t += rng.expovariate(rate_per_s)
    return out


async def _one(client: httpx.AsyncClient, url: str, r: TraceRequest, t0: float, vocab: int,
               results: dict[str, float]) -> None:
    await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.perf_counter()))
    rng = random.Random(r.request_id)
    prompt = [rng.randrange(10, vocab) for _ in range(r.prompt_tokens)]
    body = {"model": "tiny-qwen2", "prompt": prompt, "max_tokens": r.output_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    sent = time.perf_counter()
    async with client.stream("POST", url, json=body, timeout=600) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                results[r.request_id] = time.perf_counter() - sent


async def drive(base_url: str, requests: list[TraceRequest], vocab: int) -> tuple[dict[str, float], str]:
    """Send every request at its arrival time; e2e latency per request, then /metrics."""
    results: dict[str, float] = {}
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter() + 0.5
        await asyncio.gather(*(_one(client, base_url + "/v1/completions", r, t0, vocab, results) for r in requests))
        metrics = (await client.get(base_url + "/metrics")).text
    return results, metrics


def metric_mean(metrics: str, name: str) -> float:
    """Mean of a Prometheus histogram: its _sum over its _count."""
    vals = {}
    for line in metrics.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " "):
                vals[suffix] = float(line.split()[-1])
    return vals["_sum"] / vals["_count"] if vals.get("_count") else float("nan")


def _pct(values: list[float], q: float) -> float:
    vals = [v for v in values if v == v]
    return float(np.percentile(vals, q)) if vals else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="deploy/emulator-cpu.yaml")
    p.add_argument("--trace", default="../shared/data/lengths/alpaca_vicuna7b_train.jsonl")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals, requests/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)
    data = read_yaml_mapping(ns.config)
    data.pop("server", None)  # the serve file's server section is not engine configuration
    cfg = from_mapping(EngineConfig, data, ns.config)
    max_new = cfg.scheduler.max_new_tokens
    requests = make_requests(ns.trace, ns.requests, ns.rate, max_new, ns.seed)
    spec_vocab = load_model_spec(cfg.model).vocab_size

    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen([sys.executable, "-m", "odma_mlu.cli", "serve", "--config", ns.config, "--port", str(port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read()[-2000:] if server.stderr else ''}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("the server did not become healthy within 120 s")
            time.sleep(0.5)
        print(f"server up on {base}; sending {len(requests)} requests at {ns.rate}/s", file=sys.stderr)
        e2e_by_id, metrics = asyncio.run(drive(base, requests, min(spec_vocab, 400)))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    profile = load_profile(cfg.profile)
    target = load_model_spec()
    trace = Trace("emulated-vs-replay", ns.trace, tuple(requests), max_new)
    res = replay(trace, cfg.cache.policy, target, profile, cache=cfg.cache, scheduler_config=cfg.scheduler,
                 max_new_tokens=max_new, capacity_tokens=kv_capacity_tokens(profile, target, cfg.cache),
                 predictor=resolve_predictor(cfg.predictor), mode="online")
    e2e = list(e2e_by_id.values())
    rows = {  # (server, replay): the server's own /metrics histograms and the client's clock
        "ttft_mean_s": (metric_mean(metrics, "odma_time_to_first_token_seconds"), res.ttft_mean_s),
        "tpot_mean_s": (metric_mean(metrics, "odma_time_per_output_token_seconds"), res.tpot_mean_s),
        "e2e_p50_s": (_pct(e2e, 50), res.e2e_p50_s), "e2e_p99_s": (_pct(e2e, 99), res.e2e_p99_s),
    }
    print(f"{'metric':<12} {'server':>10} {'replay':>10} {'server/replay':>14}")
    for k, (m, r) in rows.items():
        print(f"{k:<12} {m:>10.4f} {r:>10.4f} {m / r:>14.3f}")
    lost = len(requests) - len(e2e_by_id)
    print(f"requests {len(requests)}, completed {len(e2e_by_id)}, lost {lost}")
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps({"requests": len(requests), "rate_per_s": ns.rate, "lost": lost,
                                             "metrics": {k: {"server": m, "replay": r} for k, (m, r) in rows.items()}},
                                            indent=2))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
