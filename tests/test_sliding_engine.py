"""LLMEngine on sliding-window models: greedy equal to transformers under every KV policy,
under preemption and when admission has to wait for a free ring; rings are returned on
finish, preemption and abort, and the memory accounting shows the evicted prefix freed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from odma_mlu.config import SchedulerConfig
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.kvcache.factory import POLICY_NAMES
from tiny_hetero import make_tiny_gemma3, make_tiny_qwen2_sliding

PROMPTS = [
    "the cache model serve request",
    "hello world of memory and bucket and token and page block with the people of the city",
    "a",
    "what is the length of a contiguous slab in the school house of the family",
    "time year people way day man thing woman life child world school state family student group",
    "power hour game line end",
]
MAX_NEW = 20
WINDOW = 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"qwen2_sliding": make_tiny_qwen2_sliding(tmp_path_factory.mktemp("q2s_e"), window=WINDOW, seed=1),
            "gemma3": make_tiny_gemma3(tmp_path_factory.mktemp("g3_e"), window=WINDOW, seed=2)}


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]) -> dict[str, list[list[int]]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for fam, folder in folders.items():
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
        refs = []
        for p in PROMPTS:
            ids = tok.encode(p, add_special_tokens=False)
            with torch.no_grad():
                gen = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            refs.append(gen[0, len(ids):].tolist())
        out[fam] = refs
    return out


def _engine(folder: Path, policy: str, capacity: int, window_slots: int | None = None, max_num_seqs: int = 64
            ) -> LLMEngine:
    sched = replace(SchedulerConfig(), max_new_tokens=MAX_NEW, max_num_seqs=max_num_seqs)
    return LLMEngine(folder, kv_policy=policy, backend="cpu", kv_capacity_tokens=capacity, scheduler=sched,
                     window_slots=window_slots)


def _run(engine: LLMEngine, on_step: Any = None) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS]
    last: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            last[out.request_id] = list(out.token_ids)
        if on_step is not None:
            on_step(engine)
        engine.policy.check_integrity()
    assert engine.windows is not None and engine.windows.stats().used_slots == 0, "a ring leaked"
    assert engine.policy.reserved_tokens() == 0 and engine.policy.num_live() == 0, "KV leaked"
    return [last[i] for i in ids]


@pytest.mark.parametrize("family", ["qwen2_sliding", "gemma3"])
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_greedy_matches_transformers_every_policy(folders, references, family: str, policy: str) -> None:
    assert _run(_engine(folders[family], policy, 2048)) == references[family]


@pytest.mark.parametrize("family", ["qwen2_sliding", "gemma3"])
@pytest.mark.parametrize("policy", ["static", "odma", "paged"])
def test_greedy_matches_under_preemption(folders, references, family: str, policy: str) -> None:
    """An arena too small for the batch: requests are preempted (their rings freed) and
    recomputed into fresh rings; tokens do not change."""
    budget = {"qwen2_sliding": 78, "gemma3": 50}[family]  # 6 rings + a 120-token arena for the full layers
    engine = _engine(folders[family], policy, budget, window_slots=6)
    assert engine.arena.capacity_tokens == 120
    assert _run(engine) == references[family]
    if policy == "paged":  # static waits (worst case reserved up front); odma may wait on its claims
        assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"


@pytest.mark.parametrize("family", ["qwen2_sliding", "gemma3"])
def test_admission_waits_for_a_free_ring(folders, references, family: str) -> None:
    engine = _engine(folders[family], "odma", 4096, window_slots=2)
    running: list[int] = []
    assert _run(engine, lambda e: running.append(len(e.scheduler.running))) == references[family]
    assert max(running) == 2, f"two rings, yet {max(running)} requests ran at once"


def test_budget_is_shared_between_groups(folders) -> None:
    engine = _engine(folders["gemma3"], "odma", 1000)
    model, pool = engine.model, engine.windows
    assert pool is not None
    full_token_bytes = engine.arena.bytes_per_token
    assert full_token_bytes * model.num_sliding_layers == pool.bytes_per_token * model.num_full_layers
    budget = 1000 * (full_token_bytes + pool.bytes_per_token)  # 1000 tokens of K/V over every layer
    used = engine.arena.capacity_tokens * full_token_bytes + pool.nbytes
    assert budget - full_token_bytes < used <= budget


def test_evicted_prefix_is_freed_in_the_accounting(folders) -> None:
    """A request holds one window of ring per sliding layer however long it grows: the
    tokens that slid out are counted as evicted, and its held bytes stay constant."""
    engine = _engine(folders["gemma3"], "paged", 2048, window_slots=4)
    seen: list[Any] = []
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    rid = engine.add_request(PROMPTS[1], params)
    while engine.has_unfinished():
        engine.step()
        if engine.has_unfinished():
            seen.append((engine.windows.stats(), engine.scheduler.running[0].kv_tokens))
    assert len(seen) > WINDOW
    for stats, tokens in seen:
        assert stats.used_slots == 1 and stats.held_bytes == stats.bytes_per_slot
        assert stats.live_tokens == min(tokens, WINDOW)
        assert stats.evicted_tokens == max(0, tokens - WINDOW)
    assert engine.windows.stats().used_slots == 0 and not engine.windows.holds(rid)


def test_abort_returns_the_ring(folders) -> None:
    engine = _engine(folders["qwen2_sliding"], "odma", 2048, window_slots=3)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS[:3]]
    engine.step()
    assert engine.windows.stats().used_slots == 3
    assert engine.abort(ids[1])
    assert engine.windows.stats().used_slots == 2 and not engine.windows.holds(ids[1])
    engine.policy.check_integrity()
    while engine.has_unfinished():
        engine.step()
    assert engine.windows.stats().used_slots == 0
