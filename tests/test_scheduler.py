"""Scheduler: FCFS admission, limits, decode grouping, preemption order, abort; driven by a
shape-only loop like emulator/replay.py."""

from __future__ import annotations

import pytest
import torch

from odma_mlu.config import ModelSpec, SchedulerConfig
from odma_mlu.engine.request import Sequence, SeqStatus
from odma_mlu.engine.scheduler import ScheduledBatch, Scheduler
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.paged import PagedPolicy
from odma_mlu.kvcache.policy import KVPolicy
from odma_mlu.kvcache.static import StaticPolicy

TINY = ModelSpec(name="tiny", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 intermediate_size=64, vocab_size=100, max_position_embeddings=4096, dtype="float32")


def arena(cap: int) -> KVArena:
    return KVArena(TINY, cap, dtype=torch.float32, shape_only=True)


def seq(rid: str, prompt: int, max_new: int, true: int, arrival: float = 0.0) -> Sequence:
    return Sequence(request_id=rid, prompt_tokens=prompt, max_new_tokens=max_new, arrival_s=arrival,
                    true_output_tokens=true)


def sched(policy: KVPolicy, **kw: object) -> Scheduler:
    return Scheduler(policy, SchedulerConfig(**kw), max_context_tokens=4096)  # type: ignore[arg-type]


def step(s: Scheduler) -> tuple[ScheduledBatch, list[Sequence]]:
    """One shape-only engine step: every scheduled sequence gains a token; it ends at its true length."""
    batch = s.schedule()
    done = []
    for q in batch.all_seqs():
        q.num_generated += 1
        if q.num_generated >= q.true_output_tokens:
            q.finish_reason = "length"
            done.append(q)
    s.postprocess(batch, done)
    return batch, done


def ids(seqs: object) -> list[str]:
    return [q.request_id for q in seqs]  # type: ignore[attr-defined]


def run_all(s: Scheduler, limit: int = 10_000) -> list[Sequence]:
    finished: list[Sequence] = []
    for _ in range(limit):
        if not s.has_work:
            return finished
        batch, done = step(s)
        assert not batch.is_empty
        finished += done
        s.policy.check_integrity()
    raise AssertionError("did not drain")


def test_fcfs_admission_blocks_on_the_head() -> None:
    p = StaticPolicy(arena(100))
    s = sched(p)
    a, b, c, d = seq("a", 10, 30, 5, 0), seq("b", 10, 30, 5, 1), seq("c", 10, 50, 5, 2), seq("d", 1, 1, 1, 3)
    for q in (a, b, c, d):
        s.add(q)
    batch, _ = step(s)
    # a and b (40 each) fit; c (60) does not; d would fit but must not overtake c
    assert ids(batch.prefill) == ["a", "b"] and not batch.decode
    assert ids(s.waiting) == ["c", "d"]
    assert [q.kv_tokens for q in (a, b)] == [10, 10]
    assert a.first_capacity_tokens == 40 and c.first_capacity_tokens is None
    finished: list[Sequence] = []
    for _ in range(4):
        batch, done = step(s)
        assert ids(batch.decode) == ["a", "b"] and not batch.prefill
        finished += done
    assert ids(finished) == ["a", "b"] and p.reserved_tokens() == 0
    batch, done = step(s)
    assert ids(batch.prefill) == ["c", "d"] and ids(done) == ["d"]
    assert ids(run_all(s)) == ["c"]
    assert p.num_live() == 0


def test_max_num_seqs() -> None:
    p = StaticPolicy(arena(10_000))
    s = sched(p, max_num_seqs=2)
    qs = [seq(f"r{i}", 5, 10, 3, i) for i in range(5)]
    for q in qs:
        s.add(q)
    batch, _ = step(s)
    assert ids(batch.prefill) == ["r0", "r1"] and len(s.running) == 2
    batch, _ = step(s)
    assert not batch.prefill and ids(batch.decode) == ["r0", "r1"]
    batch, done = step(s)
    assert ids(done) == ["r0", "r1"]
    batch, _ = step(s)
    assert ids(batch.prefill) == ["r2", "r3"]
    assert len(run_all(s)) == 3


def test_max_num_batched_tokens() -> None:
    """Whole prefill (chunking off): prompts are admitted whole while the budget holds them."""
    p = StaticPolicy(arena(10_000))
    s = sched(p, max_num_batched_tokens=64, enable_chunked_prefill=False)
    for i in range(4):
        s.add(seq(f"r{i}", 30, 10, 5, i))
    batch, _ = step(s)
    assert ids(batch.prefill) == ["r0", "r1"]  # 60 tokens; a third would make 90
    batch, _ = step(s)
    # budget 64 - 2 decodes = 62 -> two more 30-token prompts
    assert ids(batch.prefill) == ["r2", "r3"] and ids(batch.decode) == ["r0", "r1"]
    run_all(s)


def test_an_over_budget_prompt_runs_alone() -> None:
    """Whole prefill (chunking off): a prompt above the budget runs as the step's only prefill."""
    p = StaticPolicy(arena(10_000))
    s = sched(p, max_num_batched_tokens=64, enable_chunked_prefill=False)
    s.add(seq("big", 100, 10, 2, 0))
    s.add(seq("small", 5, 10, 2, 1))
    batch, _ = step(s)
    assert ids(batch.prefill) == ["big"]
    batch, _ = step(s)
    assert ids(batch.prefill) == ["small"] and ids(batch.decode) == ["big"]
    run_all(s)


def test_decode_groups_are_decided_by_span_class_in_one_place() -> None:
    from odma_mlu.engine.step_work import decode_group_key, describe_step

    p = StaticPolicy(arena(10_000))
    s = sched(p)
    prompts = {"a": 100, "b": 30, "c": 106, "d": 20, "e": 40}
    for i, (rid, prompt) in enumerate(prompts.items()):
        s.add(seq(rid, prompt, 50, 5, i))
    step(s)
    batch, _ = step(s)
    assert ids(batch.decode) == ["a", "b", "c", "d", "e"]  # the scheduler does not group
    work = describe_step(batch, p)
    # contexts 101, 31, 107, 21, 41 -> span classes 112 (a, c) and 64 (b, d, e)
    assert [decode_group_key(q.num_tokens) for q in batch.decode] == [112, 64, 112, 64, 64]
    assert work.decode_group_sizes == (3, 2) and work.decode_group_views == 0
    assert work.decode_read_runs == tuple((q.num_tokens,) for q in batch.decode)


def test_preemption_takes_the_newest_and_requeues_it_at_the_front() -> None:
    p = PagedPolicy(arena(64), page_tokens=8)  # 8 pages
    s = sched(p)
    a, b, c = seq("a", 16, 40, 30, 0.0), seq("b", 16, 40, 30, 1.0), seq("c", 16, 40, 30, 2.0)
    w = seq("w", 30, 10, 2, 3.0)  # needs 4 pages: waits
    for q in (a, b, c, w):
        s.add(q)
    batch, _ = step(s)
    assert ids(batch.prefill) == ["a", "b", "c"] and ids(s.waiting) == ["w"]
    # each holds 2 pages (16 tokens), two pages free; each needs a third page for token 17:
    # a and b take the free ones; c, the newest with nobody newer to evict, is preempted
    batch, _ = step(s)
    assert ids(batch.decode) == ["a", "b"] and ids(batch.preempted) == ["c"]
    assert not batch.prefill  # no admission in a step that preempted
    assert ids(s.waiting) == ["c", "w"]  # back at the FRONT
    assert c.status == SeqStatus.WAITING and c.kv_tokens == 0 and c.num_preemptions == 1
    assert c.num_generated == 1  # generated tokens are kept and recomputed
    assert s.num_preemptions == 1
    p.check_integrity()
    finished = run_all(s)
    assert sorted(ids(finished)) == ["a", "b", "c", "w"]
    assert all(q.num_generated == q.true_output_tokens for q in finished)
    assert p.reserved_tokens() == 0


def test_preemption_evicts_the_newest_running_for_an_older_one() -> None:
    p = PagedPolicy(arena(48), page_tokens=8)  # 6 pages
    s = sched(p)
    a, b, c = seq("a", 15, 33, 30, 0.0), seq("b", 8, 40, 30, 1.0), seq("c", 8, 40, 30, 2.0)
    for q in (a, b, c):
        s.add(q)
    batch, _ = step(s)  # a: 2 pages (15), b: 1, c: 1; 2 free
    assert ids(batch.prefill) == ["a", "b", "c"]
    batch, _ = step(s)  # needs 16, 9, 9: b and c take the two free pages
    assert ids(batch.decode) == ["a", "b", "c"] and not batch.preempted
    # next step a needs 17 -> a third page; none free: the newest (c) is evicted for it
    batch, _ = step(s)
    assert ids(batch.preempted) == ["c"] and sorted(ids(batch.decode)) == ["a", "b"]
    assert ids(s.waiting) == ["c"] and c.num_preemptions == 1 and a.num_preemptions == 0
    p.check_integrity()
    finished = run_all(s)
    assert sorted(ids(finished)) == ["a", "b", "c"]
    assert all(q.num_generated == 30 for q in finished)


def test_preempted_request_is_admitted_before_later_arrivals() -> None:
    p = PagedPolicy(arena(48), page_tokens=8)  # 6 pages
    s = sched(p)
    a, b = seq("a", 8, 40, 30, 0.0), seq("b", 15, 33, 30, 1.0)
    late = seq("late", 40, 8, 3, 5.0)  # 5 pages: cannot start while a and b run
    s.add(a)
    s.add(b)
    step(s)
    s.add(late)
    for _ in range(60):
        batch, _ = step(s)
        if batch.preempted:
            break
    assert ids(batch.preempted) == ["b"]
    assert ids(s.waiting) == ["b", "late"]
    batch, _ = step(s)
    while not batch.prefill:
        batch, _ = step(s)
    assert ids(batch.prefill) == ["b"]
    run_all(s)
    assert all(q.is_finished and q.num_generated == q.true_output_tokens for q in (a, b, late))


def test_preemption_order_invariants_randomized() -> None:
    """Paged, distinct arrivals, heavy pressure: every preemption takes the newest running
    requests, and they come back at the front of the queue in arrival order."""
    import random

    rng = random.Random(0)
    p = PagedPolicy(arena(256), page_tokens=8)
    s = sched(p, max_num_seqs=32)
    all_seqs = []
    for i in range(60):
        prompt = rng.randint(1, 60)
        max_new = rng.randint(1, 256 - prompt)
        q = seq(f"r{i}", prompt, max_new, rng.randint(1, max_new), float(i))
        all_seqs.append(q)
        s.add(q)
    preemptions = 0
    for _ in range(20_000):
        if not s.has_work:
            break
        before = sorted(s.running, key=lambda q: q.arrival_s)
        batch, _ = step(s)
        assert not batch.is_empty
        k = len(batch.preempted)
        if k:
            preemptions += k
            assert ids(batch.preempted) == ids(before[::-1][:k])
            assert ids(list(s.waiting)[:k]) == ids(batch.preempted[::-1])
            assert not batch.prefill
        p.check_integrity()
        assert s.live_kv_tokens() <= p.reserved_tokens() <= 256
    assert not s.has_work and preemptions > 0
    assert all(q.is_finished and q.num_generated == q.true_output_tokens for q in all_seqs)
    assert p.reserved_tokens() == 0


def test_abort_frees_kv() -> None:
    p = StaticPolicy(arena(100))
    s = sched(p)
    a, b, c = seq("a", 10, 30, 20, 0), seq("b", 10, 30, 20, 1), seq("c", 10, 30, 20, 2)
    for q in (a, b, c):
        s.add(q)
    step(s)
    assert ids(s.running) == ["a", "b"] and p.reserved_tokens() == 80
    got = s.abort("a")
    assert got is a and a.status == SeqStatus.FINISHED and a.finish_reason == "abort"
    assert p.reserved_tokens() == 40 and p.num_live() == 1
    got = s.abort("c")  # waiting: just dropped
    assert got is c and not s.waiting and c.finish_reason == "abort"
    assert s.abort("nope") is None
    p.check_integrity()
    assert ids(run_all(s)) == ["b"]
    assert p.reserved_tokens() == 0


@pytest.mark.parametrize("n", [12])
def test_offline_ties_preempt_in_admission_order(n: int) -> None:
    """All arrivals at 0 (offline replay): 'newest' is the most recently admitted, not the
    lexicographically largest id ('r10' was admitted after 'r9')."""
    p = PagedPolicy(arena(16 * n), page_tokens=8)
    s = sched(p)
    qs = [seq(f"r{i}", 16, 100, 60, 0.0) for i in range(n)]
    for q in qs:
        s.add(q)
    step(s)  # each holds 2 pages: the arena is full
    batch, _ = step(s)
    # r0 needs a page: the newest (r11) goes, r1 takes the other freed page, and so on
    assert batch.preempted
    assert ids(batch.preempted)[0] == f"r{n - 1}"
    finished = run_all(s)
    assert len(finished) == n


def test_all_running_requeued_in_one_step_still_makes_progress() -> None:
    """S3: requests admitted together with the same bucket overflow in the same step. Every
    running request is preempted (REQUEUE); the step must then re-admit them with the next
    bucket instead of returning an empty batch (the replay treats that as a deadlock)."""
    from odma_mlu.kvcache.s3 import S3Policy
    from odma_mlu.predictor.base import LengthPrediction

    p = S3Policy(arena(1000), num_buckets=10)
    s = sched(p)
    qs = [seq(f"r{i}", 10, 100, 50, 0.0) for i in range(3)]
    for q in qs:
        q.prediction = LengthPrediction.from_values([15] * 5, 100)  # bucket 20
        s.add(q)
    for _ in range(21):  # prefill, then KV 11..30
        batch, _ = step(s)
        assert not batch.preempted
    batch, _ = step(s)  # every request needs slot 31 of 30
    assert ids(batch.preempted) == ["r0", "r1", "r2"]  # REQUEUE: each preempts itself, oldest first
    assert not batch.is_empty and sorted(ids(batch.prefill)) == ["r0", "r1", "r2"]
    assert [p.location(q.request_id).capacity_tokens for q in qs] == [10 + 30] * 3
    assert p.overflowed_requests == 3
    run_all(s)
    assert all(q.num_generated == 50 for q in qs) and p.reserved_tokens() == 0


def test_every_admitted_request_is_predicted_however_many_a_step_admits() -> None:
    """Predictions are made for the head of the queue in batches of PREDICT_BATCH; a step
    that admits more than one batch (a burst of short prompts) must predict the next batch
    before admitting from it, so the policy never sees a request without its prediction."""
    from odma_mlu.engine.scheduler import PREDICT_BATCH
    from odma_mlu.predictor.base import RequestFeatures
    from odma_mlu.predictor.simple import SimplePredictor

    seen: list[bool] = []

    class Recording(PagedPolicy):
        uses_prediction = True

        def reserve(self, req):  # type: ignore[no-untyped-def]
            seen.append(req.prediction is not None)
            return super().reserve(req)

    s = Scheduler(Recording(arena(100_000), page_tokens=16), SchedulerConfig(max_num_batched_tokens=8192),
                  max_context_tokens=4096, predictor=SimplePredictor())
    n = 3 * PREDICT_BATCH
    for i in range(n):
        q = seq(f"r{i}", 8, 16, 4)
        q.features = RequestFeatures(8, 16)
        s.add(q)
    batch = s.schedule()
    assert len(batch.prefill) == n and len(seen) == n and all(seen)
