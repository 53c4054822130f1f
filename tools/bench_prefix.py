"""Prefix caching on a trace with shared system prompts: TTFT p50 and prefill tokens computed,
with and without, on the real engine (CPU, the tiny bench model).

::

    .venv/bin/python tools/bench_prefix.py [--requests 48] [--system-tokens 384] [--policies odma,paged]

Each request = one of ``--systems`` system prompts (``--system-tokens`` each) + its own
question (``--question-tokens``); all arrive at once; greedy, ``--max-new-tokens`` each.
TTFT is wall clock from submission to the request's first token; prefill tokens computed =
prompt tokens - prefix-cache hits. Outputs are checked identical with and without.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run(model_dir: Path, policy: str, prompts: list[list[int]], max_new: int, prefix: bool) -> dict[str, object]:
    from odma_mlu.config import CacheConfig, SchedulerConfig
    from odma_mlu.engine.llm_engine import LLMEngine
    from odma_mlu.engine.sampler import SamplingParams

    kv = sum(len(p) + max_new for p in prompts) + 4096
    eng = LLMEngine(model_dir, kv_policy=policy, backend="cpu", kv_capacity_tokens=kv,
                    cache=replace(CacheConfig(), enable_prefix_caching=prefix),
                    scheduler=replace(SchedulerConfig(), max_new_tokens=max_new, enable_chunked_prefill=True,
                                      max_prefill_chunk_tokens=512, max_num_batched_tokens=1024))
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    eng.generate([prompts[0][:8]], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    if prefix:
        eng.policy.clear()
        eng.policy.query_tokens = eng.policy.hit_tokens = 0
    t0 = time.perf_counter()
    ids = [eng.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    tokens: dict[str, tuple[int, ...]] = {}
    while eng.has_unfinished():
        for out in eng.step():
            first.setdefault(out.request_id, time.perf_counter() - t0)
            if out.finished:
                tokens[out.request_id] = out.token_ids
    wall = time.perf_counter() - t0
    hits = eng.policy.prefix_stats().hit_tokens if prefix else 0
    return {"policy": policy, "prefix_caching": prefix, "ttft_p50_s": statistics.median(first.values()),
            "prefill_tokens": sum(map(len, prompts)) - hits, "hit_tokens": hits, "wall_s": wall,
            "tokens": [tokens[i] for i in ids]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=384)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--policies", default="odma,paged")
    ns = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    model_dir = ROOT / "out" / "bench_engine_model"
    if not (model_dir / "config.json").is_file():
        from tiny_model import make_tiny_qwen2

        make_tiny_qwen2(model_dir, num_layers=4, hidden=512, heads=8, kv_heads=2, intermediate=1408)
    rng = random.Random(0)
    systems = [[rng.randrange(3, 400) for _ in range(ns.system_tokens)] for _ in range(ns.systems)]
    prompts = [systems[i % ns.systems] + [rng.randrange(3, 400) for _ in range(ns.question_tokens)]
               for i in range(ns.requests)]
    for policy in ns.policies.split(","):
        a = run(model_dir, policy, prompts, ns.max_new_tokens, False)
        b = run(model_dir, policy, prompts, ns.max_new_tokens, True)
        same = a["tokens"] == b["tokens"]
        for r in (a, b):
            print(f"{policy:<6} prefix caching {'on ' if r['prefix_caching'] else 'off'}: TTFT p50 "
                  f"{r['ttft_p50_s']:.3f} s, prefill tokens computed {r['prefill_tokens']} (hits {r['hit_tokens']}), "
                  f"wall {r['wall_s']:.2f} s", flush=True)
        print(f"{policy:<6} same output tokens with and without: {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
