"""Cost model: monotone in load, contiguous never slower than paged, and never beats the roofline."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from emulator.cost_model import CostModel, StepCost
from emulator.profile import available_profiles, load_profile, parse_profile
from odma_mlu.config import load_model_spec
from odma_mlu.engine.step_work import StepWork

MODEL = load_model_spec("deepseek-r1-distill-qwen-7b", dtype="float16")
PROFILES = ("mlu370-x4", "mlu370-x8", "mlu590", "h100-sxm", "cpu-host")
CONTEXTS = (1, 7, 15, 16, 17, 100, 513, 1000, 4096, 8000, 32768)
PAGES = (1, 8, 16, 32, 128, 1024)


def model_for(profile_name: str) -> CostModel:
    return CostModel(load_profile(profile_name), MODEL)


CONTIGUOUS = None  # one run per sequence


def runs_of(ctx: int, page: int | None) -> tuple[int, ...]:
    """A context read as one run (page None) or as scattered pages of ``page`` tokens."""
    if page is None or ctx <= page:
        return (ctx,)
    return (page,) * (ctx // page) + ((ctx % page,) if ctx % page else ())


def step(cm: CostModel, prefill_tokens: list[int] = (), decode_context_tokens: list[int] = (),  # type: ignore[assignment]
         page: int | None = CONTIGUOUS, copy_tokens: tuple[int, ...] = ()) -> StepCost:
    return cm.step_time(StepWork.build(prefill_tokens, [runs_of(c, page) for c in decode_context_tokens], copy_tokens))


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
    cost = model_for("mlu370-x4").step_time(StepWork())
    assert cost.time_s == 0.0 and cost.flops == 0.0


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("layout", [CONTIGUOUS, 16])
def test_time_grows_with_batch(profile: str, layout: int | None) -> None:
    cm = model_for(profile)
    times = [step(cm, decode_context_tokens=[1000] * b, page=layout).time_s for b in (1, 2, 4, 16, 64, 256)]
    assert all(a < b for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("layout", [CONTIGUOUS, 16])
def test_time_grows_with_context(profile: str, layout: int | None) -> None:
    cm = model_for(profile)
    # every context from 1 to 300 tokens crosses several curve points for this model
    # (1 KiB of K per token per layer), then coarser steps to 32K
    contexts = list(range(1, 301)) + [512, 1024, 4096, 16384, 32768]
    times = [step(cm, decode_context_tokens=[c] * 8, page=layout).time_s for c in contexts]
    bad = [(c0, c1) for c0, c1, t0, t1 in zip(contexts, contexts[1:], times, times[1:]) if t1 < t0]
    assert not bad, f"{profile}: more context took less time at {bad[:5]}"
    assert times[-1] > times[0]


@pytest.mark.parametrize("profile", PROFILES)
def test_time_grows_with_prefill(profile: str) -> None:
    cm = model_for(profile)
    times = [step(cm, prefill_tokens=[n]).time_s for n in (1, 16, 256, 2048, 8192)]
    assert all(a < b for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("profile", PROFILES)
def test_time_grows_with_model_bytes(profile: str) -> None:
    small = MODEL
    deeper = dataclasses.replace(MODEL, num_layers=MODEL.num_layers * 2)
    wider = dataclasses.replace(MODEL, intermediate_size=MODEL.intermediate_size * 2)
    p = load_profile(profile)
    for batch in ([100], [2000] * 32):
        base = step(CostModel(p, small), decode_context_tokens=batch).time_s
        assert step(CostModel(p, deeper), decode_context_tokens=batch).time_s > base
        assert step(CostModel(p, wider), decode_context_tokens=batch).time_s > base


@pytest.mark.parametrize("profile", PROFILES)
def test_contiguous_never_slower_than_paged(profile: str) -> None:
    cm = model_for(profile)
    for ctx in CONTEXTS:
        for page in PAGES:
            for batch in (1, 32):
                contiguous = step(cm, decode_context_tokens=[ctx] * batch).time_s
                paged = step(cm, decode_context_tokens=[ctx] * batch, page=page).time_s
                assert contiguous <= paged * (1 + 1e-12), (profile, ctx, page, batch, contiguous, paged)


def test_paging_costs_something_on_a_gather_poor_profile() -> None:
    # the converse of "paging is free when gather == sequential": a real gap must show
    cm = CostModel(flat_profile(gather_equals_sequential=False), MODEL)
    ctx = [4096] * 64
    assert step(cm, decode_context_tokens=ctx).time_s < step(cm, decode_context_tokens=ctx, page=16).time_s


def test_paging_free_when_gather_equals_sequential() -> None:
    cm = CostModel(flat_profile(gather_equals_sequential=True), MODEL)
    for ctx in CONTEXTS:
        for page in PAGES:
            batch = [ctx] * 16
            contiguous = step(cm, decode_context_tokens=batch).time_s
            paged = step(cm, decode_context_tokens=batch, page=page).time_s
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
    for layout in (CONTIGUOUS, 16):
        for case in cases:
            c = step(cm, page=layout, **case)
            moved = c.weight_bytes + c.kv_read_bytes + c.kv_write_bytes
            assert c.time_s >= moved / p.peak_bandwidth_bytes_per_s, (profile, case)
            assert c.time_s >= c.flops / flops_peak, (profile, case)
            assert c.time_s >= c.overhead_s > 0
            assert c.bound in ("memory", "compute")


def test_decode_is_memory_bound_and_long_prefill_compute_bound_on_mlu370() -> None:
    cm = model_for("mlu370-x4")
    assert step(cm, decode_context_tokens=[1000] * 8).bound == "memory"
    assert step(cm, prefill_tokens=[8192]).bound == "compute"


def test_weights_alone_match_facts() -> None:
    # FACTS.md: ~15.23 GB of 16-bit weights; all of them at 307.2 GB/s is 49.6 ms. The cost
    # model streams all but the embedding table (a decode step reads one row of it per token).
    assert MODEL.weight_bytes / 307.2e9 == pytest.approx(0.0496, rel=0.01)
    c = step(model_for("mlu370-x4"), decode_context_tokens=[1])
    embedding_bytes = MODEL.vocab_size * MODEL.hidden_size * MODEL.dtype_bytes
    assert c.weight_bytes == MODEL.weight_bytes - embedding_bytes
    assert c.time_s >= c.weight_bytes / 307.2e9


# -- small-M matmul efficiency (profile key matmul_rows) and kernel counts -------------------

def rows_profile(points: list[tuple[int, str]] | None) -> Any:
    data = {
        "name": "rows", "memory_type": "DRAM", "capacity_bytes": "24 GiB", "peak_bandwidth": "10 GB/s",
        "sequential": [{"chunk_bytes": 64, "bandwidth": "8 GB/s", "source": "measured"},
                       {"chunk_bytes": 1 << 20, "bandwidth": "10 GB/s", "source": "measured"}],
        "gather": [{"chunk_bytes": 64, "bandwidth": "1 GB/s", "source": "measured"},
                   {"chunk_bytes": 1 << 20, "bandwidth": "9 GB/s", "source": "measured"}],
        "compute_flops_per_s": {"float32": "80 GFLOPS"}, "launch_overhead": "5 us",
        "provenance": {"kind": "measured", "tool": "t", "host": "h", "date": "d"},
    }
    if points is not None:
        data["matmul_rows"] = {"float32": [{"rows": m, "flops": f, "source": "measured"} for m, f in points]}
    return parse_profile(data, "<rows>")


# A measured-looking curve with a dip (M=4 slower than M=2 per row) and a point over the peak.
DIPPY = [(1, "7 GFLOPS"), (2, "12 GFLOPS"), (4, "10 GFLOPS"), (8, "35 GFLOPS"), (16, "35 GFLOPS"),
         (256, "70 GFLOPS"), (1024, "95 GFLOPS")]


def test_matmul_rows_time_never_decreases_and_respects_peak() -> None:
    p = rows_profile(DIPPY)
    times = [m / p.matmul_flops("float32", m) for m in range(1, 3000)]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(times, times[1:]))
    assert all(p.matmul_flops("float32", m) <= 80e9 * (1 + 1e-12) for m in range(1, 3000))
    assert p.matmul_flops("float32", 1) == pytest.approx(7e9)
    assert p.matmul_flops("float32", 16) == pytest.approx(35e9)


def test_matmul_rows_absent_means_dense_peak() -> None:
    p = rows_profile(None)
    assert p.matmul_flops("float32", 1) == p.matmul_flops("float32", 4096) == 80e9
    assert load_profile("mlu370-x4").matmul_rows == {}


@pytest.mark.parametrize("bad, needle", [
    ({"float64": [{"rows": 1, "flops": "1 GFLOPS", "source": "measured"}] * 2}, "float64"),
    ({"float16": [{"rows": 1, "flops": "1 GFLOPS", "source": "measured"},
                  {"rows": 2, "flops": "1 GFLOPS", "source": "measured"}]}, "no peak for float16"),
    ({"float32": [{"rows": 2, "flops": "1 GFLOPS", "source": "measured"},
                  {"rows": 2, "flops": "1 GFLOPS", "source": "measured"}]}, "increase strictly"),
    ({"float32": [{"rows": 0, "flops": "1 GFLOPS", "source": "measured"},
                  {"rows": 2, "flops": "1 GFLOPS", "source": "measured"}]}, "positive integer"),
    ({"float32": [{"rows": 1, "flops": "1 GFLOPS", "source": "derived"},
                  {"rows": 2, "flops": "1 GFLOPS", "source": "measured"}]}, "derived point"),
    ({"float32": [{"rows": 1, "flops": "1 GFLOPS", "source": "measured", "speed": 1},
                  {"rows": 2, "flops": "1 GFLOPS", "source": "measured"}]}, "speed"),
    ({"float32": [{"rows": 1, "flops": "1 GFLOPS", "source": "measured"}]}, "at least 2"),
])
def test_matmul_rows_validation(bad: dict, needle: str) -> None:
    from odma_mlu.errors import ProfileError

    data = {
        "name": "rows", "memory_type": "DRAM", "capacity_bytes": "24 GiB", "peak_bandwidth": "10 GB/s",
        "sequential": [{"chunk_bytes": 64, "bandwidth": "8 GB/s", "source": "measured"},
                       {"chunk_bytes": 128, "bandwidth": "8 GB/s", "source": "measured"}],
        "gather": [{"chunk_bytes": 64, "bandwidth": "1 GB/s", "source": "measured"},
                   {"chunk_bytes": 128, "bandwidth": "1 GB/s", "source": "measured"}],
        "compute_flops_per_s": {"float32": "80 GFLOPS"}, "launch_overhead": "5 us",
        "provenance": {"kind": "measured", "tool": "t", "host": "h", "date": "d"}, "matmul_rows": bad,
    }
    with pytest.raises(ProfileError, match=needle):
        parse_profile(data, "<bad>")


def test_small_batches_cost_compute_when_the_profile_says_so() -> None:
    # With a curve, a batch of 16 decode rows is slower than the same weights at the dense peak.
    with_curve = CostModel(rows_profile(DIPPY), dataclasses.replace(MODEL, dtype="float32"))
    peak_only = CostModel(rows_profile(None), dataclasses.replace(MODEL, dtype="float32"))
    ctx = [512] * 16
    assert step(with_curve, decode_context_tokens=ctx).compute_s > step(peak_only, decode_context_tokens=ctx).compute_s
    assert step(with_curve, decode_context_tokens=ctx).time_s >= step(peak_only, decode_context_tokens=ctx).time_s


@pytest.mark.parametrize("profile", PROFILES)
def test_time_grows_with_batch_on_a_dippy_curve(profile: str) -> None:
    cm = CostModel(rows_profile(DIPPY), dataclasses.replace(MODEL, dtype="float32"))
    times = [step(cm, decode_context_tokens=[300] * b).time_s for b in range(1, 70)]
    assert all(a < b for a, b in zip(times, times[1:])), times


def test_more_decode_groups_cost_more_launches() -> None:
    cm = model_for("mlu370-x4")
    one = step(cm, decode_context_tokens=[500] * 8)
    three = step(cm, decode_context_tokens=[500, 500, 500, 100, 100, 100, 2000, 2000])
    assert len(three_groups := StepWork.build((), [(500,)] * 3 + [(100,)] * 3 + [(2000,)] * 2).decode_group_sizes) == 3
    assert three_groups == (3, 3, 2)
    assert three.overhead_s > one.overhead_s


def test_copies_are_charged() -> None:
    cm = model_for("mlu370-x4")
    base = step(cm, decode_context_tokens=[500] * 8)
    with_copy = step(cm, decode_context_tokens=[500] * 8, copy_tokens=(300,))
    assert with_copy.copy_bytes == 2 * 300 * MODEL.kv_bytes_per_token
    expected = cm.copy_s(300)
    assert with_copy.time_s - base.time_s == pytest.approx(expected, rel=1e-9)


def test_a_lone_one_run_read_is_a_view() -> None:
    lone = StepWork.build((), [(700,)])
    split = StepWork.build((), [(500, 200)])
    assert lone.decode_group_views == 1 and split.decode_group_views == 0
    cm = model_for("mlu370-x4")
    assert cm.num_kernels(split) - cm.num_kernels(lone) == 2 * MODEL.num_layers


def test_gathered_groups_count_their_padded_slots() -> None:
    # 500 and 460 share a span class (512): one gather of 2 x 500 slots, 40 of them padding;
    # 700 and 100 are alone in theirs (768, 112) and one run each: views, nothing gathered.
    work = StepWork.build((), [(500,), (460,), (700,), (100,)])
    assert (work.decode_group_views, work.decode_gathered_tokens, work.decode_padding_tokens) == (2, 1000, 40)
    split = StepWork.build((), [(400, 300)])  # alone but two runs: gathered, no padding
    assert (split.decode_group_views, split.decode_gathered_tokens, split.decode_padding_tokens) == (0, 700, 0)
    # the step's time split (StepCost.gather_s): each gathered slot written and read back per layer
    cm = model_for("mlu370-x4")
    per_slot_s = 2 * MODEL.kv_bytes_per_token_per_layer / cm.profile.stream_bandwidth_bytes_per_s * MODEL.num_layers
    assert cm.step_time(work).gather_s == pytest.approx(1000 * per_slot_s, rel=1e-9)
    assert cm.step_time(StepWork.build((), [(700,)])).gather_s == 0.0


def test_split_reads_gather_only_their_short_runs() -> None:
    """At the view length a multi-run decode's long runs are read in place: only its short runs
    are gathered, each part is one more launch a layer and the step merges once a layer; a
    step whose gains do not cover the merge gathers it whole, and ``ideal`` never splits."""
    cm = model_for("mlu370-x4")
    rule = cm.view_rule()
    assert rule is not None
    view = rule.min_tokens
    reads = [(4000, 3000, 100), (6000, 2000)]
    whole = StepWork.build((), reads)
    split = StepWork.build((), reads, views=rule)
    assert split.decode_split_parts == (3, 2) and split.decode_split_rests == 1
    assert (split.decode_gathered_tokens, whole.decode_gathered_tokens) == (100, 15100)
    k = cm.kernels
    # two gathered groups (span classes 7,168 and 8,192) and their outputs' cat, against five
    # parts and the merge in one call; both steps gather (the 100-token run)
    assert cm.num_kernels(split) - cm.num_kernels(whole) == MODEL.num_layers * (
        5 * k.split_part + k.split_merge - 2 * k.decode_group - k.attention_cat)
    assert cm.step_time(split).time_s < cm.step_time(whole).time_s
    assert cm.step_time(split).gather_s < cm.step_time(whole).gather_s / 100
    short = StepWork.build((), [(view + 10, 50)], views=rule)  # gain ~1 launch: under the merge's
    assert short.decode_split_parts == () and short.decode_gathered_tokens == view + 60
    assert StepWork.build((), reads, views=rule, stream_reads=True).decode_split_parts == ()


def test_an_attention_call_pays_the_profiles_fixed_cost() -> None:
    """``attention_call_overhead``: every attention call (decode group, view, split read's part,
    prefill) costs that much beyond its launch, so the view length grows with it, and the
    split reads' merge (launches only) weighs less against a call; a profile without the key
    prices a call as one launch (the rule then is the derived profiles' as before)."""
    base = load_profile("mlu370-x4")
    assert base.attention_call_overhead_s is None
    slow = dataclasses.replace(base, attention_call_overhead_s=4 * base.launch_overhead_s)
    cm, cm_slow = CostModel(base, MODEL), CostModel(slow, MODEL)
    rule, rule_slow = cm.view_rule(), cm_slow.view_rule()
    assert rule is not None and rule_slow is not None
    assert rule.merge_calls == 5.0 and rule_slow.merge_calls == pytest.approx(5.0 / 4)
    assert rule_slow.min_tokens == pytest.approx(4 * rule.min_tokens, abs=4)
    work = StepWork.build([300, 20], [(12000, 9000, 100), (16000, 2000), (3000,), (90,), (95,)], views=rule_slow)
    assert work.decode_split_parts and work.decode_group_views == 1
    calls = cm.num_attention_calls(work)
    assert calls == MODEL.num_layers * (len(work.decode_group_sizes) + sum(work.decode_split_parts) + 2)
    extra_s = cm_slow.step_time(work).time_s - cm.step_time(work).time_s
    assert extra_s == pytest.approx(calls * 3 * base.launch_overhead_s, rel=1e-9)
    assert cm_slow.step_time(work).overhead_s - cm.step_time(work).overhead_s == pytest.approx(extra_s, rel=1e-9)
    plain = cm.view_rule(part_kernels=8)  # parts in plain ops: seven more launches each
    assert plain is not None and plain.min_tokens == rule.min_tokens and plain.part_calls == pytest.approx(8.0)
    long_runs = [(12 * rule.min_tokens, 3 * rule.min_tokens), (14 * rule.min_tokens, 2 * rule.min_tokens)]
    assert StepWork.build((), long_runs, views=rule).decode_split_parts == (2, 2)
    assert StepWork.build((), long_runs, views=plain).decode_split_parts == ()
    free = CostModel(dataclasses.replace(base, launch_overhead_s=0.0), MODEL).view_rule()  # calls cost nothing
    assert free is not None and free.min_tokens == 1 and free.merge_calls == 5.0


def test_a_multi_run_prefill_pays_its_gather() -> None:
    """A prefill over several runs (prefill_attention's index_select of K and V) pays a gather
    kernel: the runs read, a buffer written, two launches per layer; the attention then reads
    the buffer. One run is read in place; ``ideal`` reads one run whatever it holds; a
    profile whose kernel reads runs in place (``in_place``) pays no gather."""
    prof = load_profile("mlu370-x4")
    cm, in_place = CostModel(prof, MODEL), CostModel(dataclasses.replace(prof, decode_attention="in_place"), MODEL)
    per_layer, bw, layers = MODEL.kv_bytes_per_token_per_layer, prof.stream_bandwidth_bytes_per_s, MODEL.num_layers
    runs = (16,) * 128  # a 2,048-token prompt in scattered pages: compute-bound attention either way
    one = StepWork.build([2048], prefill_read_runs=[(2048,)])
    paged = StepWork.build([2048], prefill_read_runs=[runs])
    gather_s = layers * (2048 * per_layer / cm.run_bandwidth(16) + 2048 * per_layer / bw)
    assert cm.step_time(paged).time_s - cm.step_time(one).time_s == pytest.approx(
        gather_s + layers * 2 * prof.launch_overhead_s, rel=1e-9)
    assert (cm.step_time(paged).gather_s, cm.step_time(one).gather_s) == (pytest.approx(gather_s, rel=1e-9), 0.0)
    assert cm.step_time(StepWork.build([2048])) == cm.step_time(one)  # no runs given: one run each
    assert in_place.step_time(paged).time_s == pytest.approx(in_place.step_time(one).time_s, rel=1e-9)
    assert cm.step_time(StepWork.build([2048], prefill_read_runs=[runs], stream_reads=True)) == \
        cm.step_time(StepWork.build([2048], stream_reads=True))
    # A short chunk over a long cached context is memory-bound: its read is charged.
    short = StepWork.build([8], prefill_cached_tokens=[30000], prefill_read_runs=[(30008,)])
    assert cm.step_time(short).memory_s >= layers * 30008 * per_layer / cm.run_bandwidth(30008)
    with pytest.raises(AssertionError, match="do not cover"):
        StepWork.build([10], prefill_read_runs=[(4,)])


def test_gathers_are_charged_where_the_profile_gathers() -> None:
    """``decode_attention: gather`` (the default: what models/attention.py issues) writes each
    gathered slot to a buffer and reads it back, and scores the padding; ``in_place`` does not.
    A view costs the same either way."""
    prof = load_profile("mlu370-x4")
    assert prof.decode_attention == "gather"
    gather, in_place = CostModel(prof, MODEL), CostModel(dataclasses.replace(prof, decode_attention="in_place"), MODEL)
    work = StepWork.build((), [(500,), (460,), (700,), (100,)])
    g, i = gather.step_time(work), in_place.step_time(work)
    per_layer = MODEL.kv_bytes_per_token_per_layer
    assert g.memory_s - i.memory_s == pytest.approx(
        MODEL.num_layers * 2 * 1000 * per_layer / prof.stream_bandwidth_bytes_per_s, rel=1e-9)
    assert g.flops - i.flops == pytest.approx(MODEL.num_layers * 4.0 * MODEL.num_heads * MODEL.head_dim * 40, rel=1e-9)
    assert g.kv_read_bytes == i.kv_read_bytes  # the KV read is the same; the buffer is extra traffic
    for ideal in (False, True):  # ideal runs the same attention code: it gathers too
        views = StepWork.build((), [(700,), (100,)], stream_reads=ideal)
        assert gather.step_time(views) == in_place.step_time(views)
        assert gather.step_time(StepWork.build((), [(500,), (460,)], stream_reads=ideal)).time_s > \
            in_place.step_time(StepWork.build((), [(500,), (460,)], stream_reads=ideal)).time_s


def test_stream_reads_price_every_read_at_the_stream_bandwidth() -> None:
    """``ideal``'s reads: sequential whatever the runs, so never slower than any layout."""
    cm = model_for("mlu370-x4")
    reads = [(300,), (16,) * 40, (900, 16)]
    # ideal's policy holds every request in one run (its reads are one run each, as
    # ``describe_step`` describes them), read at the stream bandwidth
    ideal = cm.step_time(StepWork.build((), [(sum(r),) for r in reads], stream_reads=True))
    for runs in ([(300,), (640,), (916,)], reads):
        assert ideal.time_s <= cm.step_time(StepWork.build((), runs)).time_s
    expected_read_s = MODEL.num_layers * sum(map(sum, reads)) * MODEL.kv_bytes_per_token_per_layer \
        / load_profile("mlu370-x4").stream_bandwidth_bytes_per_s
    contiguous = cm.step_time(StepWork.build((), [(300,), (640,), (916,)]))
    assert contiguous.memory_s - ideal.memory_s > 0
    assert ideal.kv_read_bytes == contiguous.kv_read_bytes
    assert expected_read_s < contiguous.memory_s


@pytest.mark.parametrize("profile_name", ["mlu370-x4", "cpu-host"])
def test_the_gather_time_is_what_the_gathers_add(profile_name: str) -> None:
    """``StepCost.gather_s``: the step priced as the code runs less the same step priced with
    a kernel that reads runs in place (no buffer, no padding scored; launches alike), also
    where decode attention is compute bound (cpu-host's one-row rate)."""
    prof = load_profile(profile_name)
    gather, in_place = CostModel(prof, MODEL), CostModel(dataclasses.replace(prof, decode_attention="in_place"), MODEL)
    work = StepWork.build((), [(500,), (460,), (300, 200), (4000,), (70,)] * 3)
    assert work.decode_gathered_tokens > 0 and work.decode_padding_tokens > 0
    g = gather.step_time(work)
    assert g.gather_s > 0 and in_place.step_time(work).gather_s == 0.0
    assert g.gather_s == pytest.approx(g.time_s - in_place.step_time(work).time_s, rel=1e-9)
