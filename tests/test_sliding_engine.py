"""LLMEngine on sliding-window models: greedy equal to transformers under every KV policy,
under preemption (the one arena full: a request's or a ring's growth blocked) and when
admission has to wait for room for a request and its ring. Rings live in the full layers'
arena as a second request of the policy; they start at the prompt (blocks of 4 here), grow
to the 18-token window (shorter than most prompts and than the generation) and wrap; they
are freed on finish, preemption and abort, memory accounting counts their rows as held,
and the step description reports each decode's ring read as its runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from odma_mlu.config import CacheConfig, SchedulerConfig
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.kvcache.factory import POLICY_NAMES
from hf_reference import ENGINE_PROMPTS as PROMPTS, encode, hf_greedy
from tiny_hetero import make_tiny_gemma3, make_tiny_qwen2_sliding

MAX_NEW = 20
WINDOW = 18
BLOCK = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Qwen2 (s, f, s, f), Gemma-3 (5 : 1) and Gemma-3 with 5 sliding over 2 full layers (7
    layers, every third global: F does not divide S, a layer's blocks lie in both lanes)."""
    return {"qwen2_sliding": make_tiny_qwen2_sliding(tmp_path_factory.mktemp("q2s_e"), window=WINDOW, seed=1),
            "gemma3": make_tiny_gemma3(tmp_path_factory.mktemp("g3_e"), window=WINDOW, seed=2),
            "gemma3_5over2": make_tiny_gemma3(tmp_path_factory.mktemp("g3u_e"), window=WINDOW, num_layers=7,
                                              pattern=3, seed=6)}


def _hf_greedy(folder: Path) -> list[list[int]]:
    """transformers' greedy continuation of every prompt, MAX_NEW tokens each (no EOS stop)."""
    return hf_greedy(folder, encode(folder, PROMPTS), MAX_NEW)


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]) -> dict[str, list[list[int]]]:
    return {fam: _hf_greedy(folder) for fam, folder in folders.items()}


def _engine(folder: Path, policy: str, capacity: int, max_num_seqs: int = 64,
            swap_space_bytes: int = CacheConfig.swap_space_bytes) -> LLMEngine:
    sched = replace(SchedulerConfig(), max_new_tokens=MAX_NEW, max_num_seqs=max_num_seqs)
    engine = LLMEngine(folder, kv_policy=policy, backend="cpu", kv_capacity_tokens=capacity, scheduler=sched,
                       cache=replace(CacheConfig(), swap_space_bytes=swap_space_bytes))
    assert engine.windows is not None
    engine.windows.block_tokens = BLOCK
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
    assert engine.policy.inner.num_live() == 0, "a ring request leaked"
    return [last[i] for i in ids]


@pytest.mark.parametrize("family", ["qwen2_sliding", "gemma3", "gemma3_5over2"])
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_greedy_matches_transformers_every_policy(folders, references, family: str, policy: str) -> None:
    assert _run(_engine(folders[family], policy, 2048)) == references[family]


@pytest.mark.parametrize("family", ["qwen2_sliding", "gemma3", "gemma3_5over2"])
@pytest.mark.parametrize("policy", ["static", "odma", "paged"])
@pytest.mark.parametrize("swap", [False, True])
def test_greedy_matches_under_preemption(folders, references, family: str, policy: str, swap: bool) -> None:
    """An arena too small for the batch: requests are preempted (their rings freed) and
    either recomputed into fresh rings or, with swap space, swapped out with their ring rows
    and written back into fresh ones (rings longer than the window have wrapped by then);
    tokens do not change."""
    engine = _engine(folders[family], policy, 80, swap_space_bytes=CacheConfig.swap_space_bytes if swap else 0)
    layers = engine.spec.num_layers  # 80 tokens of every layer: 160 / 480 full-layer slots
    assert engine.arena.capacity_tokens == 80 * layers // engine.model.num_full_layers
    assert _run(engine) == references[family]
    sched = engine.scheduler
    if policy == "paged":  # static waits (worst case reserved up front); odma may wait on its claims
        assert sched.num_preemptions > 0, "the test meant to force preemption"
        assert (sched.num_swaps == sched.num_preemptions) == swap and (sched.num_swaps > 0) == swap
    if sched.num_swaps:  # each swap out and back moved the request's slots and its ring rows
        assert sched.swapped_tokens_total > 0 and sched.swap_used_tokens == 0


@pytest.mark.parametrize("family, policy, budget", [("qwen2_sliding", "paged", 60), ("gemma3", "paged", 40),
                                                    ("gemma3", "odma", 40)])
def test_blocked_ring_growth_preempts(folders, references, family: str, policy: str, budget: int) -> None:
    """Short prompts are admitted with small rings; later a ring cannot grow (NO_ROOM from
    the ring's second request, after the request itself grew): the scheduler preempts and
    recomputes; tokens do not change."""
    order = [2, 2, 2, 2, 0]  # one-token prompts: small rings that all grow to the window
    engine = _engine(folders[family], policy, budget)
    blocked: list[int] = []
    out = _run(engine, lambda e: blocked.append(e.windows.blocked_grows), [PROMPTS[i] for i in order])
    assert out == [references[family][i] for i in order]
    assert engine.scheduler.num_preemptions > 0 and blocked[-1] > 0, "the rings meant to block growth"
    assert engine.windows.new_runs + engine.windows.in_place_grows > 0


@pytest.mark.parametrize("family, budget", [("qwen2_sliding", 100), ("gemma3", 80)])
def test_admission_waits_for_ring_room(folders, references, family: str, budget: int) -> None:
    """The long prompts need a whole window of ring rows each besides their own KV: at most
    two of them fit the arena at once, so the third waits (no preemption needed)."""
    long_prompts = [1, 3, 4]
    engine = _engine(folders[family], "odma", budget)
    running: list[int] = []
    out = _run(engine, lambda e: running.append(len(e.scheduler.running)), [PROMPTS[i] for i in long_prompts])
    assert out == [references[family][i] for i in long_prompts]
    assert max(running) == 2, f"room for two requests with rings, yet {max(running)} long requests ran at once"
    assert engine.scheduler.num_preemptions == 0


def test_budget_is_one_arena_of_every_layer(folders) -> None:
    """kv_capacity_tokens counts K/V of every layer: the one arena of full-layer slots holds
    exactly that many bytes (the rings take their rows from it)."""
    engine = _engine(folders["gemma3"], "odma", 1000)
    model, pool = engine.model, engine.windows
    assert pool is not None and pool.k is engine.arena.k_groups and pool.v is engine.arena.v_groups
    per_layer_token_bytes = engine.arena.bytes_per_token // model.num_full_layers
    budget = 1000 * engine.spec.num_layers * per_layer_token_bytes  # 1000 tokens of K/V over every layer
    assert engine.arena.nbytes == budget and engine.arena.capacity_tokens == 6000
    assert pool.num_lanes == 1 and pool.num_layers == 5 and pool.bytes_per_slot == engine.arena.bytes_per_token


def test_ring_grows_then_wraps_and_frees_the_evicted_prefix(folders) -> None:
    """A one-token prompt: its ring holds the block-rounded length, grows with the request up
    to the window and then stays there; tokens that slid out are counted as evicted."""
    engine = _engine(folders["gemma3"], "paged", 2048)
    pool = engine.windows
    seen: list[Any] = []
    rid = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        if engine.has_unfinished():
            seen.append((pool.stats(), engine.scheduler.running[0].kv_tokens,
                         [pool.runs_of(rid, j) for j in range(pool.num_layers)],
                         engine.scheduler.live_kv_tokens()))
    assert len(seen) > WINDOW
    page = engine.policy.inner.page_tokens
    for stats, tokens, runs, live in seen:
        slots = min(-(-tokens // BLOCK) * BLOCK, WINDOW)
        rows = 5 * BLOCK * -(-slots // BLOCK)  # five sliding layers' blocks in the one lane
        assert stats.num_rings == 1 and stats.held_slots == -(-rows // page) * page
        assert all(sum(n for _, n in r) == slots for r in runs)
        assert stats.held_bytes == stats.held_slots * stats.bytes_per_slot
        assert stats.live_tokens == min(tokens, WINDOW)
        assert stats.evicted_tokens == max(0, tokens - WINDOW)
        assert live == tokens + rows, "the ring's rows count as live memory"
    assert seen[0][0].held_slots < seen[-1][0].held_slots == 5 * 20 + 12  # 100 rows in 7 pages of 16
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
    from odma_mlu.kvcache.window import ring_id

    engine = _engine(folders["qwen2_sliding"], "odma", 2048)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS[:3]]
    engine.step()
    assert engine.windows.stats().num_rings == 3 and engine.policy.inner.num_live() == 6
    held = engine.windows.stats().held_slots
    ring_rows = engine.policy.location(ring_id(ids[1])).capacity_tokens
    assert ring_rows >= engine.windows.rows_for(WINDOW) == 20  # the 40-token prompt holds a whole window
    reserved = engine.policy.reserved_tokens()
    assert engine.abort(ids[1])
    assert engine.windows.stats().num_rings == 2 and not engine.windows.holds(ids[1])
    assert engine.windows.stats().held_slots == held - ring_rows
    assert engine.policy.inner.num_live() == 4 and engine.policy.reserved_tokens() < reserved - ring_rows
    engine.policy.check_integrity()
    while engine.has_unfinished():
        engine.step()
    assert engine.windows.stats().num_rings == 0


@pytest.fixture(scope="module")
def grouped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """Gemma-3 with 4 sliding over 2 full layers (6 layers, every third global): gcd 2, so the
    flat arena can be two lane groups of 1 full + 2 sliding layers each."""
    folder = make_tiny_gemma3(tmp_path_factory.mktemp("g3g_e"), window=WINDOW, num_layers=6, pattern=3, seed=7)
    return folder, _hf_greedy(folder)


@pytest.mark.parametrize("policy,capacity", [(p, 2048) for p in POLICY_NAMES] + [("odma", 60), ("paged", 80)])
def test_lane_groups_keep_greedy_exact(grouped, monkeypatch: pytest.MonkeyPatch, policy: str, capacity: int) -> None:
    """With a tensor cap that one flat tensor would pass, the arena splits into two lane
    groups (each layer's ring blocks in its group's tensor) and output is unchanged, also
    when the budget is tight enough to preempt (capacities 60 and 80)."""
    import odma_mlu.kvcache.window as window

    folder, refs = grouped
    one_group = _engine(folder, policy, capacity)
    assert one_group.arena.flat_groups == 1
    lane_bytes = one_group.arena.k_groups[0].numel() * one_group.arena.k_groups[0].element_size()
    monkeypatch.setattr(window, "MAX_TENSOR_BYTES", lane_bytes - 1)
    engine = _engine(folder, policy, capacity)
    assert engine.arena.flat_groups == 2 and len(engine.arena.k_groups) == 2
    assert engine.windows is not None and engine.windows.num_groups == 2
    assert _run(engine) == refs
    assert (engine.scheduler.num_preemptions > 0) == (capacity < 2048), "tight budgets meant to force preemption"
