"""Randomized policy sequences (integrity after every step) and bad input through the
scheduler, for every KV policy. Helpers and the ODMA test config come from test_policies."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from odma_mlu.config import CacheConfig, SchedulerConfig
from odma_mlu.engine.request import Sequence, SeqStatus
from odma_mlu.engine.scheduler import Scheduler
from odma_mlu.errors import RequestRejected
from odma_mlu.kvcache.factory import POLICY_NAMES, make_policy
from odma_mlu.kvcache.policy import GrowStatus, ReserveRequest
from policy_helpers import CopiesAlwaysPay, arena, pred
from test_odma_policy import CFG


# -- randomized: every policy, integrity after every step --------------------------------------
def _make(name: str, cap: int, elastic: bool = False, priced: bool = False) -> object:
    cache = CacheConfig(page_size_tokens=8, s3_num_buckets=4,
                        odma=replace(CFG, elastic=elastic, chunk_tokens=4), watermark_fraction=0.05)
    return make_policy(name, arena(cap), cache, 64, run_cost=CopiesAlwaysPay() if priced else None)


OPS = st.lists(st.tuples(st.sampled_from(["reserve", "step", "step", "step", "finish", "preempt"]),
                         st.integers(0, 10_000), st.integers(0, 10_000)), min_size=1, max_size=80)


@pytest.mark.parametrize("name", [*POLICY_NAMES, "odma-elastic", "odma-moves"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, cap=st.integers(40, 300))
def test_random_sequences_keep_integrity(name: str, ops: list[tuple[str, int, int]], cap: int) -> None:
    policy = _make("odma" if name.startswith("odma") else name, cap, elastic=name != "odma",
                   priced=name == "odma-moves")
    live: dict[str, list[int]] = {}  # id -> [prompt, max_new, tokens needed so far, true]
    waiting: dict[str, list[int]] = {}
    n = 0
    for op, x, y in ops:
        if op == "reserve":
            if waiting and x % 2:
                rid = sorted(waiting)[y % len(waiting)]
                prompt, max_new, tokens, true = waiting[rid]
            else:
                rid = f"r{n}"
                n += 1
                prompt, max_new = 1 + x % 30, 1 + y % 64
                tokens, true = prompt, 1 + (x * 7 + y) % max_new
            lo = 1 + (x % 40)
            prediction = pred([lo, lo * 1.2, lo * (1.5 + y % 5), lo * 4, lo * (2 + y % 9)], max_new)
            req = ReserveRequest(rid, prompt, max_new, tokens, prediction, true)
            loc = policy.reserve(req)
            if loc is not None:
                assert loc.capacity_tokens >= tokens
                live[rid] = [prompt, max_new, tokens, true]
                waiting.pop(rid, None)
            elif rid not in waiting:
                waiting[rid] = [prompt, max_new, tokens, true]
        elif live:
            rid = sorted(live)[x % len(live)]
            prompt, max_new, tokens, true = live[rid]
            if op == "step":
                if tokens + 1 > prompt + max_new:
                    continue
                res = policy.ensure_capacity(rid, tokens + 1)
                if res.status == GrowStatus.OK:
                    live[rid][2] = tokens + 1
                    assert policy.location(rid).capacity_tokens >= tokens + 1
                else:  # NO_ROOM or REQUEUE: the scheduler preempts it (recompute later)
                    policy.release(rid, None)
                    waiting[rid] = live.pop(rid)
            elif op == "finish":
                policy.release(rid, tokens - prompt)
                del live[rid]
            else:
                policy.release(rid, None)
                waiting[rid] = live.pop(rid)
        policy.check_integrity()
        for rid, (_, _, tokens, _) in live.items():  # a move keeps every other request's tokens held
            assert policy.location(rid).capacity_tokens >= tokens
        assert policy.num_live() == len(live)
        assert policy.reserved_tokens() <= cap
        if live:
            # no two live reservations share a slot
            slots: set[int] = set()
            for rid in live:
                loc = policy.location(rid)
                s = set(loc.slots(0, loc.capacity_tokens).tolist())
                assert not (s & slots)
                assert all(0 <= v < cap for v in s)
                slots |= s
    for rid in list(live):
        policy.release(rid, None)
        policy.check_integrity()
    assert policy.reserved_tokens() == 0 and policy.num_live() == 0


# -- bad input through the scheduler --------------------------------------------------------
def _seq(rid: str, prompt: int, max_new: int, true: int | None = None, arrival: float = 0.0) -> Sequence:
    return Sequence(request_id=rid, prompt_tokens=prompt, max_new_tokens=max_new, arrival_s=arrival,
                    true_output_tokens=true)


def _step(s: Scheduler) -> list[Sequence]:
    batch = s.schedule()
    done = []
    for q in batch.all_seqs():
        q.num_generated += 1
        if q.num_generated >= q.true_output_tokens:
            done.append(q)
    s.postprocess(batch, done)
    return done


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_scheduler_rejects_impossible_requests_without_disturbing_running(name: str) -> None:
    policy = _make(name, 256)
    s = Scheduler(policy, SchedulerConfig(max_num_seqs=8), max_context_tokens=200)
    good = [_seq(f"g{i}", 10 + i, 40, true=20 + i, arrival=float(i)) for i in range(3)]
    for g in good:
        s.add(g)
    for _ in range(3):
        _step(s)
    assert all(g.status == SeqStatus.RUNNING for g in good)
    reserved_before = policy.reserved_tokens()
    with pytest.raises(RequestRejected, match=r"prompt 190 \+ max_new_tokens 20 = 210 tokens exceeds the model "
                                              r"context of 200"):
        s.add(_seq("long", 190, 20))
    with pytest.raises(RequestRejected, match=r"prompt 250 \+ max_new_tokens 1 = 251 .*context of 200"):
        s.add(_seq("longer", 250, 1))
    with pytest.raises(RequestRejected, match=r"max_new_tokens=0"):
        s.add(_seq("zero", 10, 0))
    with pytest.raises(RequestRejected, match=r"max_new_tokens=-5"):
        s.add(_seq("neg", 10, -5))
    with pytest.raises(RequestRejected, match="empty prompt"):
        s.add(_seq("empty", 0, 10))
    # fits the context (no limit given) but not the KV the policy can ever hand one request
    s.max_context_tokens = None
    limit = policy.max_request_tokens()
    with pytest.raises(RequestRejected, match=rf"needs up to {limit + 1} KV tokens.*at most {limit}.*capacity 256"):
        s.add(_seq("huge", 100, limit + 1 - 100))
    assert [q.request_id for q in s.waiting] == [] and len(s.running) == 3
    assert policy.reserved_tokens() == reserved_before
    finished: list[Sequence] = []
    for _ in range(200):
        if not s.has_work:
            break
        finished += _step(s)
    assert sorted(q.request_id for q in finished) == ["g0", "g1", "g2"]
    assert [g.num_generated for g in good] == [20, 21, 22]
    assert policy.reserved_tokens() == 0 and policy.num_live() == 0
    policy.check_integrity()
