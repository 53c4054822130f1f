"""Preemption by swap: a preempted request's KV goes to host memory and comes back, output
tokens unchanged under every policy; the host space is respected and freed; the step-cost
function prices every swapped byte; profiles without a host link never swap."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from emulator.cost_model import CostModel
from emulator.profile import load_profile, parse_profile
from odma_mlu.config import CacheConfig, SchedulerConfig, load_model_spec
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.request import Sequence
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.engine.scheduler import Scheduler
from odma_mlu.engine.step_work import StepWork
from odma_mlu.errors import ConfigError, ProfileError
from odma_mlu.kvcache.arena import KVArena, KVLocation
from odma_mlu.kvcache.paged import PagedPolicy
from hf_reference import encode, hf_greedy
from test_engine import MAX_NEW, PROMPTS, ConstantPredictor
from test_scheduler import TINY, run_all, seq

import yaml


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[list[int]]:
    return hf_greedy(tiny_model_dir, encode(tiny_model_dir, PROMPTS), MAX_NEW)


def _engine(model_dir: Path, policy: str, capacity: int, swap_space_bytes: int, backend: str = "cpu") -> LLMEngine:
    cache = replace(CacheConfig(), swap_space_bytes=swap_space_bytes)
    sched = replace(SchedulerConfig(), max_new_tokens=MAX_NEW)
    return LLMEngine(model_dir, kv_policy=policy, backend=backend, kv_capacity_tokens=capacity,
                     predictor=ConstantPredictor(2), cache=cache, scheduler=sched)


def _run(engine: LLMEngine) -> list[list[int]]:
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    engine.policy.check_integrity()
    assert engine.policy.num_live() == 0 and engine.scheduler.swap_used_tokens == 0 and not engine._host_kv
    return [list(o.token_ids) for o in outs]


@pytest.mark.parametrize("policy", ["odma", "paged", "ideal", "exact"])
def test_swapped_preemptions_keep_greedy_tokens(tiny_model_dir: Path, reference: list[list[int]], policy: str) -> None:
    eng = _engine(tiny_model_dir, policy, capacity=96, swap_space_bytes=CacheConfig.swap_space_bytes)
    assert _run(eng) == reference
    if policy in ("odma", "paged", "ideal"):
        assert eng.scheduler.num_swaps > 0, "the small arena was meant to force swapped preemptions"
        assert eng.scheduler.swapped_tokens_total > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_swapped_preemptions_on_cuda_keep_tokens(tiny_model_dir: Path) -> None:
    # Device -> host -> device through real copies (page-locked host tensors, asynchronous on
    # the device's stream; the arena on the GPU).
    roomy = _engine(tiny_model_dir, "odma", capacity=2048, swap_space_bytes=0, backend="cuda")
    tight = _engine(tiny_model_dir, "odma", capacity=96, swap_space_bytes=CacheConfig.swap_space_bytes, backend="cuda")
    assert _run(tight) == _run(roomy)
    assert tight.scheduler.num_swaps > 0
    assert tight.arena._pinned_host, "the swap fell back to plain host memory on CUDA"


def test_small_swap_space_mixes_swap_and_recompute(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    probe = _engine(tiny_model_dir, "paged", capacity=96, swap_space_bytes=0)
    per_token = probe.arena.bytes_per_token
    assert _run(probe) == reference and probe.scheduler.num_swaps == 0 and probe.scheduler.num_preemptions > 0
    eng = _engine(tiny_model_dir, "paged", capacity=96, swap_space_bytes=30 * per_token)  # holds ~1 request
    assert eng.scheduler.swap_capacity_tokens == 30
    assert _run(eng) == reference
    assert 0 < eng.scheduler.num_swaps < eng.scheduler.num_preemptions


def test_abort_of_a_swapped_request_frees_its_host_copy(tiny_model_dir: Path) -> None:
    eng = _engine(tiny_model_dir, "paged", capacity=96, swap_space_bytes=CacheConfig.swap_space_bytes)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in PROMPTS]
    swapped = None
    for _ in range(500):
        eng.step()
        swapped = next((s for s in eng.scheduler.waiting if s.swapped_tokens), None)
        if swapped is not None:
            break
    assert swapped is not None, "no request was swapped out"
    assert swapped.request_id in eng._host_kv and eng.scheduler.swap_used_tokens >= swapped.swapped_tokens
    assert eng.abort(swapped.request_id)
    assert swapped.request_id not in eng._host_kv
    while eng.has_unfinished():
        eng.step()
    assert eng.scheduler.swap_used_tokens == 0 and not eng._host_kv
    assert eng.policy.num_live() == 0 and len(ids) == len(PROMPTS)


def test_scheduler_respects_swap_capacity_and_lists_swaps() -> None:
    # Paged, 128 slots of 16-token pages: four 20-token prompts growing to 60 preempt one another.
    policy = PagedPolicy(KVArena(TINY, 128, dtype=torch.float32, shape_only=True), page_tokens=16, watermark_fraction=0.0)
    seen: list[tuple[str, int]] = []
    s = Scheduler(policy, SchedulerConfig(max_new_tokens=64), max_context_tokens=4096, swap_capacity_tokens=40,
                  on_swap_out=lambda q, loc: seen.append((q.request_id, q.kv_tokens)))
    for i in range(4):
        s.add(seq(f"r{i}", 20, 64, 40))
    peak = 0
    swapped_out = swapped_in = 0
    for _ in range(10_000):
        if not s.has_work:
            break
        batch = s.schedule()
        peak = max(peak, s.swap_used_tokens)
        assert s.swap_used_tokens <= 40
        swapped_in += sum(q.kv_tokens for q in batch.swapped_in)
        assert sum(batch.swap_tokens) >= sum(q.kv_tokens for q in batch.swapped_in)
        done = []
        for q in batch.sampled:
            q.num_generated += 1
            if q.num_generated >= q.true_output_tokens:
                done.append(q)
        s.postprocess(batch, done)
        policy.check_integrity()
    assert not s.has_work
    swapped_out = sum(n for _, n in seen)
    assert seen and s.num_swaps == len(seen) and peak > 0
    assert swapped_out == swapped_in and s.swapped_tokens_total == swapped_out + swapped_in
    assert s.swap_used_tokens == 0


def test_without_swap_space_preemption_recomputes() -> None:
    policy = PagedPolicy(KVArena(TINY, 128, dtype=torch.float32, shape_only=True), page_tokens=16, watermark_fraction=0.0)
    s = Scheduler(policy, SchedulerConfig(max_new_tokens=64), max_context_tokens=4096)
    for i in range(4):
        s.add(seq(f"r{i}", 20, 64, 40))
    run_all(s)
    assert s.num_preemptions > 0 and s.num_swaps == 0 and s.swapped_tokens_total == 0


def test_policies_holding_state_or_shared_pages_never_swap() -> None:
    from odma_mlu.kvcache.avmp import AvmpPolicy
    from odma_mlu.kvcache.prefix import PrefixCachingPolicy
    from odma_mlu.kvcache.windowed import WindowedPolicy
    from emulator.hetero_policy import HeteroSchemePolicy
    from emulator.scheme_policy import ShapeSchemePolicy

    paged = PagedPolicy(KVArena(TINY, 128, dtype=torch.float32, shape_only=True), page_tokens=16)
    assert Scheduler(paged, SchedulerConfig(), swap_capacity_tokens=100).swap_capacity_tokens == 100
    assert Scheduler(paged, SchedulerConfig(), swap_capacity_tokens=0).swap_capacity_tokens == 0
    for cls in (AvmpPolicy, PrefixCachingPolicy, ShapeSchemePolicy):  # SSM states, shared pages, hybrid schemes
        assert cls.swappable is False, cls.__name__
    for cls in (WindowedPolicy, HeteroSchemePolicy):  # a ring's rows swap with the runs
        assert cls.swappable is True, cls.__name__


def test_a_failed_swap_out_recomputes_instead() -> None:
    policy = PagedPolicy(KVArena(TINY, 128, dtype=torch.float32, shape_only=True), page_tokens=16, watermark_fraction=0.0)

    def no_host_memory(q: Sequence, loc: KVLocation) -> None:
        raise MemoryError("host memory exhausted")

    s = Scheduler(policy, SchedulerConfig(max_new_tokens=64), max_context_tokens=4096, swap_capacity_tokens=10_000,
                  on_swap_out=no_host_memory)
    for i in range(4):
        s.add(seq(f"r{i}", 20, 64, 40))
    assert len(run_all(s)) == 4
    assert s.num_preemptions > 0 and s.num_swaps == 0 and s.swap_used_tokens == 0


def test_swap_is_priced_over_the_host_link() -> None:
    profile = load_profile("mlu370-x4")
    cost = CostModel(profile, load_model_spec())
    base = StepWork.build(decode_read_runs=[(100,)])
    with_swap = StepWork.build(decode_read_runs=[(100,)], swap_tokens=[1000])
    link = profile.host_link_bandwidth_bytes_per_s
    assert link is not None
    nbytes = 1000 * cost.kv_bytes_per_token
    extra = cost.step_time(with_swap).time_s - cost.step_time(base).time_s
    launches = (cost.layers.num_full * 4 + 1) * profile.launch_overhead_s
    assert extra == pytest.approx(nbytes / link + 2 * nbytes / profile.stream_bandwidth_bytes_per_s + launches)
    assert cost.step_time(with_swap).swap_bytes == nbytes
    assert cost.step_time(with_swap).swap_s == pytest.approx(extra - launches)
    assert cost.swap_capacity_tokens(4 * 2**30) == 4 * 2**30 // cost.kv_bytes_per_token


def test_profile_without_host_link_never_swaps() -> None:
    cost = CostModel(load_profile("cpu-host"), load_model_spec())
    assert cost.profile.host_link_bandwidth_bytes_per_s is None
    assert cost.swap_capacity_tokens(4 * 2**30) == 0


def test_bad_host_link_is_a_one_line_profile_error() -> None:
    raw = yaml.safe_load(Path(load_profile("mlu370-x4").source_path).read_text())
    for bad, words in (({"bandwidth": "-1 GB/s", "source": "derived", "note": "x"}, "positive"),
                       ({"bandwidth": "25 GB/s", "source": "guess"}, "source"),
                       ({"bandwidth": "25 GB/s", "source": "derived"}, "note"),
                       ({"bandwidth": "25 GB/s", "source": "measured", "speed": 1}, "unknown"),
                       ("25 GB/s", "mapping")):
        with pytest.raises(ProfileError, match=words):
            parse_profile({**raw, "host_link": bad}, "p.yaml")


def test_negative_swap_space_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cache.swap_space_bytes"):
        CacheConfig(swap_space_bytes=-1)
    assert CacheConfig(swap_space_bytes=0).swap_space_bytes == 0


def test_arena_swap_round_trip_over_scattered_runs() -> None:
    arena = KVArena(TINY, 64, dtype=torch.float32)
    for t in (*arena.k, *arena.v):
        t.copy_(torch.randn_like(t))
    src = KVLocation(((40, 5), (3, 7)))
    want = [t[src.slot_table()[:10]].clone() for t in (*arena.k, *arena.v)]
    host = arena.swap_out(src, 10)
    assert host.num_tokens == 10 and all(t.device.type == "cpu" for t in host.k)
    dst = KVLocation(((20, 10),))
    arena.swap_in(dst, host)
    got = [t[20:30] for t in (*arena.k, *arena.v)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_host_copies_fall_back_to_plain_memory_where_none_is_page_locked() -> None:
    """On an accelerator the swap asks for page-locked host memory; where the build has no
    page-locked allocator (this CPU-only torch raises, as a device without one would), the
    copy is a plain one and later swaps stop asking."""
    arena = KVArena(TINY, 32, dtype=torch.float32)
    arena._pinned_host = True  # as on an accelerator
    src = torch.randn(6, TINY.num_kv_heads, TINY.head_dim)
    out = arena._to_host(src)
    assert torch.equal(out, src) and out.device.type == "cpu"
    assert arena._pinned_host is (torch.cuda.is_available() or out.is_pinned())


def test_sequence_starts_without_host_copy() -> None:
    assert Sequence("r", 3, 4).swapped_tokens == 0
