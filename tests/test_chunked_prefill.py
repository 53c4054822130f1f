"""Chunked prefill: one token budget per step shared by decodes and prompt chunks.

Greedy output stays token-identical to transformers under every policy with chunking on
(tiny chunks, a tight budget, preemption and recompute in chunks); decodes are never
stalled by a long prompt; the emulated engine and the replay keep one schedule and clock."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from emulator.profile import load_profile
from emulator.replay import replay
from emulator.traces import Trace, TraceRequest
from odma_mlu.backends import get_backend
from odma_mlu.config import CacheConfig, ModelSpec, SchedulerConfig, load_model_spec
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.request import Sequence
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.engine.scheduler import Scheduler
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.static import StaticPolicy
from test_engine import MAX_NEW, PROMPTS, ConstantPredictor, reference  # noqa: F401 - the fixture

POLICIES = ["static", "s3", "odma", "paged", "exact", "ideal"]
TINY = ModelSpec(name="tiny", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 intermediate_size=64, vocab_size=100, max_position_embeddings=4096, dtype="float32")


def _chunked(max_chunk: int, budget: int, **kw: object) -> SchedulerConfig:
    return replace(SchedulerConfig(), max_new_tokens=MAX_NEW, enable_chunked_prefill=True,
                   max_prefill_chunk_tokens=max_chunk, max_num_batched_tokens=budget, **kw)  # type: ignore[arg-type]


def _generate(eng: LLMEngine) -> list[list[int]]:
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    eng.policy.check_integrity()
    assert eng.policy.reserved_tokens() == 0 and eng.policy.num_live() == 0, "KV leaked after generate"
    return [list(o.token_ids) for o in outs]


@pytest.mark.parametrize("policy", POLICIES)
def test_chunked_greedy_matches_transformers(tiny_model_dir: Path, reference: list[list[int]], policy: str) -> None:
    eng = LLMEngine(tiny_model_dir, kv_policy=policy, backend="cpu", kv_capacity_tokens=2048,
                    predictor=ConstantPredictor(8), scheduler=_chunked(max_chunk=3, budget=8))
    assert _generate(eng) == reference


@pytest.mark.parametrize("policy", POLICIES)
def test_chunked_greedy_matches_under_preemption(tiny_model_dir: Path, reference: list[list[int]],
                                                 policy: str) -> None:
    eng = LLMEngine(tiny_model_dir, kv_policy=policy, backend="cpu", kv_capacity_tokens=96,
                    predictor=ConstantPredictor(2), cache=CacheConfig(page_size_tokens=4),
                    scheduler=_chunked(max_chunk=5, budget=12))
    assert _generate(eng) == reference
    if policy in ("paged", "odma", "ideal"):
        assert eng.scheduler.num_preemptions > 0, "the small arena was meant to force preemption"


def test_a_long_prompt_never_stalls_running_decodes() -> None:
    s = Scheduler(StaticPolicy(KVArena(TINY, 10_000, shape_only=True)),
                  _chunked(max_chunk=16, budget=20), max_context_tokens=4096)
    short = [Sequence(f"d{i}", 4, 50, true_output_tokens=50) for i in range(4)]
    for q in short:
        s.add(q)
    b = s.schedule()
    for q in b.sampled:
        q.num_generated += 1
    s.postprocess(b, [])
    s.add(Sequence("long", 100, 10, true_output_tokens=10))
    chunks = []
    while True:
        b = s.schedule()
        assert [q.request_id for q in b.decode] == ["d0", "d1", "d2", "d3"], "a decode was left out"
        assert b.num_batched_tokens <= 20
        chunks += list(b.prefill_chunk_tokens)
        done = b.sampled
        for q in done:
            q.num_generated += 1
        s.postprocess(b, [])
        if any(q.request_id == "long" for q in done):
            break
    assert sum(chunks) == 100 and max(chunks) <= 16 and len(chunks) >= 7


@pytest.mark.parametrize("policy", ["static", "odma", "paged", "ideal"])
def test_chunked_engine_and_replay_share_schedule_and_clock(tiny_model_dir: Path, policy: str) -> None:
    lengths = (5, 19, 3, 14, 27, 11, 6, 8)
    capacity, max_new = 80, 12
    sched = replace(_chunked(max_chunk=6, budget=10), max_new_tokens=max_new, max_num_seqs=8)
    cache = CacheConfig(page_size_tokens=4)
    backend = get_backend("emulated", profile="mlu370-x4", host="cpu")
    eng = LLMEngine(tiny_model_dir, kv_policy=policy, backend=backend, kv_capacity_tokens=capacity,
                    predictor=ConstantPredictor(4), cache=cache, scheduler=sched)
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    for i, n in enumerate(lengths):
        eng.add_request([3 + (i * 7 + j) % 50 for j in range(n)], params, request_id=f"r{i}")
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    trace = Trace("chunk-clock", "synthetic", tuple(TraceRequest(f"r{i}", 0.0, n, max_new)
                                                    for i, n in enumerate(lengths)), max_new)
    res = replay(trace, policy, load_model_spec(), load_profile("mlu370-x4"), cache=cache, scheduler_config=sched,
                 max_new_tokens=max_new, capacity_tokens=capacity, predictor=ConstantPredictor(4))
    assert res.completed == len(lengths) and res.lost == 0
    assert res.num_steps == steps and res.preemptions == eng.scheduler.num_preemptions
    assert backend.clock.now_s == pytest.approx(res.makespan_s, rel=1e-12)  # type: ignore[attr-defined]


def test_chunked_prefill_is_the_default_and_can_be_turned_off() -> None:
    """As in vLLM v1, prompts are chunked unless the operator says otherwise: the config
    default, ``odma-mlu bench`` and the benchmark scripts follow it; ``--no-chunked-prefill``
    restores whole-prompt prefill (how the figures before 2026-12-06 were measured)."""
    from emulator.bench import bench_configs
    from odma_mlu.cli import build_parser

    assert SchedulerConfig().enable_chunked_prefill
    def chunked(*flags: str) -> bool:
        return bench_configs(build_parser().parse_args(["bench", *flags]))[1].enable_chunked_prefill

    assert chunked() is True
    assert chunked("--no-chunked-prefill") is False
