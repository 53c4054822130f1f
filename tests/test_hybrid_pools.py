"""State pool, the three hybrid memory schemes and the shape-only hybrid replay."""

from __future__ import annotations

import random

import pytest
import torch

from emulator.hybrid_pools import DualPools, PaddedUnified, vllm_block_tokens
from emulator.hybrid_replay import (SHAREGPT_DEV, TraceRequest, drifting_trace, load_pairs, replay, sharegpt_trace,
                                    step_cost, tuned_state_fraction)
from emulator.profile import load_profile
from odma_mlu.kvcache.state_pool import StatePool
from odma_mlu.models.hybrid_spec import hybrid_spec_from_config, load_hybrid_spec

TINY = {"model_type": "bamba", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 448, "attn_layer_indices": [1, 3],
        "mamba_n_heads": 8, "mamba_n_groups": 2, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2}


def test_shapes_from_real_configs() -> None:
    jamba, bamba = load_hybrid_spec("jamba-1.5-mini"), load_hybrid_spec("bamba-9b")
    assert jamba.attention_layers == (4, 12, 20, 28) and jamba.num_ssm_layers == 28
    assert jamba.state_bytes_per_request == 28 * (8192 * 4 * 2 + 8192 * 16 * 4)  # conv fp16 + ssm fp32
    assert jamba.kv_bytes_per_token == 4 * 2 * 8 * 128 * 2
    assert bamba.attention_layers == (9, 18, 27) and bamba.conv_dim == 8192 + 2 * 128
    # vLLM's rule raises the attention block until a page holds one layer's state (FACTS: 528-2096).
    assert vllm_block_tokens(jamba) == 144 and vllm_block_tokens(bamba) == 1056


def test_state_pool_keeps_states_through_compaction() -> None:
    hs = hybrid_spec_from_config(TINY, dtype="float32")
    pool = StatePool(hs, 6, dtype=torch.float32)
    for i in range(6):
        slot = pool.allocate(f"r{i}")
        pool.ssm[0][slot].fill_(float(i))
        pool.conv[1][slot].fill_(float(-i))
    for i in (0, 1, 3):
        pool.free(f"r{i}")
    moved = pool.resize(3)  # r4, r5 live above the new size: they move down
    assert moved == 2 * pool.slot_bytes and pool.num_slots == 3
    for i in (2, 4, 5):
        slot = pool.slot_of(f"r{i}")
        assert slot < 3 and float(pool.ssm[0][slot].max()) == i and float(pool.conv[1][slot].min()) == -i
    assert pool.allocate("x") is None  # full: no room, not an exception
    pool.check_integrity()


def test_state_pool_random_ops_keep_integrity() -> None:
    hs = hybrid_spec_from_config(TINY, dtype="float16")
    pool = StatePool(hs, 4, shape_only=True)
    rng = random.Random(0)
    live: list[str] = []
    for n in range(400):
        op = rng.random()
        if op < 0.45:
            if pool.allocate(f"q{n}") is not None:
                live.append(f"q{n}")
        elif op < 0.85 and live:
            pool.free(live.pop(rng.randrange(len(live))))
        else:
            pool.resize(max(len(live), pool.num_slots + rng.choice((-2, -1, 1, 2))))
        pool.check_integrity()
        assert pool.num_live == len(live)


@pytest.mark.parametrize("migrate", [False, True])
def test_dual_pools_conserve_the_budget(migrate: bool) -> None:
    hs = load_hybrid_spec("jamba-1.5-mini")
    mem = DualPools(hs, 2 * 2**30, 0.3, migrate=migrate)
    rng = random.Random(1)
    live: dict[str, int] = {}
    for n in range(600):
        if rng.random() < 0.55:
            t = rng.choice((16, 200, 3000))
            if mem.admit(f"q{n}", t):
                live[f"q{n}"] = t
        elif live:
            rid = rng.choice(sorted(live))
            if rng.random() < 0.5:
                live[rid] += 300
                if not mem.grow(rid, live[rid]):
                    mem.release(rid)
                    del live[rid]
            else:
                mem.release(rid)
                del live[rid]
        mem.check_integrity()
        assert mem.held_bytes() >= mem.live_bytes() - 1 or not live
    assert (mem.counters.migrations > 0) == migrate


def test_avmp_moves_capacity_only_on_failure() -> None:
    hs = load_hybrid_spec("jamba-1.5-mini")
    slot = hs.state_bytes_per_request
    mem = DualPools(hs, 40 * slot, 2 * slot / (40 * slot), migrate=True)  # two state slots to start
    assert mem.admit("a", 16) and mem.admit("b", 16) and mem.counters.migrations == 0
    assert mem.admit("c", 16) and mem.counters.migrations == 1  # the state pool was full: KV -> states
    mem.release("a")
    mem.release("b")
    # A long request needs more KV than is free: free state capacity goes back (states -> KV).
    assert mem.grow("c", int(38.5 * slot) // hs.kv_bytes_per_token) and mem.counters.migrations >= 2
    mem.check_integrity()


def test_padded_pool_pads_kv_to_big_blocks() -> None:
    hs = load_hybrid_spec("bamba-9b")
    mem = PaddedUnified(hs, 4 * 2**30)
    assert mem.admit("a", 10)
    # 10 tokens hold a whole 1056-token block in each attention layer, and every state a page.
    assert mem.held_bytes() == (hs.num_attention_layers + hs.num_ssm_layers) * mem.page_bytes
    assert mem.held_bytes() > mem.live_bytes()


def test_copies_are_charged() -> None:
    from odma_mlu.engine.step_work import StepWork

    cost = step_cost(load_profile("mlu370-x4"), load_hybrid_spec("jamba-1.5-mini"))
    reads = [(16,) * 6 + (5,), (16,) * 12 + (9,)]
    base = cost.step_time(StepWork.build((), reads))
    with_state = cost.step_time(StepWork.build((), reads, state_copy_bytes=[64 * 2**20]))
    with_kv = cost.step_time(StepWork.build((), reads, [512]))
    assert with_state.copy_bytes == 2 * 64 * 2**20 and with_state.time_s > base.time_s
    assert with_kv.copy_bytes == 2 * 512 * load_hybrid_spec("jamba-1.5-mini").kv_bytes_per_token
    assert with_kv.time_s > base.time_s


@pytest.mark.skipif(not SHAREGPT_DEV.is_file(), reason="needs shared/data/sharegpt")
def test_replay_avmp_beats_static_split_on_drift() -> None:
    profile = load_profile("mlu370-x4")
    hs = load_hybrid_spec("jamba-1.5-mini")
    pairs = load_pairs(max_requests=200)
    trace = drifting_trace(pairs)
    frac = tuned_state_fraction(hs, sharegpt_trace(pairs))
    budget = 2 * 2**30
    cost = step_cost(profile, hs)
    avmp = replay(trace, DualPools(hs, budget, frac, migrate=True), cost, "drifting", check_every=50)
    static = replay(trace, DualPools(hs, budget, frac, migrate=False), cost, "drifting")
    padded = replay(trace, PaddedUnified(hs, budget), cost, "drifting")
    for r in (avmp, static, padded):
        assert r.completed == len(trace) and r.lost == 0
    assert avmp.tps > static.tps and avmp.capacity_wasted < static.capacity_wasted
    assert avmp.migrations > 0 and avmp.migrated_bytes > 0


def test_replay_counts_requests_that_can_never_fit() -> None:
    hs = load_hybrid_spec("bamba-9b")
    cost = step_cost(load_profile("mlu370-x4"), hs)
    mem = DualPools(hs, 2 * hs.state_bytes_per_request, 0.99, migrate=False)  # KV pool of a few tokens
    res = replay([TraceRequest(30_000, 4), TraceRequest(1, 2)], mem, cost, "tiny")  # KV pool: ~10K tokens
    assert res.lost == 1 and res.completed == 1
