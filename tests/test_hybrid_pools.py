"""Shape-only pieces of the hybrid (SSM + attention) benchmark: the state pool, AVMP's
capacity moves behind a paged KV policy, vLLM's padded unified pool, and state-copy prices."""

from __future__ import annotations

import random

import torch

from emulator.cost_model import CostModel
from emulator.hybrid_policy import make_hybrid_policy
from emulator.hybrid_pools import PaddedUnified, vllm_block_tokens
from emulator.profile import load_profile
from odma_mlu.config import CacheConfig
from odma_mlu.engine.step_work import StepWork
from odma_mlu.kvcache.policy import GrowStatus, ReserveRequest
from odma_mlu.kvcache.state_pool import StatePool
from odma_mlu.models.hybrid_spec import hybrid_spec_from_config, load_hybrid_spec
from odma_mlu.models.layer_kinds import LayerKinds

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


def _req(rid: str, tokens: int, max_new_tokens: int = 16) -> ReserveRequest:
    return ReserveRequest(rid, tokens, max_new_tokens, tokens)


def test_avmp_moves_capacity_only_on_failure() -> None:
    hs = load_hybrid_spec("jamba-1.5-mini")
    capacity_tokens = 40 * hs.state_tokens_equivalent
    pol = make_hybrid_policy("avmp", hs, capacity_tokens, CacheConfig(), 16, state_fraction=2 / 40)
    assert pol.states.num_slots == 2  # the tuned split: two state slots to start
    assert pol.reserve(_req("a", 16)) and pol.reserve(_req("b", 16)) and pol.migrations_to_states == 0
    assert pol.reserve(_req("c", 16, capacity_tokens)) and pol.migrations_to_states == 1  # the pool was full: KV -> states
    pol.release("a", None)
    pol.release("b", None)
    # c needs more KV than is free: free state capacity goes back (states -> KV), c's state moves down.
    assert pol.ensure_capacity("c", int(38.5 * hs.state_tokens_equivalent)).status == GrowStatus.OK
    assert pol.migrations_to_kv == 2 and pol.states.num_slots == 1
    assert pol.states.moved_bytes == hs.state_bytes_per_request
    pol.check_integrity()
    extra = pol.stats().extra
    assert extra["migrations_to_kv"] == pol.migrations_to_kv and extra["state_slots"] == pol.states.num_slots


def test_static_split_keeps_its_pools() -> None:
    hs = load_hybrid_spec("jamba-1.5-mini")
    capacity_tokens = 40 * hs.state_tokens_equivalent
    pol = make_hybrid_policy("static_split_0.5", hs, capacity_tokens, CacheConfig(), 16, state_fraction=0.9)
    assert pol.states.num_slots == 20  # half the budget, whatever the tuned share
    for i in range(20):
        assert pol.reserve(_req(f"r{i}", 16))
    assert pol.reserve(_req("x", 16)) is None and pol.migrations_to_states == 0  # waits: no slot, no move
    # A request never gets more than the KV half (less the watermark): it is rejected, not left waiting.
    assert pol.max_request_tokens() < capacity_tokens // 2
    pol.check_integrity()


def test_padded_pool_pads_kv_to_big_blocks() -> None:
    hs = load_hybrid_spec("bamba-9b")
    pool = PaddedUnified(hs, 4 * 2**30, 0.0)
    assert pool.admit("a", 10)
    # 10 tokens hold a whole 1056-token block in each attention layer, and every state a page.
    assert pool.held_bytes() == (hs.num_attention_layers + hs.num_ssm_layers) * pool.page_bytes
    assert pool.held_bytes() > 10 * hs.kv_bytes_per_token + hs.state_bytes_per_request
    assert pool.read_runs(2200) == (1056, 1056, 88)


def test_padded_pool_admits_under_the_watermark_and_grows_into_it() -> None:
    hs = load_hybrid_spec("jamba-1.5-mini")
    per_request = hs.num_ssm_layers + hs.num_attention_layers  # pages of a one-block request
    page_bytes = vllm_block_tokens(hs) * hs.base.kv_bytes_per_token_per_layer
    pool = PaddedUnified(hs, 10 * per_request * page_bytes, 0.1)
    admitted = sum(pool.admit(f"r{i}", 16) for i in range(10))
    assert admitted == 9  # the tenth would leave less than 10% of the pages free
    assert pool.grow("r0", pool.block_tokens + 1)  # growth may use the watermark
    pool.check_integrity()


def test_copies_are_charged() -> None:
    hs = load_hybrid_spec("jamba-1.5-mini")
    cost = CostModel(load_profile("mlu370-x4"), hs.base, layers=LayerKinds.from_hybrid(hs))
    reads = [(16,) * 6 + (5,), (16,) * 12 + (9,)]
    base = cost.step_time(StepWork.build((), reads))
    with_state = cost.step_time(StepWork.build((), reads, state_copy_bytes=[64 * 2**20]))
    with_kv = cost.step_time(StepWork.build((), reads, [512]))
    assert with_state.copy_bytes == 2 * 64 * 2**20 and with_state.time_s > base.time_s
    assert with_kv.copy_bytes == 2 * 512 * hs.kv_bytes_per_token
    assert with_kv.time_s > base.time_s
