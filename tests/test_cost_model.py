"""Cost model: monotone in load, contiguous never slower than paged, and never beats the roofline."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from emulator.cost_model import CONTIGUOUS, CostModel, KVLayout
from emulator.profile import available_profiles, load_profile, parse_profile
from odma_mlu.config import load_model_spec

MODEL = load_model_spec("deepseek-r1-distill-qwen-7b", dtype="float16")
PROFILES = ("mlu370-x4", "mlu370-x8", "mlu590", "h100-sxm", "cpu-host")
CONTEXTS = (1, 7, 15, 16, 17, 100, 513, 1000, 4096, 8000, 32768)
PAGES = (1, 8, 16, 32, 128, 1024)


def model_for(profile_name: str) -> CostModel:
    return CostModel(load_profile(profile_name), MODEL)


def flat_profile(gather_equals_sequential: bool) -> Any:
    """A synthetic profile; with the flag, its gather curve equals its sequential curve."""
    seq = [{"chunk_bytes": n, "bandwidth": f"{bw} GB/s", "source": "measured"}
           for n, bw in ((64, 200), (4096, 250), (1 << 20, 280))]
    gat = [dict(p) for p in seq] if gather_equals_sequential else [
        {"chunk_bytes": 64, "bandwidth": "60 GB/s", "source": "measured"},
        {"chunk_bytes": 1 << 20, "bandwidth": "280 GB/s", "source": "measured"}]
    return parse_profile({
        "name": "synthetic", "memory_type": "LPDDR5", "capacity_bytes": "24 GiB", "peak_bandwidth": "300 GB/s",
        "sequential": seq, "gather": gat, "compute_flops_per_s": {"float16": "100 TFLOPS"},
        "launch_overhead": "5 us", "provenance": {"kind": "measured", "tool": "t", "host": "h", "date": "d"},
    }, "<synthetic>")


def test_profiles_under_test_exist() -> None:
    assert set(PROFILES) <= set(available_profiles())


def test_empty_step_costs_nothing() -> None:
    cost = model_for("mlu370-x4").step()
    assert cost.time_s == 0.0 and cost.flops == 0.0


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("layout", [CONTIGUOUS, KVLayout("paged", 16)])
def test_time_grows_with_batch(profile: str, layout: KVLayout) -> None:
    cm = model_for(profile)
    times = [cm.step(decode_context_tokens=[1000] * b, layout=layout).time_s for b in (1, 2, 4, 16, 64, 256)]
    assert all(a < b for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("layout", [CONTIGUOUS, KVLayout("paged", 16)])
def test_time_grows_with_context(profile: str, layout: KVLayout) -> None:
    cm = model_for(profile)
    # every context from 1 to 300 tokens crosses several curve points for this model
    # (1 KiB of K per token per layer), then coarser steps to 32K
    contexts = list(range(1, 301)) + [512, 1024, 4096, 16384, 32768]
    times = [cm.step(decode_context_tokens=[c] * 8, layout=layout).time_s for c in contexts]
    bad = [(c0, c1) for c0, c1, t0, t1 in zip(contexts, contexts[1:], times, times[1:]) if t1 < t0]
    assert not bad, f"{profile}: more context took less time at {bad[:5]}"
    assert times[-1] > times[0]


@pytest.mark.parametrize("profile", PROFILES)
def test_time_grows_with_prefill(profile: str) -> None:
    cm = model_for(profile)
    times = [cm.step(prefill_tokens=[n]).time_s for n in (1, 16, 256, 2048, 8192)]
    assert all(a < b for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("profile", PROFILES)
def test_time_grows_with_model_bytes(profile: str) -> None:
    small = MODEL
    deeper = dataclasses.replace(MODEL, num_layers=MODEL.num_layers * 2)
    wider = dataclasses.replace(MODEL, intermediate_size=MODEL.intermediate_size * 2)
    p = load_profile(profile)
    for batch in ([100], [2000] * 32):
        base = CostModel(p, small).step(decode_context_tokens=batch).time_s
        assert CostModel(p, deeper).step(decode_context_tokens=batch).time_s > base
        assert CostModel(p, wider).step(decode_context_tokens=batch).time_s > base


@pytest.mark.parametrize("profile", PROFILES)
def test_contiguous_never_slower_than_paged(profile: str) -> None:
    cm = model_for(profile)
    for ctx in CONTEXTS:
        for page in PAGES:
            for batch in (1, 32):
                contiguous = cm.step(decode_context_tokens=[ctx] * batch, layout=CONTIGUOUS).time_s
                paged = cm.step(decode_context_tokens=[ctx] * batch, layout=KVLayout("paged", page)).time_s
                assert contiguous <= paged * (1 + 1e-12), (profile, ctx, page, batch, contiguous, paged)


def test_paging_costs_something_on_a_gather_poor_profile() -> None:
    # the converse of "paging is free when gather == sequential": a real gap must show
    cm = CostModel(flat_profile(gather_equals_sequential=False), MODEL)
    ctx = [4096] * 64
    assert cm.step(decode_context_tokens=ctx).time_s < cm.step(decode_context_tokens=ctx,
                                                               layout=KVLayout("paged", 16)).time_s


def test_paging_free_when_gather_equals_sequential() -> None:
    cm = CostModel(flat_profile(gather_equals_sequential=True), MODEL)
    for ctx in CONTEXTS:
        for page in PAGES:
            batch = [ctx] * 16
            contiguous = cm.step(decode_context_tokens=batch).time_s
            paged = cm.step(decode_context_tokens=batch, layout=KVLayout("paged", page)).time_s
            assert paged == pytest.approx(contiguous, rel=1e-12), (ctx, page)


@pytest.mark.parametrize("profile", PROFILES)
def test_roofline(profile: str) -> None:
    p = load_profile(profile)
    cm = CostModel(p, MODEL)
    flops_peak = p.flops_for(MODEL.dtype)
    cases: list[dict[str, Any]] = [
        {"decode_context_tokens": [1]}, {"decode_context_tokens": [32768] * 8},
        {"decode_context_tokens": [500] * 256}, {"prefill_tokens": [8192]},
        {"prefill_tokens": [512] * 8, "decode_context_tokens": [3000] * 64},
    ]
    for layout in (CONTIGUOUS, KVLayout("paged", 16)):
        for case in cases:
            c = cm.step(layout=layout, **case)
            moved = c.weight_bytes + c.kv_read_bytes + c.kv_write_bytes
            assert c.time_s >= moved / p.peak_bandwidth_bytes_per_s, (profile, case)
            assert c.time_s >= c.flops / flops_peak, (profile, case)
            assert c.time_s >= c.overhead_s > 0
            assert c.bound in ("memory", "compute")


def test_decode_is_memory_bound_and_long_prefill_compute_bound_on_mlu370() -> None:
    cm = model_for("mlu370-x4")
    assert cm.step(decode_context_tokens=[1000] * 8).bound == "memory"
    assert cm.step(prefill_tokens=[8192]).bound == "compute"


def test_weights_alone_match_facts() -> None:
    # FACTS.md: ~15.23 GB of 16-bit weights; all of them at 307.2 GB/s is 49.6 ms. The cost
    # model streams all but the embedding table (a decode step reads one row of it per token).
    assert MODEL.weight_bytes / 307.2e9 == pytest.approx(0.0496, rel=0.01)
    c = model_for("mlu370-x4").step(decode_context_tokens=[1])
    embedding_bytes = MODEL.vocab_size * MODEL.hidden_size * MODEL.dtype_bytes
    assert c.weight_bytes == MODEL.weight_bytes - embedding_bytes
    assert c.time_s >= c.weight_bytes / 307.2e9
