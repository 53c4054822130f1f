"""Hybrid (SSM + attention) shapes replayed under the engine's Scheduler (emulator/replay.py):
the engine's layout (a KV policy wrapped in AvmpPolicy with a state pool) and the compared
schemes (emulator/hybrid_policy.py), each step priced with the hybrid's layer kinds."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import pytest

from emulator.bench import parse_policies
from emulator.hybrid_policy import HYBRID_BASELINES
from emulator.hybrid_traces import SHAREGPT_DEV, drifting_trace
from emulator.profile import load_profile
from emulator.replay import ReplayResult, kv_capacity_tokens, replay
from emulator.traces import Trace, TraceRequest
from odma_mlu.config import CacheConfig, load_model_spec
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.factory import POLICY_NAMES
from odma_mlu.models.layer_kinds import LayerKinds, load_layer_kinds
from tool_module import load_tool

SHAPES = ("jamba-1.5-mini", "bamba-9b")
PROFILE = load_profile("mlu370-x4")
NUM_REQUESTS = 40
TIGHT_STATES = 12  # the budget: this many requests' states and mean KV, so requests queue


def _short_trace(n: int = NUM_REQUESTS) -> Trace:
    reqs = tuple(TraceRequest(f"r{i}", 0.0, 20 + 13 * (i % 7), 40 + 9 * (i % 5)) for i in range(n))
    return Trace("short", "test", reqs, 128)


def _tight_capacity_tokens(kinds: LayerKinds, trace: Trace) -> int:
    hs = kinds.ssm
    assert hs is not None
    mean_tokens = sum(r.prompt_tokens + r.output_tokens for r in trace.requests) // len(trace.requests)
    return TIGHT_STATES * (hs.state_tokens_equivalent + mean_tokens)


def _drifting_trace(capacity_tokens: int) -> Trace:
    """The short trace's first half, then prompts of a fifth of the budget: the mix moves from
    many states to much KV."""
    short = _short_trace().requests
    half = len(short) // 2
    return Trace("drift", "test", short[:half] + tuple(replace(r, prompt_tokens=capacity_tokens // 5)
                                                       for r in short[half:]), 128)


@lru_cache(maxsize=None)
def _replay(shape: str, policy: str, drifting: bool = False) -> ReplayResult:
    """The short trace with a quarter of the budget left to KV by the static splits and
    ``avmp``'s start; the drifting one from an even split, which its short half outgrows and
    its long half does not need."""
    kinds = load_layer_kinds(shape)
    assert kinds.ssm is not None
    capacity_tokens = _tight_capacity_tokens(kinds, _short_trace())
    trace = _drifting_trace(capacity_tokens) if drifting else _short_trace()
    return replay(trace, policy, kinds.ssm.base, PROFILE, max_new_tokens=128, capacity_tokens=capacity_tokens,
                  layers=kinds, state_fraction=0.5 if drifting else 0.75)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("policy", POLICY_NAMES + HYBRID_BASELINES)
def test_every_scheme_completes_a_tight_trace(shape: str, policy: str) -> None:
    res = _replay(shape, policy)
    assert res.lost == 0 and res.rejected == 0 and res.completed == NUM_REQUESTS and res.extents_free_after
    assert res.max_concurrent < NUM_REQUESTS  # the budget is tight: requests queue
    assert 0.0 < res.kv_utilization <= 1.0
    assert max(res.timeline_reserved_tokens) <= res.capacity_tokens


@pytest.mark.parametrize("shape", SHAPES)
def test_avmp_moves_capacity_both_ways_on_a_drifting_trace(shape: str) -> None:
    """Short prompts first (states bound), then long ones (KV bound): the pool grows, then
    gives capacity back, and the state copies of its compaction are counted."""
    avmp = _replay(shape, "avmp", drifting=True)
    x = avmp.policy_extra
    assert x["migrations_to_states"] > 0 and x["migrations_to_kv"] > 0 and x["state_moved_bytes"] > 0
    static = _replay(shape, "static_split_tuned", drifting=True)
    assert static.policy_extra["migrations_to_kv"] == 0
    assert avmp.tps > static.tps and avmp.kv_utilization > static.kv_utilization


@pytest.mark.parametrize("shape", SHAPES)
def test_padded_unified_holds_more_per_request_than_avmp(shape: str) -> None:
    """vLLM pads KV to blocks of 144 (Jamba-like) or 1056 (Bamba) tokens: short requests hold
    far more than they use; AVMP's 16-token pages and unpadded slots hold about what is live."""
    padded, avmp = _replay(shape, "padded_unified"), _replay(shape, "avmp")
    assert padded.held_per_request_bytes > avmp.held_per_request_bytes
    assert padded.reservation_efficiency < avmp.reservation_efficiency
    assert padded.policy_extra["block_tokens"] in (144, 1056)


def test_a_static_split_rejects_what_its_kv_part_never_holds() -> None:
    """The tuned split leaves Bamba-9B little KV: a long prompt is rejected at once, not left
    waiting forever; the engine's layout moves capacity and runs it."""
    kinds = load_layer_kinds("bamba-9b")
    assert kinds.ssm is not None
    trace = Trace("one-long", "test", (TraceRequest("long", 0.0, 30_000, 4), TraceRequest("short", 0.0, 10, 4)), 8)
    kw = dict(max_new_tokens=8, capacity_tokens=20 * kinds.ssm.state_tokens_equivalent, layers=kinds,
              state_fraction=0.95)
    static = replay(trace, "static_split_tuned", kinds.ssm.base, PROFILE, **kw)  # type: ignore[arg-type]
    assert static.rejected == 1 and static.completed == 1 and static.lost == 0
    engine = replay(trace, "paged", kinds.ssm.base, PROFILE, **kw)  # type: ignore[arg-type]
    assert engine.completed == 2 and engine.rejected == 0


def test_hybrid_capacity_leaves_room_for_the_hybrids_weights() -> None:
    kinds = load_layer_kinds("bamba-9b")
    hs = kinds.ssm
    assert hs is not None
    cache = CacheConfig()
    want = int(PROFILE.capacity_bytes * (1 - cache.activation_reserve_fraction) - hs.weight_bytes)
    assert kv_capacity_tokens(PROFILE, hs.base, cache, layers=kinds) == want // hs.kv_bytes_per_token


def test_hybrid_schemes_need_a_hybrid() -> None:
    with pytest.raises(ConfigError, match="only for hybrid"):
        parse_policies("odma,avmp")
    assert parse_policies("odma,avmp,padded_unified", hybrid=True) == ["odma", "avmp", "padded_unified"]
    model = load_model_spec()
    with pytest.raises(ConfigError, match="hybrid"):
        replay(_short_trace(4), "static_split_0.5", model, PROFILE, max_new_tokens=128, capacity_tokens=10_000)


def test_drifting_trace_carries_history_in_its_second_half() -> None:
    trace = _short_trace(10)
    drift = drifting_trace(trace, history_pairs=2, max_prompt_tokens=200)
    reqs, out = trace.requests, drift.requests
    assert out[:5] == reqs[:5] and drift.name == "drifting"
    want = reqs[5].prompt_tokens + sum(r.prompt_tokens + r.output_tokens for r in reqs[3:5])
    assert out[5].prompt_tokens == min(200, want) and out[5].output_tokens == reqs[5].output_tokens
    assert max(r.prompt_tokens for r in out) == 200


def _bench_hybrid() -> ModuleType:
    return load_tool("bench_hybrid")


@pytest.mark.parametrize("argv, message", [
    (["--policies", "odma,jenga"], "--policies: unknown ['jenga'] (jenga: only for models with sliding-window"),
    (["--max-requests", "0"], "argument --max-requests: must be > 0, got 0"),
    (["--models", "qwen2-7b-swa"], "--models: qwen2-7b-swa has no SSM layers"),
])
def test_bench_hybrid_rejects_bad_flags(argv: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as exc:
        _bench_hybrid().main(argv + ["--json", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert ": error: " + message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif(not SHAREGPT_DEV.is_file(), reason="needs shared/data/sharegpt")
def test_bench_hybrid_runs_a_tiny_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    rc = _bench_hybrid().main(["--max-requests", "12", "--models", "bamba-9b", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bamba-9b | sharegpt: 12 requests" in printed and "bamba-9b | drifting: 12 requests" in printed
    rows = json.loads(out.read_text())["results"]
    policies = _bench_hybrid().DEFAULT_POLICIES.split(",")
    assert [(r["trace"], r["policy"]) for r in rows] == [(t, p) for t in ("sharegpt", "drifting") for p in policies]
    assert all(r["lost"] == 0 and r["completed"] + r["rejected"] == 12 for r in rows)
    assert len({r["capacity_tokens"] for r in rows}) == 1 and len({r["state_fraction"] for r in rows}) == 1
