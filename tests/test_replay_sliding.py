"""`odma-mlu bench` on a shape with sliding-window layers replays the engine's layout
(arena for the full layers + growing rings, joined by WindowedPolicy) and prices each
layer by its kind, instead of treating every layer as full attention."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

from emulator.bench import parse_policies
from emulator.hetero_policy import HETERO_BASELINES
from emulator.hybrid_policy import HYBRID_BASELINES
from emulator.profile import load_profile
from emulator.replay import ReplayResult, replay
from emulator.traces import Trace, TraceRequest, load_trace
from odma_mlu.cli import main as cli_main
from odma_mlu.config import load_model_spec
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.factory import POLICY_NAMES
from odma_mlu.models.layer_kinds import load_layer_kinds

SHAPE = "qwen2-7b-swa"  # 8 full + 20 sliding layers, window 1024
MODEL = load_model_spec(SHAPE)
KINDS = load_layer_kinds(SHAPE)
SHAPES = (SHAPE, "gemma-3-12b")  # gemma-3-12b: 8 full + 40 sliding, window 1024
TIGHT_CAPACITY_TOKENS = 40_000  # tokens of every layer's K/V: requests wait and some preempt


def _long_trace(n: int = 40) -> Trace:
    """Contexts well past the window, so the sliding layers keep less than every token."""
    reqs = tuple(TraceRequest(f"r{i}", 0.0, 1500 + 37 * i, 200 + 11 * i) for i in range(n))
    return Trace("long", "test", reqs, 1024)


@lru_cache(maxsize=None)
def _tight_replay(shape: str, policy: str) -> ReplayResult:
    """``_long_trace`` under ``policy`` on ``shape`` in ``TIGHT_CAPACITY_TOKENS`` (shared by the tests below)."""
    return replay(_long_trace(), policy, load_model_spec(shape), load_profile("mlu370-x4"), max_new_tokens=1024,
                  capacity_tokens=TIGHT_CAPACITY_TOKENS, layers=load_layer_kinds(shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("policy", POLICY_NAMES + HETERO_BASELINES)
def test_sliding_shape_replays_under_every_policy(shape: str, policy: str) -> None:
    res = _tight_replay(shape, policy)
    assert res.lost == 0 and res.completed == 40 and res.extents_free_after
    assert res.max_concurrent < 40  # the budget is tight: requests queue
    assert 0.0 < res.kv_utilization <= 1.0
    assert max(res.timeline_reserved_tokens) <= TIGHT_CAPACITY_TOKENS


@pytest.mark.parametrize("shape", SHAPES)
def test_jenga_keeps_pace_with_vllm_uniform(shape: str) -> None:
    """vLLM uniform keeps every layer's K/V of every token: fewer requests fit, and it
    preempts; Jenga frees what left the window and is at least as fast."""
    jenga, uniform = _tight_replay(shape, "jenga"), _tight_replay(shape, "vllm_uniform")
    assert uniform.preemptions > 0 and uniform.max_concurrent < jenga.max_concurrent
    assert jenga.tps >= 0.99 * uniform.tps, (jenga.tps, uniform.tps)


def test_windows_change_memory_and_prices() -> None:
    """The same trace and budget as an all-full-attention model reads more KV per token and fits
    fewer requests; with the kinds, sliding layers read at most their window."""
    profile = load_profile("mlu370-x4")
    trace = _long_trace()
    kw = dict(max_new_tokens=1024, capacity_tokens=40_000)
    windowed = replay(trace, "odma", MODEL, profile, layers=KINDS, **kw)
    all_full = replay(trace, "odma", MODEL, profile, **kw)
    assert windowed.kv_read_bytes / windowed.generated_tokens < 0.7 * all_full.kv_read_bytes / all_full.generated_tokens
    assert windowed.tps > all_full.tps
    # (Preemptions are not compared: 1-3 on either side, they follow where ODMA's
    # compactions happen to land, not what the windows hold.)
    # sliding layers keep at most the window: less held per request, more requests at once
    assert windowed.held_per_request_bytes < 0.8 * all_full.held_per_request_bytes
    assert windowed.max_concurrent > all_full.max_concurrent


def test_bench_cli_names_the_layer_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    rc = cli_main(["bench", "--model", SHAPE, "--max-requests", "30", "--policies", "odma,paged", "--no-progress",
                   "--json", str(out)])
    assert rc == 0
    assert "8 full + 20 sliding-window (1024) layers" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["results"]] == ["odma", "paged"] and all(r["lost"] == 0 for r in doc["results"])


def test_bench_cli_runs_a_hybrid_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hybrid (SSM) shape runs in the engine's layout and against the hybrid schemes."""
    out = tmp_path / "h.json"
    rc = cli_main(["bench", "--model", "bamba-9b", "--max-requests", "5", "--no-progress", "--json", str(out)])
    assert rc == 0
    assert "3 attention + 29 SSM layers" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    names = [r["policy"] for r in doc["results"]]
    assert names == list(POLICY_NAMES + HYBRID_BASELINES)
    assert all(r["lost"] == 0 and r["completed"] == 5 for r in doc["results"])
    assert doc["results"][names.index("odma")]["policy_extra"]["migrations_to_states"] > 0


def test_baselines_share_the_budget_and_free_out_of_window_pages() -> None:
    """The baselines run under the engine's scheduler on the same byte budget. Every request
    runs past the window: Jenga and vLLM-hybrid free the sliding layers' pages that left it,
    so most of what they hold is live; vLLM uniform keeps every token in every layer."""
    for name in HETERO_BASELINES:
        res = _tight_replay(SHAPE, name)
        assert res.capacity_tokens == TIGHT_CAPACITY_TOKENS
        if name == "vllm_uniform":
            assert res.reservation_efficiency < 0.7, res.reservation_efficiency
        else:
            assert 0.8 < res.reservation_efficiency <= 1.0, (name, res.reservation_efficiency)


def test_baselines_need_sliding_layers() -> None:
    with pytest.raises(ConfigError, match="only for models with sliding-window layers"):
        parse_policies("odma,jenga")
    assert parse_policies("odma,jenga", sliding=True) == ["odma", "jenga"]
    with pytest.raises(ConfigError, match="has none"):
        replay(_long_trace(4), "jenga", load_model_spec(), load_profile("mlu370-x4"), max_new_tokens=1024,
               capacity_tokens=40_000)


def test_conversation_pairs_trace(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"id": "a", "prompt": "x", "response": "' + "y" * 400 + '"}\n'
                    '{"id": "b", "prompt": "", "response": "' + "z" * 41 + '"}\n')
    trace = load_trace(str(path))
    assert [(r.request_id, r.prompt_tokens, r.output_tokens) for r in trace.requests] == [("a", 1, 100), ("b", 1, 10)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "response": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: fields 'prompt' and 'response' must be text"):
        load_trace(str(bad))
