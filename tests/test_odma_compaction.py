"""ODMA's compaction (``OdmaPolicy._compact``): where the device reads a long one-run decode
in place, a blocked request past ``compact_from_tokens`` is copied into one run, others'
runs moved out of a window for it, every move in one batch that reads before it writes
(``KVArena.copy_runs_at_once``). Every request's KV must read back unchanged at its new
slots, and the engine must stay token for token with transformers."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from odma_mlu.config import CacheConfig, OdmaConfig, SchedulerConfig
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.engine.step_work import StepWork, ViewRule
from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.kvcache.odma import OdmaPolicy
from odma_mlu.kvcache.policy import GrowStatus
from odma_mlu.models.attention import ForwardBatch, SequenceInput
from hf_reference import encode, hf_greedy
from policy_helpers import TINY, arena, pred, rr
from test_engine import PROMPTS, ConstantPredictor


class _ViewsCost:
    """Runs cost a little, copies less, memory a lot (no room held ahead), and a one-run
    decode of ``view`` tokens or more is read in place: compaction is on."""

    def __init__(self, view: int | None) -> None:
        self.view = view

    def read_run_s(self, tokens: int) -> float:
        return 1e-3 + tokens * 1e-6

    def copy_s(self, tokens: int, num_pending: int = 0) -> float:
        return tokens * 1e-7

    def decode_fixed_s(self) -> float:
        return float("inf")

    def view_min_tokens(self) -> int | None:
        return self.view


def test_moves_at_once_read_every_source_before_writing() -> None:
    ar = arena(64, real=True)
    for layer in range(TINY.num_layers):
        ar.k[layer][:, 0, 0] = torch.arange(64, dtype=torch.float32)
    ar.copy_runs_at_once([(0, 10, 4), (10, 0, 4), (20, 22, 4)])  # a swap, and an overlapping shift
    got = ar.k[0][:, 0, 0].tolist()
    assert got[0:4] == [10, 11, 12, 13] and got[10:14] == [0, 1, 2, 3] and got[22:26] == [20, 21, 22, 23]
    assert ar.take_issued_copies().batch_sizes == (3,) and ar.moved_bytes == 12 * ar.bytes_per_token
    with pytest.raises(AssertionError, match="write the same slots"):
        ar.copy_runs_at_once([(0, 30, 4), (8, 32, 4)])


def _values(rid: str, t_from: int, t_to: int) -> torch.Tensor:
    return torch.arange(t_from, t_to, dtype=torch.float32) + int(rid[1:]) * 1000


def _write(p: OdmaPolicy, rid: str, t_from: int, t_to: int) -> None:
    slots = p.location(rid).slot_table()[t_from:t_to]
    for layer in range(TINY.num_layers):
        p.arena.k[layer][slots, 0, 0] = _values(rid, t_from, t_to)


def _check(p: OdmaPolicy, written: dict[str, int]) -> None:
    p.arena.take_issued_copies()  # the engine runs the step's copies before its forward
    for rid, n in written.items():
        slots = p.location(rid).slot_table()[:n]
        for layer in range(TINY.num_layers):
            assert torch.equal(p.arena.k[layer][slots, 0, 0], _values(rid, 0, n)), f"{rid} lost its KV"


def _churn(seed: int, view: int | None) -> tuple[OdmaPolicy, int]:
    """Random arrivals, growth and departures on a small saturated arena, every request's KV
    checked after every operation; (the policy, requests moved for others)."""
    rng = random.Random(seed)
    cfg = OdmaConfig(safety_fraction=rng.choice([0.0, 0.2]), chunk_tokens=1, num_buckets=4,
                     compact_from_tokens=rng.choice([12, 24]), compact_room_fraction=rng.choice([0.0, 0.25]),
                     compact_copy_fraction=random.Random(f"slides {seed}").choice([0.008, 1.0]),
                     compact_room_min_fraction=random.Random(f"room {seed}").choice([0.0, 0.02, 0.25]))
    p = OdmaPolicy(arena(360, real=True), 200, cfg, granule_tokens=rng.choice([1, 4]), run_cost=_ViewsCost(view))
    written: dict[str, int] = {}
    displaced = 0
    for step in range(600):
        if len(written) < 10 and rng.random() < 0.3:
            rid = f"r{step}"
            prompt = rng.randint(2, 20)
            if p.reserve(rr(rid, prompt, 200, prediction=pred([3, 4, 5, 6, 8], 200))) is not None:
                _check(p, written)
                _write(p, rid, 0, prompt)
                written[rid] = prompt
        for rid in sorted(written):
            if rng.random() < 0.03 or written[rid] >= 180:
                p.release(rid, written.pop(rid))
                continue
            n = written[rid]
            res = p.ensure_capacity(rid, n + 1)
            displaced += len(p.take_moved())
            if res.status != GrowStatus.OK:
                p.release(rid, None)
                written.pop(rid)
                continue
            _check(p, written)
            _write(p, rid, n, n + 1)
            written[rid] = n + 1
        if step % 50 == 0:
            p.check_integrity()
    p.check_integrity()
    return p, displaced


@pytest.mark.parametrize("seed", range(6))
def test_compaction_keeps_every_requests_kv(seed: int) -> None:
    """Compactions happen, with other requests moved out of the way, and nobody's KV changes."""
    p, displaced = _churn(seed, view=16)
    assert p.compactions > 0 and displaced > 0, (p.compactions, displaced)


def test_compaction_is_off_where_nothing_is_gathered() -> None:
    """No view length (the device reads runs in place, or no profile): nothing compacts."""
    p, _ = _churn(0, view=None)
    assert p.compactions == 0 and p.new_runs > 0


def test_a_long_one_run_decode_is_read_alone_in_place() -> None:
    """``ViewRule``: a decode in one run at least its view length leaves its span class's
    gathered group for a group of its own, a view, in the step description and in the
    forward batch alike; shorter or multi-run ones stay gathered."""
    reads = [(110,), (106,), (60, 40), (98,)]  # one span class (97..112)
    plain = StepWork.build((), reads)
    viewed = StepWork.build((), reads, views=ViewRule(105))
    assert (plain.decode_group_sizes, plain.decode_group_views, plain.decode_gathered_tokens) == ((4,), 0, 440)
    assert sorted(viewed.decode_group_sizes) == [1, 1, 2] and viewed.decode_group_views == 2
    assert viewed.decode_gathered_tokens == 2 * 100  # the multi-run 100 and the 98, padded to 100
    locs = [KVLocation(((0, 120),)), KVLocation(((200, 110),)), KVLocation(((400, 60), (500, 60))),
            KVLocation(((600, 100),))]
    seqs = [SequenceInput((1,), sum(r) - 1, loc) for r, loc in zip(reads, locs)]
    fb = ForwardBatch.build(seqs, views=ViewRule(105))
    assert len(fb.decode_groups) == 3 and sum(g.view_start is not None for g in fb.decode_groups) == 2
    assert len(ForwardBatch.build(seqs).decode_groups) == 1


def test_engine_with_views_and_compaction_matches_transformers(tiny_model_dir: Path,
                                                              cpu_host_call_one_launch: Path) -> None:
    """The CPU engine priced by the cpu-host profile (a call priced as one launch: view length
    53 tokens for the tiny model) reads one-run decodes past its view length in place; a
    small arena and compaction from 8 tokens make it compact and move others' runs while
    every output stays transformers' greedy one."""
    max_new = 180
    reference = hf_greedy(tiny_model_dir, encode(tiny_model_dir, PROMPTS), max_new)
    odma = OdmaConfig(safety_fraction=0.0, num_buckets=4, chunk_tokens=1, compact_from_tokens=8,
                      compact_room_fraction=0.25)
    eng = LLMEngine(tiny_model_dir, kv_policy="odma", backend="cpu", kv_capacity_tokens=640,
                    predictor=ConstantPredictor(1), cache=replace(CacheConfig(), odma=odma, watermark_fraction=0.0),
                    scheduler=replace(SchedulerConfig(), max_new_tokens=max_new), profile=str(cpu_host_call_one_launch))
    assert eng.views is not None and eng.views.min_tokens < max_new
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    eng.policy.check_integrity()
    assert [list(o.token_ids) for o in outs] == reference
    assert eng.policy.compactions > 0 and eng.arena.moved_bytes > 0  # type: ignore[attr-defined]


def test_replaced_runs_leave_the_indexes_before_new_ones_enter() -> None:
    """A compaction's pieces may end where another moved run ended (in the part of the window's
    stretch past the window). Found on ServeGen: handled one run at a time, the second
    removal took the first's new tail entry with it."""
    from odma_mlu.kvcache.extent import Extent, ExtentAllocator
    from odma_mlu.kvcache.odma_runs import OdmaRequest, RunBook

    region = ExtentAllocator(64)
    book = RunBook()
    y = OdmaRequest("y", 2, 64, 8, 8, 4, False)
    z = OdmaRequest("z", 2, 64, 8, 8, 4, False)
    for r, ext in ((y, region.allocate_at(0, 4)), (z, region.allocate_at(10, 4))):
        assert ext is not None
        book.reqs[r.request_id] = r
        book.add_run(r, region, ext)
    region.free(Extent(0, 4))
    region.free(Extent(10, 4))
    y_piece, z_piece = region.allocate_at(10, 4), region.allocate_at(20, 4)  # y ends where z ended
    assert y_piece is not None and z_piece is not None
    book.replace_runs([(y, Extent(0, 4), [(region, y_piece)]), (z, Extent(10, 4), [(region, z_piece)])])
    book.check_integrity(1)
    assert book.tail_rooms == {14: 4, 24: 4} and book.owner_at == {10: y, 20: z}


def _placed(p: OdmaPolicy, rid: str, live: int, runs: list[tuple[int, int]], pinned: bool = False) -> None:
    """Put request ``rid`` with ``live`` tokens in ``runs`` (start, granules) of ``p``'s main region."""
    from odma_mlu.kvcache.odma_runs import OdmaRequest

    r = OdmaRequest(rid, 2, 200, live, live, live, False, pinned=pinned)
    p.book.reqs[rid] = r
    for start, n in runs:
        ext = p.main.allocate_at(start, n)
        assert ext is not None
        p.book.add_run(r, p.main, ext)
    p._claims_total += r.claim_tokens


def _policy(capacity: int, view: int) -> OdmaPolicy:
    cfg = OdmaConfig(safety_fraction=0.0, chunk_tokens=1, compact_from_tokens=8, compact_room_fraction=0.0)
    return OdmaPolicy(arena(capacity), 200, cfg, run_cost=_ViewsCost(view))


def test_a_longer_request_displaces_a_shorter_compacted_one() -> None:
    """A window may hold another compacted (one-run, past ``compact_from_tokens``) request only
    where that one is shorter: the longest requests keep their runs, and two requests never
    take a window from each other in turn. Pinned runs leave ``r`` one stretch that holds
    its window, through ``y``'s run."""
    for r_live, moved in ((30, True), (15, False)):
        p = _policy(34 + r_live, view=8)  # 10 free granules at the end
        half = r_live // 2
        _placed(p, "y", 20, [(0, 20)])  # compacted: one run of 20 live tokens
        _placed(p, "r", r_live, [(20, half), (22 + half, r_live - half)])
        _placed(p, "pin", 2, [(20 + half, 2), (22 + r_live, 2)], pinned=True)
        compacted = p._compact(p.book.reqs["r"], r_live + 1)
        assert compacted == moved and p.compactions == int(moved)
        assert p.take_moved() == (("y",) if moved else ())
        p.check_integrity()
        assert len(p.book.reqs["r"].runs) == (1 if moved else 2)
        assert p.book.reqs["r"].compact_retry_tokens == (0 if moved else r_live + 1)


def test_a_request_in_several_runs_retries_compaction_while_it_grows_in_place() -> None:
    """A request past the view length in several runs is gathered on every step, though it may
    grow in place for long in the run a failed compaction left it: it compacts at its next
    growth, or, after a compaction found no window, once it has grown by its room."""
    for retry_from, compacts in ((0, True), (1000, False)):
        p = _policy(100, view=16)
        _placed(p, "r", 20, [(0, 10), (30, 10)])  # room to grow in place at 40
        r = p.book.reqs["r"]
        r.compact_retry_tokens = retry_from
        res = p.ensure_capacity("r", 21)
        assert res.status == GrowStatus.OK and res.how == ("copied" if compacts else "in_place")
        assert len(r.runs) == (1 if compacts else 2) and p.compactions == int(compacts)
        p.check_integrity()


def test_where_no_window_qualifies_runs_slide_together_within_the_copy_budget() -> None:
    """A longer compacted request ``y`` splits the arena so that no window without it holds
    ``r``: the runs slide together instead, each whole (``y`` stays one run, its KV intact),
    if the copy budget allows; with no budget nothing moves."""
    for fraction, slides in ((1.0, True), (0.0, False)):
        cfg = OdmaConfig(safety_fraction=0.0, chunk_tokens=1, compact_from_tokens=8, compact_room_fraction=0.0,
                         compact_copy_fraction=fraction)
        p = OdmaPolicy(arena(44, real=True), 200, cfg, run_cost=_ViewsCost(8))
        _placed(p, "r1", 15, [(0, 7), (30, 8)])
        _placed(p, "r2", 20, [(10, 20)])  # y: compacted, longer than r1, between r1's runs
        p.asked_tokens = 10_000
        _write(p, "r1", 0, 15)
        _write(p, "r2", 0, 20)
        assert p._compact(p.book.reqs["r1"], 16) == slides
        assert p.slides == int(slides) and p.take_moved() == (("r2",) if slides else ())
        _check(p, {"r1": 15, "r2": 20})
        p.check_integrity()
        assert [len(p.book.reqs[rid].runs) for rid in ("r1", "r2")] == ([1, 1] if slides else [2, 1])


def test_churn_slides_runs_together_and_keeps_every_requests_kv() -> None:
    """Seed 4 of the churn gets the whole copy budget: some compactions slide, and the churn
    checks every request's KV after every operation."""
    p, _ = _churn(4, view=16)
    assert p.config.compact_copy_fraction == 1.0 and p.slides > 0


def test_a_piece_may_start_where_another_old_run_of_its_request_started() -> None:
    """``replace_runs`` matches each change to the run it replaces by the old runs' starts
    before any run changes: here ``y``'s first run moves to where its second run was."""
    from odma_mlu.kvcache.extent import Extent, ExtentAllocator
    from odma_mlu.kvcache.odma_runs import OdmaRequest, RunBook

    region = ExtentAllocator(64)
    book = RunBook()
    y = OdmaRequest("y", 2, 64, 8, 8, 8, False)
    book.reqs["y"] = y
    for start in (0, 10):
        ext = region.allocate_at(start, 4)
        assert ext is not None
        book.add_run(y, region, ext)
    region.free(Extent(10, 4))
    second = region.allocate_at(20, 4)
    region.free(Extent(0, 4))
    first = region.allocate_at(10, 4)
    assert first is not None and second is not None
    book.replace_runs([(y, Extent(0, 4), [(region, first)]), (y, Extent(10, 4), [(region, second)])])
    book.check_integrity(1)
    assert [e for _, e in y.runs] == [first, second]


def test_a_window_keeps_the_requests_first_run_where_it_is() -> None:
    """A window is chosen by the tokens it copies, the request's own included: a request
    blocked by a short run moves that run away and stays where it is, rather than copying
    itself into free memory."""
    cfg = OdmaConfig(safety_fraction=0.0, chunk_tokens=1, compact_from_tokens=8, compact_room_fraction=0.0)
    p = OdmaPolicy(arena(80, real=True), 200, cfg, run_cost=_ViewsCost(8))
    _placed(p, "r1", 20, [(0, 20)])
    _placed(p, "r2", 5, [(20, 5)])
    _write(p, "r1", 0, 20)
    _write(p, "r2", 0, 5)
    assert p._compact(p.book.reqs["r1"], 21)
    assert p.take_moved() == ("r2",) and p.book.reqs["r1"].runs[0][1].start == 0
    assert p.copied_tokens == 5  # r2's live tokens; r1's stayed
    _check(p, {"r1": 20, "r2": 5})
    p.check_integrity()


def test_a_compaction_holds_less_room_where_memory_is_short() -> None:
    """Room past the live tokens: ``compact_room_fraction`` of them where the free memory's
    share per live request allows, ``compact_room_min_fraction`` at saturation."""
    cfg = OdmaConfig(safety_fraction=0.0, chunk_tokens=1, compact_from_tokens=8, compact_room_fraction=0.1,
                     compact_room_min_fraction=0.02)
    for filler, held in ((0, 220), (1496, 204)):  # 1,500 granules free, or 4 (share: 2 per request)
        p = OdmaPolicy(arena(1700), 4000, cfg, run_cost=_ViewsCost(8))
        _placed(p, "r", 200, [(0, 100), (104, 100)])
        if filler:
            _placed(p, "f", filler, [(204, filler)])
        assert p._compact(p.book.reqs["r"], 201)
        r = p.book.reqs["r"]
        assert len(r.runs) == 1 and r.held_units == held, (filler, r.held_units)
        p.check_integrity()


def test_a_window_weighs_moving_a_compacted_request() -> None:
    """A shorter compacted request moved out of a window is gathered until it compacts again,
    which copies it once more: a window weighs its tokens ``COMPACTED_MOVE_WEIGHT`` times, so
    moving 10 tokens of another's second run and 25 of ``r`` (35) beats moving the compacted
    ``y``'s 10 with ``r`` staying (10 x 4 + 10 = 50). ``w``, compacted and as long as ``r``,
    may not move at all."""
    from odma_mlu.kvcache.odma_compaction import COMPACTED_MOVE_WEIGHT

    assert COMPACTED_MOVE_WEIGHT * 10 + 10 > 35 > 10 + 10
    p = _policy(100, view=8)
    _placed(p, "r", 25, [(0, 15), (90, 10)])
    _placed(p, "y", 10, [(15, 10)])  # compacted, shorter than r: may move, at a price
    _placed(p, "z", 20, [(45, 10), (80, 10)])  # two runs: not compacted
    _placed(p, "w", 25, [(55, 25)])  # compacted, as long as r: never moves
    assert p._compact(p.book.reqs["r"], 26)
    assert p.take_moved() == ("z",)
    assert [e for _, e in p.book.reqs["y"].runs][0].start == 15 and p.book.reqs["r"].runs[0][1].start == 25
    p.check_integrity()
