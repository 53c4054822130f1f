"""The one step-cost function over layer kinds: sliding-window and SSM layers.

Kernel counts are checked against real forwards (a sliding Qwen2, Gemma-3 and Bamba, built
by tests/tiny_hetero.py and tests/tiny_hybrid.py) with the TorchDispatchMode counter of
tests/test_cost_model.py; pricing is checked for what each kind reads and writes; the
emulated engine serving a sliding or hybrid model is priced by kind, step by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emulator.cost_model import CostModel
from emulator.profile import load_profile
from odma_mlu.config import load_model_spec
from odma_mlu.engine.step_work import StepWork, ViewRule
from odma_mlu.errors import ConfigError
from odma_mlu.models.hybrid_spec import load_hybrid_spec
from odma_mlu.models.layer_kinds import LayerKinds, load_layer_kinds
from test_kernel_counts import Dispatched, _count_forward_kernels, assert_counts_match, split_read_step
from tiny_hetero import make_tiny_gemma3, make_tiny_qwen2_sliding
from tiny_hybrid import make_tiny_bamba

MLU = load_profile("mlu370-x4")
WINDOW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """name -> (forward model, spec): a sliding Qwen2 (s, f, s, f), Gemma-3 (5 local : 1
    global), Gemma-3 with 2 global of 6, and Bamba (attention at 1 and 3 of 4 layers)."""
    from odma_mlu.models.loader import load_model

    folders = {
        "qwen2_sliding": make_tiny_qwen2_sliding(tmp_path_factory.mktemp("q2s"), window=WINDOW),
        "qwen2_sliding_3s": make_tiny_qwen2_sliding(tmp_path_factory.mktemp("q2s3"), window=WINDOW, layer_types=[
            "sliding_attention"] * 3 + ["full_attention"]),
        "gemma3": make_tiny_gemma3(tmp_path_factory.mktemp("g3"), window=WINDOW),
        "gemma3_2f": make_tiny_gemma3(tmp_path_factory.mktemp("g3b"), window=WINDOW, pattern=3),
        "bamba": make_tiny_bamba(tmp_path_factory.mktemp("bamba")),
        "bamba_1a": make_tiny_bamba(tmp_path_factory.mktemp("bamba1"), num_layers=3, attn_layers=(1,)),
    }
    out = {}
    for name, folder in folders.items():
        model, spec, _ = load_model(folder, with_tokenizer=False)
        out[name] = (model, spec, folder)
    return out


def _batch(decode_groups: int, prefills: int, multi_run: bool, cached: int) -> tuple[list, StepWork, int]:
    """Sequences of a step (as test_cost_model builds them) and the StepWork describing it."""
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import SequenceInput

    seqs, reads, start = [], [], 0
    for g in range(decode_groups):  # one decode group per span class (powers of two)
        ctx = 70 << g
        for _ in range(2):
            runs = ((start, 40), (start + 100, 200 << g)) if multi_run else ((start, 256 << g),)
            start += 100 + (200 << g) if multi_run else 256 << g
            loc = KVLocation(runs)
            seqs.append(SequenceInput((5,), ctx - 1, loc))
            reads.append(loc.run_tokens(ctx))
    new = []
    for i in range(prefills):
        n = 3 if i == 2 else 10  # a third prefill shorter than Bamba's conv (d_conv 4)
        seqs.append(SequenceInput(tuple(range(3, 3 + n)), cached, KVLocation(((start, 64),))))
        new.append(n)
        start += 64
    return seqs, StepWork.build(new, reads, (), [cached] * len(new)), start


def _count(model: Any, seqs: list, arena_tokens: int, views: ViewRule | None = None) -> Dispatched:
    """Kernels of one forward of a sliding (rings) or hybrid (state slots) model."""
    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import ForwardBatch
    from odma_mlu.models.window_attention import RingBatch, RingPlan

    if getattr(model, "is_hybrid", False):
        states = model.new_state_pool(len(seqs) + 1)
        return _count_forward_kernels(model, seqs, arena_tokens, extra=(states, list(range(len(seqs)))),
                                      views=views)
    window = model.window_tokens
    pool = model.new_window_pool(model.new_arena(16))
    rows = pool.rows_for(window)
    pool = model.new_window_pool(model.new_arena((len(seqs) + 1) * rows))
    # whole-window rings, not in row order: sequence i's ring is rows [(n - i) * rows, (n - i + 1) * rows)
    rings = [(KVLocation((((len(seqs) - i) * rows, rows),)), window) for i in range(len(seqs))]
    batch = RingBatch.build(pool, ForwardBatch.build(seqs, views=views), rings)
    return _count_forward_kernels(model, seqs, arena_tokens, extra=(RingPlan(batch, pool.k, pool.v),),
                                  views=views)


CASES = [(1, 0, False, 0), (2, 0, False, 0), (0, 1, False, 0), (0, 2, False, 5), (1, 1, True, 0),
         (2, 2, True, 0), (3, 1, False, 0), (1, 3, False, 0), (2, 3, True, 6)]


@pytest.mark.parametrize("name", ["qwen2_sliding", "qwen2_sliding_3s", "gemma3", "gemma3_2f", "bamba", "bamba_1a"])
@pytest.mark.parametrize("decode_groups, prefills, multi_run, cached", CASES)
def test_kernel_counts_follow_the_forward_per_kind(tiny: dict[str, Any], name: str, decode_groups: int,
                                                   prefills: int, multi_run: bool, cached: int) -> None:
    """The kernel count of every layer kind equals the ops the real forward dispatches."""
    model, spec, _ = tiny[name]
    seqs, work, start = _batch(decode_groups, prefills, multi_run, cached)
    counted = _count(model, seqs, start)
    cm = CostModel(load_profile("cpu-host"), spec, layers=LayerKinds.of_model(model))
    assert_counts_match(cm, work, counted, f"{name} ({cm.layers.describe()})")


@pytest.mark.parametrize("name", ["qwen2_sliding", "gemma3", "bamba"])
def test_kernel_counts_of_split_reads_per_kind(tiny: dict[str, Any], name: str) -> None:
    """Decodes read in parts (full-attention layers) beside a group, a view and a prefill."""
    model, spec, _ = tiny[name]
    seqs, reads, arena_tokens = split_read_step()
    counted = _count(model, seqs, arena_tokens, views=ViewRule(2))
    work = StepWork.build([10], reads, views=ViewRule(2))
    assert work.decode_split_parts
    cm = CostModel(load_profile("cpu-host"), spec, layers=LayerKinds.of_model(model))
    assert_counts_match(cm, work, counted, name)


@pytest.mark.parametrize("name", ["qwen2_sliding", "gemma3", "bamba"])
def test_split_reads_keep_every_kinds_logits(tiny: dict[str, Any], name: str) -> None:
    """Read in parts or gathered whole, a step gives the same logits in every family: the split
    reads' rows come last, and ring plans and SSM mixers follow ``decode_seqs``."""
    import torch

    from odma_mlu.kvcache.arena import KVLocation
    from odma_mlu.models.attention import ForwardBatch
    from odma_mlu.models.window_attention import RingBatch, RingPlan

    model, _, _ = tiny[name]
    seqs, _, arena_tokens = split_read_step()
    arena = model.new_arena(arena_tokens)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (*arena.k, *arena.v):
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
    logits = []
    for view in (ViewRule(2), None):
        batch = ForwardBatch.build(seqs, views=view)
        assert (batch.split_reads is not None) == (view is not None)
        if getattr(model, "is_hybrid", False):
            extra: tuple = (model.new_state_pool(len(seqs) + 1), list(range(len(seqs))))
        else:
            pool = model.new_window_pool(model.new_arena(16))
            rows = pool.rows_for(model.window_tokens)
            pool = model.new_window_pool(model.new_arena((len(seqs) + 1) * rows))
            rings = [(KVLocation(((i * rows, rows),)), model.window_tokens) for i in range(len(seqs))]
            extra = (RingPlan(RingBatch.build(pool, batch, rings), pool.k, pool.v),)
        with torch.no_grad():
            logits.append(model.forward(batch, arena, *extra))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


# -- pricing by kind -------------------------------------------------------------------------

SWA = load_model_spec("qwen2-7b-swa")
SWA_KINDS = load_layer_kinds("qwen2-7b-swa")


def test_builtin_shapes_have_their_kinds() -> None:
    assert (SWA_KINDS.num_full, SWA_KINDS.num_sliding, SWA_KINDS.window_tokens) == (8, 20, 1024)
    gemma = load_layer_kinds("gemma-3-12b")
    assert (gemma.num_full, gemma.num_sliding, gemma.window_tokens) == (8, 40, 1024)
    bamba = load_layer_kinds("bamba-9b")
    assert (bamba.num_full, bamba.num_ssm, bamba.num_layers) == (3, 29, 32)
    assert load_layer_kinds("deepseek-r1-distill-qwen-7b") == LayerKinds(num_full=28)


def test_kinds_must_add_up_to_the_shape() -> None:
    with pytest.raises(ConfigError, match="count 30 layers"):
        CostModel(MLU, SWA, layers=LayerKinds(num_full=10, num_sliding=20, window_tokens=1024))
    with pytest.raises(ConfigError, match="window"):
        LayerKinds(num_full=8, num_sliding=20)


def test_all_full_kinds_equal_no_kinds() -> None:
    work = StepWork.build([300], [(1000,), (16,) * 30], [40])
    assert CostModel(MLU, SWA).step_time(work) == CostModel(MLU, SWA, layers=LayerKinds.all_full(SWA)).step_time(work)


def test_sliding_layers_read_at_most_the_window() -> None:
    cm = CostModel(MLU, SWA, layers=SWA_KINDS)
    b = SWA.kv_bytes_per_token_per_layer
    for ctx in (100, 1024, 5000, 30000):
        c = cm.step_time(StepWork.build((), [(ctx,)] * 4))
        assert c.kv_read_bytes == 4 * (8 * ctx + 20 * min(ctx, 1024)) * b
    # past the window only the 8 full layers' reads grow: cheaper than all 28 layers full
    full = CostModel(MLU, SWA)
    long = StepWork.build((), [(30000,)] * 8)
    assert cm.step_time(long).time_s < full.step_time(long).time_s
    short = StepWork.build((), [(500,)] * 8)
    assert cm.step_time(short).time_s == pytest.approx(full.step_time(short).time_s, rel=0.02)


def test_sliding_runs_are_priced_by_their_length() -> None:
    cm = CostModel(MLU, SWA, layers=SWA_KINDS)
    one = StepWork.build((), [(3000,)] * 16, sliding_read_runs=[(1024,)] * 16)
    pages = StepWork.build((), [(3000,)] * 16, sliding_read_runs=[(16,) * 64] * 16)
    assert cm.step_time(one).time_s < cm.step_time(pages).time_s
    assert cm.step_time(one).kv_read_bytes == cm.step_time(pages).kv_read_bytes
    default = StepWork.build((), [(3000,)] * 16)  # no sliding runs given: min(context, window) as one run
    assert cm.step_time(default) == cm.step_time(one)
    with pytest.raises(AssertionError, match="sliding reads"):
        cm.step_time(StepWork.build((), [(3000,)] * 2, sliding_read_runs=[(1024,)]))


def test_sliding_decodes_gather_padded_to_the_longest_window_read() -> None:
    """Every decode's ring entries in one gather, padded to the longest (window_attention.py)."""
    import dataclasses

    work = StepWork.build((), [(3000,), (300,)])  # reads 1024 and 300 of the ring: 2 x 1024 gathered
    g = CostModel(MLU, SWA, layers=SWA_KINDS).step_time(work)
    i = CostModel(dataclasses.replace(MLU, decode_attention="in_place"), SWA, layers=SWA_KINDS).step_time(work)
    b = SWA.kv_bytes_per_token_per_layer
    assert work.decode_group_views == 2  # no span class shared: views in the full layers, no gather there
    assert g.memory_s - i.memory_s == pytest.approx(20 * 2 * 2 * 1024 * b / MLU.stream_bandwidth_bytes_per_s,
                                                    rel=1e-9)
    assert g.flops - i.flops == pytest.approx(20 * 4.0 * SWA.num_heads * SWA.head_dim * (1024 - 300), rel=1e-9)
    assert g.gather_s == pytest.approx(g.time_s - i.time_s, rel=1e-9) and i.gather_s == 0.0  # the ring's gather


def test_sliding_prefill_sees_the_window_only() -> None:
    cm = CostModel(MLU, SWA, layers=SWA_KINDS)
    q = SWA.num_heads * SWA.head_dim
    chunk = StepWork.build([512], (), (), [4000])  # a chunk after 4000 cached tokens
    c = cm.step_time(chunk)
    causal_flops, masked_flops = 4.0 * q * 512 * (4000 + 513 / 2), 4.0 * q * 512 * (1023 + 512)
    all_full = CostModel(MLU, SWA).step_time(chunk)  # 28 layers of causal attention
    assert c.flops == pytest.approx(all_full.flops - 20 * causal_flops + 20 * masked_flops, rel=1e-12)
    assert c.time_s < all_full.time_s
    assert c.kv_write_bytes == 28 * 512 * SWA.kv_bytes_per_token_per_layer


def test_ssm_state_is_read_and_written_once_per_decode() -> None:
    hs = load_hybrid_spec("bamba-9b")
    cm = CostModel(MLU, hs.base, layers=LayerKinds.from_hybrid(hs))
    times = []
    for batch in (1, 2, 4, 8, 16):
        c = cm.step_time(StepWork.build((), [(16,) * 10] * batch))
        assert c.state_bytes == 2 * batch * hs.num_ssm_layers * hs.state_bytes_per_layer
        assert c.kv_read_bytes == batch * 160 * hs.kv_bytes_per_token
        assert c.time_s >= (c.weight_bytes + c.kv_read_bytes + c.state_bytes) / MLU.peak_bandwidth_bytes_per_s
        times.append(c.time_s)
    assert all(a < b for a, b in zip(times, times[1:])), times
    assert cm.step_time(StepWork.build((), [(16,)])).weight_bytes == hs.streamed_weight_bytes


def test_ssm_prefill_scans_and_writes_the_state() -> None:
    hs = load_hybrid_spec("bamba-9b")
    cm = CostModel(MLU, hs.base, layers=LayerKinds.from_hybrid(hs))
    times = [cm.step_time(StepWork.build([n])).time_s for n in (16, 256, 2048, 8192)]
    assert all(a < b for a, b in zip(times, times[1:])), times
    c = cm.step_time(StepWork.build([1000]))
    assert c.state_bytes == hs.num_ssm_layers * hs.state_bytes_per_layer
    scan = 6.0 * 1000 * hs.d_inner * hs.d_state + 2.0 * 1000 * 256 * hs.num_ssm_heads * (hs.d_state + hs.ssm_head_dim)
    assert c.flops > hs.num_ssm_layers * scan
    # the same base shape with every layer attention does no scan and streams other weights
    assert CostModel(MLU, hs.base).step_time(StepWork.build([1000])).state_bytes == 0


def test_state_copies_are_charged() -> None:
    hs = load_hybrid_spec("jamba-1.5-mini")
    cm = CostModel(MLU, hs.base, layers=LayerKinds.from_hybrid(hs))
    base = cm.step_time(StepWork.build((), [(16,) * 8] * 4))
    copied = cm.step_time(StepWork.build((), [(16,) * 8] * 4, state_copy_bytes=[hs.state_bytes_per_request] * 3))
    expected = 2 * 3 * hs.state_bytes_per_request / MLU.stream_bandwidth_bytes_per_s + 3 * MLU.launch_overhead_s
    assert copied.time_s - base.time_s == pytest.approx(expected, rel=1e-9)
    assert (copied.copy_s, base.copy_s) == (pytest.approx(expected - 3 * MLU.launch_overhead_s, rel=1e-9), 0.0)
    hybrid = CostModel(MLU, hs.base, layers=LayerKinds.from_hybrid(hs))  # 4 attention layers: their KV only
    assert hybrid.copy_s(100) == pytest.approx(
        2 * 100 * hs.kv_bytes_per_token / hybrid.run_bandwidth(100) + 4 * 2 * MLU.launch_overhead_s)


# -- the emulated engine prices a sliding / hybrid model by kind -------------------------------

@pytest.mark.parametrize("name, target", [("qwen2_sliding", "qwen2-7b-swa"), ("bamba", "bamba-9b")])
def test_emulated_engine_prices_by_kind(tiny: dict[str, Any], name: str, target: str) -> None:
    from dataclasses import replace

    from odma_mlu.backends import get_backend
    from odma_mlu.backends.emulated import EmulatedBackend
    from odma_mlu.config import SchedulerConfig
    from odma_mlu.engine.llm_engine import LLMEngine
    from odma_mlu.engine.sampler import SamplingParams

    works: list[StepWork] = []

    class Recording(EmulatedBackend):
        def account_step(self, work: StepWork) -> None:
            works.append(work)
            super().account_step(work)

    backend = Recording(MLU, get_backend("cpu"), target_model=target)
    kinds = load_layer_kinds(target)
    assert backend.target_layers == kinds and target in backend.describe()
    folder: Path = tiny[name][2]
    eng = LLMEngine(folder, kv_policy="odma", backend=backend, kv_capacity_tokens=512,
                    scheduler=replace(SchedulerConfig(), max_new_tokens=12, max_num_seqs=4))
    for i, n in enumerate((5, 19, 3, 11, 7)):
        eng.add_request([3 + (i * 7 + j) % 50 for j in range(n)], SamplingParams(max_new_tokens=12, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    decodes = [w for w in works if w.num_decodes]
    assert decodes, "the requests should decode"
    if kinds.num_sliding:  # each decode reads what its ring holds: min(context, window), as the ring's runs
        assert all(sum(s) == min(sum(r), WINDOW) for w in decodes
                   for s, r in zip(w.decode_sliding_runs, w.decode_read_runs, strict=True))
    clock = 0.0
    for w in works:
        clock += backend.cost.step_time(w).time_s
    assert backend.clock.now_s == pytest.approx(clock, rel=1e-12)
    all_full = CostModel(MLU, backend.target_model)
    by_kind = sum(backend.cost.step_time(w).time_s for w in decodes)
    assert by_kind != pytest.approx(sum(all_full.step_time(w).time_s for w in decodes), rel=1e-3)
