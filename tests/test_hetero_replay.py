"""Shape-only memory schemes for sliding-window models and their replay (emulator/hetero_*)."""

from __future__ import annotations

import random

import pytest

from emulator.hetero_memory import PAGE_TOKENS
from emulator.hetero_paged import JengaLCM, VllmHybrid, live_pages
from emulator.hetero_replay import load_shape, replay, schemes, step_cost
from emulator.profile import load_profile
from odma_mlu.config import load_model_spec

GIB = 2**30


def test_builtin_shapes_have_their_layer_types() -> None:
    gemma, qwen = load_shape("gemma-3-12b"), load_shape("qwen2-7b-swa")
    assert (gemma.num_full, gemma.num_sliding, gemma.window_tokens) == (8, 40, 1024)
    assert gemma.windows[:6] == (1024,) * 5 + (None,)  # 5 local : 1 global
    assert (qwen.num_full, qwen.num_sliding, qwen.window_tokens) == (8, 20, 1024)
    assert load_model_spec("gemma-3-12b").head_dim == 256  # `bench --model` resolves them too
    assert load_model_spec("qwen2-7b-swa").num_kv_heads == 4


def test_live_pages_drop_what_left_the_window() -> None:
    assert live_pages(40, None) == range(0, 3)
    assert live_pages(40, 64) == range(0, 3)
    assert live_pages(100, 32) == range(4, 7)  # tokens 68..99 live: pages 4 (64..79) to 6
    assert len(live_pages(10_000, 1024)) <= 1024 // PAGE_TOKENS + 1


def test_jenga_large_pages_are_the_lcm_and_stay_consistent() -> None:
    shape = load_shape("gemma-3-12b")
    mem = JengaLCM(shape, GIB, 0.01)
    b = shape.layer_token_bytes
    assert mem.small_bytes == (16 * 8 * b, 16 * 40 * b) and mem.large_bytes == 16 * 40 * b
    assert mem.per_large == (5, 1)
    rng = random.Random(0)
    tokens: dict[str, int] = {}
    for step in range(250):
        rid = f"r{rng.randrange(12)}"
        if rid not in tokens:
            if mem.admit(rid, rng.randrange(1, 300), 1, 4096, None):
                tokens[rid] = mem.tokens[rid]
        elif rng.random() < 0.1:
            mem.release(rid, None)
            del tokens[rid]
        else:
            tokens[rid] += rng.randrange(1, 200)
            if not mem.grow(rid, tokens[rid]):
                mem.release(rid, None)
                del tokens[rid]
        mem.check_integrity()
        assert mem.held_bytes() >= mem.live_bytes() - 2 * mem.large_bytes * len(tokens)
    for rid in list(tokens):
        mem.release(rid, None)
    mem.check_integrity()
    assert mem.held_bytes() == 0


def test_sliding_memory_stops_growing_at_the_window() -> None:
    shape = load_shape("gemma-3-12b")
    for mem in (JengaLCM(shape, 4 * GIB, 0.01), VllmHybrid(shape, 4 * GIB, 0.01)):
        assert mem.admit("a", 2000, 2000, 4096, None)
        at_2000 = mem.held_bytes()
        assert mem.grow("a", 6000)
        full_growth = 4000 * shape.num_full * shape.layer_token_bytes
        assert mem.held_bytes() - at_2000 <= full_growth + mem.held_bytes() // 20, mem.name
    uniform = VllmHybrid(shape, 4 * GIB, 0.01, uniform=True)
    assert uniform.admit("a", 2000, 2000, 4096, None) and uniform.grow("a", 6000)
    assert uniform.held_bytes() >= 6000 * 48 * shape.layer_token_bytes  # keeps every token in every layer


def test_vllm_hybrid_pads_the_last_group() -> None:
    assert VllmHybrid(load_shape("qwen2-7b-swa"), GIB, 0.01).padding_layers == 4  # 8 full | 8, 8, 4+4 sliding
    assert VllmHybrid(load_shape("gemma-3-12b"), GIB, 0.01).padding_layers == 0


@pytest.mark.parametrize("model", ["gemma-3-12b", "qwen2-7b-swa"])
def test_every_scheme_completes_a_tight_trace(model: str) -> None:
    shape = load_shape(model)
    profile = load_profile("mlu370-x4")
    rng = random.Random(1)
    trace = [(rng.randrange(20, 1000), rng.randrange(20, 1000)) for _ in range(30)]
    cost = step_cost(profile, shape)
    budget = GIB  # tight: vllm_uniform holds ~2700 Gemma tokens, so requests queue and preempt
    tps = {}
    for label, make in schemes(shape, budget, profile, 2048, trace).items():
        r = replay(trace, make(), cost, "synthetic", 2048, check_every=7)
        assert r.completed == len(trace) and r.generated_tokens == sum(o for _, o in trace), label
        assert 0.0 <= r.waste_while_waiting <= 1.0 and r.held_per_request_bytes >= r.live_per_request_bytes * 0.9
        tps[label] = r.tps
    assert tps["jenga"] >= tps["vllm_uniform"] * 0.99, tps


@pytest.mark.parametrize("model, ring_rows_200", [("gemma-3-12b", 5 * 16 * 13), ("qwen2-7b-swa", 33 * 16)])
def test_engine_rings_share_one_arena_with_the_requests(model: str, ring_rows_200: int) -> None:
    """odma_engine_rings: one arena of full-layer slots over the whole budget; each request
    and its ring are two ODMA requests, and the bytes held are the arena's reserved slots.
    A ring's 13 blocks of 16 are 13 S cells over F lanes: Gemma-3-12B 520 cells = 65
    row-blocks; qwen2-7b-swa (20 over 8) 260 cells = 33 row-blocks, not 3 groups x 13 = 39."""
    from odma_mlu.kvcache.window import ring_id

    shape = load_shape(model)
    profile = load_profile("mlu370-x4")
    scheme = schemes(shape, GIB, profile, 2048, [(200, 300)])["odma_engine_rings"]()
    slot_bytes = shape.num_full * shape.layer_token_bytes
    assert scheme.arena.capacity_tokens == GIB // slot_bytes
    assert (scheme.rings.num_layers, scheme.rings.num_lanes) == (shape.num_sliding, shape.num_full)
    assert scheme.admit("a", 200, 200, 300, None)
    assert scheme.policy.inner.num_live() == 2 and scheme.policy.num_live() == 1
    ring_rows = scheme.policy.location(ring_id("a")).capacity_tokens
    assert ring_rows >= scheme.rings.rows_for(200) == ring_rows_200
    assert scheme.held_bytes() == scheme.policy.reserved_tokens() * slot_bytes
    assert len(scheme.policy.location(ring_id("a")).runs) == 1
    assert scheme.read_runs("a", 200)[1] == (16,) * 12 + (8,)  # one run per block: a layer's blocks are S cells apart
    scheme.release("a", 300)
    assert scheme.policy.inner.num_live() == 0 and scheme.held_bytes() == 0


def test_bench_hetero_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "bench_hetero.py"
    spec = importlib.util.spec_from_file_location("bench_hetero", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.main(["--ring-block-tokens", "0", "--max-requests", "2"])
    assert "--ring-block-tokens must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--schemes", "odma_rings,nope", "--max-requests", "2", "--models", "qwen2-7b-swa"])
    assert "--schemes: unknown nope" in capsys.readouterr().err


def test_odma_rings_reads_every_token_its_ring_holds() -> None:
    """odma_rings prices a ring part of n F-layer slots as n F / S tokens of each sliding
    layer: the parts add up to min(tokens, W), however finely the slab is cut."""
    from emulator.hetero_memory import ring_token_runs

    parts = ring_token_runs((16,) * 10 + (5,), 5.0, 33)  # 165 slots for 33 tokens
    assert parts == (3, 3, 4, 3, 3, 3, 3, 4, 3, 3, 1) and sum(parts) == 33
    assert sum(ring_token_runs((16,) * 64, 5.0, 200)) == 200  # 1024 slots for 200 tokens: 64 parts of 3.2
    assert ring_token_runs((1, 1, 1, 2), 2.5, 2) == (1, 1)  # parts without a whole token drop
    assert ring_token_runs((5,), 2.5, 2) == (2,)
    shape = load_shape("gemma-3-12b")
    scheme = schemes(shape, GIB, load_profile("mlu370-x4"), 2048, [(200, 1000)])["odma_rings"]()
    assert scheme.admit("a", 200, 200, 1000, None)
    real = scheme.policy.read_runs

    def granules(rid: str, n: int) -> tuple[int, ...]:  # a ring slab cut into 16-slot parts
        return (16,) * (n // 16) + ((n % 16,) if n % 16 else ()) if rid.endswith("#ring") else real(rid, n)

    scheme.policy.read_runs = granules
    for tokens in (201, 500, 1100):
        assert scheme.grow("a", tokens)
        assert sum(scheme.read_runs("a", tokens)[1]) == min(tokens, shape.window_tokens)
    scheme.release("a", 1000)
