"""LLMEngine on sliding-window models: greedy equal to transformers under every KV policy,
under preemption (arena or ring pool full) and when admission has to wait for ring room.
Rings start at the prompt (granule 4 here), grow to the 18-token window (shorter than most
prompts and than the generation) and wrap; they are freed on finish, preemption and abort,
memory accounting counts held slots and shows the evicted prefix freed, and the step
description reports each decode's ring read as its held runs."""

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
WINDOW = 18
GRANULE = 4


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
    engine = LLMEngine(folder, kv_policy=policy, backend="cpu", kv_capacity_tokens=capacity, scheduler=sched,
                       window_slots=window_slots)
    assert engine.windows is not None
    engine.windows.granule_tokens = GRANULE
    return engine


def _run(engine: LLMEngine, on_step: Any = None, prompts: list[str] = PROMPTS) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    last: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            last[out.request_id] = list(out.token_ids)
        if on_step is not None:
            on_step(engine)
        engine.policy.check_integrity()
    assert engine.windows is not None and engine.windows.stats().num_rings == 0, "a ring leaked"
    assert engine.windows.stats().held_slots == 0, "ring slots leaked"
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
    budget = {"qwen2_sliding": 96, "gemma3": 80}[family]  # 4 windows of rings + a 120-token arena
    engine = _engine(folders[family], policy, budget, window_slots=4)
    assert engine.arena.capacity_tokens == 120 and engine.windows.capacity_slots == 4 * WINDOW
    assert _run(engine) == references[family]
    if policy == "paged":  # static waits (worst case reserved up front); odma may wait on its claims
        assert engine.scheduler.num_preemptions > 0, "the test meant to force preemption"


@pytest.mark.parametrize("family", ["qwen2_sliding", "gemma3"])
@pytest.mark.parametrize("policy", ["odma", "paged"])
def test_blocked_ring_growth_preempts(folders, references, family: str, policy: str) -> None:
    """A ring pool of two windows and a large arena: short prompts are admitted with small
    rings that later cannot all grow (NO_ROOM from the rings): the scheduler preempts and
    recomputes; tokens do not change."""
    order = [2, 2, 2, 2, 0]  # one-token prompts: four 4-slot rings fit, four 18-slot ones do not
    engine = _engine(folders[family], policy, 4096, window_slots=2)
    blocked: list[int] = []
    out = _run(engine, lambda e: blocked.append(e.windows.blocked_grows), [PROMPTS[i] for i in order])
    assert out == [references[family][i] for i in order]
    assert engine.scheduler.num_preemptions > 0 and blocked[-1] > 0, "the rings meant to block growth"
    assert engine.windows.in_place_grows > 0


@pytest.mark.parametrize("family", ["qwen2_sliding", "gemma3"])
def test_admission_waits_for_ring_room(folders, references, family: str) -> None:
    """Two windows of ring slots: the long prompts take a whole window each, so at most two
    of them run at once."""
    long_prompts = [1, 3, 4]
    engine = _engine(folders[family], "odma", 4096, window_slots=2)
    running: list[int] = []
    out = _run(engine, lambda e: running.append(len(e.scheduler.running)), [PROMPTS[i] for i in long_prompts])
    assert out == [references[family][i] for i in long_prompts]
    assert max(running) == 2, f"two windows of rings, yet {max(running)} long requests ran at once"


def test_budget_is_shared_between_groups(folders) -> None:
    engine = _engine(folders["gemma3"], "odma", 1000)
    model, pool = engine.model, engine.windows
    assert pool is not None
    full_token_bytes = engine.arena.bytes_per_token
    assert full_token_bytes * model.num_sliding_layers == pool.bytes_per_token * model.num_full_layers
    budget = 1000 * (full_token_bytes + pool.bytes_per_token)  # 1000 tokens of K/V over every layer
    used = engine.arena.capacity_tokens * full_token_bytes + pool.nbytes
    assert budget - full_token_bytes < used <= budget
    assert pool.capacity_slots == engine.arena.capacity_tokens == 1000  # as many tokens in each group


def test_ring_grows_then_wraps_and_frees_the_evicted_prefix(folders) -> None:
    """A one-token prompt: its ring holds the granule-rounded length, grows in place up to
    the window and then stays there; tokens that slid out are counted as evicted."""
    engine = _engine(folders["gemma3"], "paged", 2048, window_slots=4)
    pool = engine.windows
    seen: list[Any] = []
    rid = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        if engine.has_unfinished():
            seen.append((pool.stats(), engine.scheduler.running[0].kv_tokens, pool.runs_of(rid)))
    assert len(seen) > WINDOW
    for stats, tokens, runs in seen:
        assert stats.num_rings == 1 and stats.held_slots == min(-(-tokens // GRANULE) * GRANULE, WINDOW)
        assert stats.held_bytes == stats.held_slots * stats.bytes_per_slot and len(runs) == 1
        assert stats.live_tokens == min(tokens, WINDOW)
        assert stats.evicted_tokens == max(0, tokens - WINDOW)
    assert seen[0][0].held_slots < WINDOW == seen[-1][0].held_slots
    assert pool.stats().held_slots == 0 and not pool.holds(rid)


def test_step_description_reads_the_held_ring(folders) -> None:
    """describe_step's sliding reads are each decode's ring entries as its runs:
    min(context, window) tokens, not a whole window."""
    from odma_mlu.engine.step_work import describe_step

    engine = _engine(folders["qwen2_sliding"], "odma", 2048)
    works: list[Any] = []
    engine._describe = lambda batch: works.append(describe_step(batch, engine.policy))  # type: ignore[method-assign]
    _run(engine)
    decodes = [w for w in works if w.num_decodes]
    assert decodes
    pairs = [(sum(s), sum(r)) for w in decodes for s, r in zip(w.decode_sliding_runs, w.decode_read_runs)]
    assert all(sliding == min(context, WINDOW) for sliding, context in pairs)
    assert any(sliding < WINDOW for sliding, _ in pairs), "no decode read a ring shorter than the window"


def test_abort_returns_the_ring(folders) -> None:
    engine = _engine(folders["qwen2_sliding"], "odma", 2048, window_slots=3)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS[:3]]
    engine.step()
    assert engine.windows.stats().num_rings == 3
    held = engine.windows.stats().held_slots
    assert engine.abort(ids[1])
    assert engine.windows.stats().num_rings == 2 and not engine.windows.holds(ids[1])
    assert engine.windows.stats().held_slots == held - WINDOW  # the 40-token prompt held a whole window
    engine.policy.check_integrity()
    while engine.has_unfinished():
        engine.step()
    assert engine.windows.stats().num_rings == 0
