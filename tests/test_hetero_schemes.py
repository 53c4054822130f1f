"""The shape-only paged baselines for sliding-window models (emulator/hetero_memory.py,
emulator/hetero_paged.py) and tools/bench_hetero.py, which replays them under ``run_bench``.
Their replays under the engine's scheduler: tests/test_replay_sliding.py."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import ModuleType

import pytest

from emulator.hetero_memory import PAGE_TOKENS, HeteroShape, load_shape
from emulator.hetero_paged import JengaLCM, VllmHybrid, live_pages
from emulator.traces import NAMED_TRACES, default_shared_dir
from odma_mlu.config import load_model_spec
from tool_module import load_tool

GIB = 2**30


def _live_bytes(shape: HeteroShape, tokens: dict[str, int]) -> int:
    """K/V the requests must keep: every token in the full layers, the window in the sliding ones."""
    return sum(shape.num_full * t + shape.num_sliding * min(t, shape.window_tokens)
               for t in tokens.values()) * shape.layer_token_bytes


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
        assert mem.held_bytes() >= _live_bytes(shape, tokens) - 2 * mem.large_bytes * len(tokens)
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


def _bench_hetero() -> ModuleType:
    return load_tool("bench_hetero")


@pytest.mark.parametrize("argv, message", [
    (["--policies", "odma,nope"], "--policies: unknown ['nope']"),
    (["--max-requests", "0"], "argument --max-requests: must be > 0, got 0"),
    (["--models", "deepseek-r1-distill-qwen-7b"], "--models: deepseek-r1-distill-qwen-7b has no sliding"),
    (["--traces", "nope"], "--traces: trace 'nope' is neither a named trace"),
])
def test_bench_hetero_rejects_bad_flags(argv: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as exc:
        _bench_hetero().main(argv + ["--json", str(out), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse: usage, then one line naming the flag
    assert ": error: " + message in last and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif(not (default_shared_dir() / NAMED_TRACES["alpaca-vicuna"]).is_file(),
                    reason="needs shared/data/lengths")
def test_bench_hetero_runs_a_tiny_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    policies = ["odma", "paged", "jenga", "vllm_hybrid", "vllm_uniform"]
    rc = _bench_hetero().main(["--max-requests", "5", "--models", "qwen2-7b-swa", "--traces", "alpaca-vicuna",
                               "--json", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "qwen2-7b-swa | alpaca-vicuna: 5 requests" in printed
    assert all(any(line.startswith(p + " ") for line in printed.splitlines()) for p in policies)
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert [(r["model"], r["trace"], r["policy"]) for r in rows] == \
        [("qwen2-7b-swa", "alpaca-vicuna", p) for p in policies]
    assert all(r["completed"] == 5 and r["lost"] == 0 for r in rows)
    assert len({r["capacity_tokens"] for r in rows}) == 1  # one budget for every policy
