"""Prefix caching: requests sharing a prompt prefix share its KV blocks, reference-counted
and evicted LRU; greedy output stays token-identical to transformers under every policy,
with chunked prefill and preemption on."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from odma_mlu.config import CacheConfig, ModelSpec, SchedulerConfig
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.factory import make_policy
from odma_mlu.kvcache.policy import ReserveRequest
from odma_mlu.kvcache.prefix import PrefixCachingPolicy
from hf_reference import hf_greedy
from test_engine import ConstantPredictor

POLICIES = ["static", "s3", "odma", "paged", "exact", "ideal"]
MAX_NEW = 10
SYSTEM_A = [3 + (7 * j) % 300 for j in range(40)]
SYSTEM_B = [5 + (11 * j) % 300 for j in range(23)]
PROMPTS = [SYSTEM_A + [17, 18, 19], SYSTEM_A + [40 + j for j in range(9)], SYSTEM_B + [7], SYSTEM_A + [17, 18, 19],
           SYSTEM_A[:20] + [99, 98], SYSTEM_B + [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], SYSTEM_A]
TINY = ModelSpec(name="tiny", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 intermediate_size=64, vocab_size=100, max_position_embeddings=4096, dtype="float32")


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dir: Path) -> list[list[int]]:
    return hf_greedy(tiny_model_dir, PROMPTS, MAX_NEW)


def _engine(model_dir: Path, policy: str, capacity: int, chunked: bool, max_num_seqs: int = 64) -> LLMEngine:
    sched = replace(SchedulerConfig(), max_new_tokens=MAX_NEW, max_num_seqs=max_num_seqs,
                    enable_chunked_prefill=chunked, max_prefill_chunk_tokens=7, max_num_batched_tokens=24)
    return LLMEngine(model_dir, kv_policy=policy, backend="cpu", kv_capacity_tokens=capacity,
                     predictor=ConstantPredictor(4), scheduler=sched,
                     cache=replace(CacheConfig(), page_size_tokens=4, enable_prefix_caching=True))


def _run_staggered(eng: LLMEngine) -> list[list[int]]:
    """The first request alone (its prefix is computed and becomes shareable), then the rest."""
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    first = eng.generate([PROMPTS[0]], params)
    rest = eng.generate(PROMPTS[1:], params)
    eng.policy.check_integrity()
    assert eng.policy.num_live() == 0, "a request still holds KV"
    eng.policy.clear()
    assert eng.policy.reserved_tokens() == 0, "KV leaked after every block was evicted"
    return [list(o.token_ids) for o in first + rest]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_prefix_sharing_greedy_matches_transformers(tiny_model_dir: Path, hf_reference: list[list[int]],
                                                    policy: str, chunked: bool) -> None:
    eng = _engine(tiny_model_dir, policy, capacity=2048, chunked=chunked)
    assert _run_staggered(eng) == hf_reference
    st = eng.policy.prefix_stats()
    # Granule 16 (4 under paged): PROMPTS[1], [3], [6] hit at least SYSTEM_A's first 32 tokens, [4] its first 16.
    assert st.hit_tokens >= 3 * 32 + 16, st
    assert st.query_tokens >= sum(map(len, PROMPTS))  # a re-admission (preemption, S3 re-bucketing) looks up again


@pytest.mark.parametrize("policy", ["odma", "paged", "static"])
def test_prefix_sharing_matches_under_preemption_and_eviction(tiny_model_dir: Path, hf_reference: list[list[int]],
                                                              policy: str) -> None:
    eng = _engine(tiny_model_dir, policy, capacity=160, chunked=True)
    assert _run_staggered(eng) == hf_reference
    assert eng.policy.prefix_stats().hit_tokens > 0


def test_prefix_caching_refused_for_sliding_window_models(tmp_path: Path) -> None:
    from tiny_hetero import make_tiny_qwen2_sliding

    folder = make_tiny_qwen2_sliding(tmp_path / "swa")
    with pytest.raises(ConfigError, match="prefix sharing needs a full-attention model"):
        LLMEngine(folder, kv_policy="paged", backend="cpu", kv_capacity_tokens=512,
                  cache=replace(CacheConfig(), enable_prefix_caching=True))


@pytest.mark.parametrize("name", ["static", "odma", "paged"])
def test_random_prefix_ops_keep_references_and_memory_consistent(name: str) -> None:
    arena = KVArena(TINY, 2048, dtype=torch.float32, shape_only=True)
    policy = PrefixCachingPolicy(make_policy(name, arena, replace(CacheConfig(), page_size_tokens=8), 64))
    rng = random.Random(0)
    systems = [[rng.randrange(100) for _ in range(rng.randrange(8, 90))] for _ in range(4)]
    live: dict[str, int] = {}
    for i in range(400):
        if live and (rng.random() < 0.45 or len(live) > 12):
            rid = rng.choice(sorted(live))
            policy.note_computed(rid, live.pop(rid))
            policy.release(rid, rng.choice([None, 3]))
        else:
            rid = f"r{i}"
            tokens = rng.choice(systems)[:rng.randrange(1, 90)] + [rng.randrange(100) for _ in range(rng.randrange(1, 9))]
            policy.set_prompt_tokens(rid, tokens)
            loc = policy.reserve(ReserveRequest(rid, len(tokens), 32, len(tokens), None, 8))
            if loc is not None:
                cached = policy.cached_prefix_tokens(rid)
                assert 0 <= cached < len(tokens) and loc.capacity_tokens >= len(tokens)
                live[rid] = len(tokens)
                policy.note_computed(rid, len(tokens))
        policy.check_integrity()
    for rid in list(live):
        policy.release(rid, None)
    policy.clear()
    policy.check_integrity()
    assert policy.reserved_tokens() == 0 and policy.num_live() == 0
    assert policy.prefix_stats().hit_tokens > 0
