"""KV copies run as one batch a step (``KVArena.copy_run``, ``take_issued_copies``): nothing
moves until the batch runs, the batch equals copying in order, a copy that depends on a
pending one runs the batch first, and the step-cost function charges what each batch issues."""

from __future__ import annotations

import pytest
import torch

from emulator.cost_model import CostModel
from emulator.profile import load_profile
from odma_mlu.config import load_model_spec
from odma_mlu.engine.step_work import StepWork
from odma_mlu.kvcache.arena import IssuedCopies, KVArena, KVLocation
from policy_helpers import TINY


def _filled(cap: int = 128) -> KVArena:
    ar = KVArena(TINY, cap, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    for t in (*ar.k, *ar.v):
        t.copy_(torch.randn(t.shape, generator=gen))
    return ar


def _copied_in_order(ar: KVArena, copies: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    out = [t.clone() for t in (*ar.k, *ar.v)]
    for src, dst, n in copies:
        for t in out:
            t[dst:dst + n] = t[src:src + n].clone()
    return out


def _run(ar: KVArena, copies: list[tuple[int, int, int]]) -> IssuedCopies:
    for c in copies:
        ar.copy_run(*c)
    return ar.take_issued_copies()


def test_copies_wait_for_the_batch_and_equal_copying_in_order() -> None:
    ar = _filled()
    copies = [(0, 40, 8), (50, 60, 4), (100, 0, 8)]  # the third writes what the first reads
    want = _copied_in_order(ar, copies)
    before = [t.clone() for t in (*ar.k, *ar.v)]
    for c in copies:
        ar.copy_run(*c)
    assert ar.num_pending_copies == 3
    assert all(torch.equal(a, b) for a, b in zip((*ar.k, *ar.v), before)), "a copy ran before its batch"
    assert ar.take_issued_copies() == IssuedCopies((8, 4, 8), (3,))
    assert all(torch.equal(a, b) for a, b in zip((*ar.k, *ar.v), want))
    assert ar.num_pending_copies == 0 and ar.take_issued_copies() == IssuedCopies()


@pytest.mark.parametrize("copies", [
    [(0, 40, 8), (40, 80, 8)],  # reads what the first writes: a chain
    [(0, 40, 8), (100, 44, 8)],  # writes where the first writes
    [(0, 5, 10), (10, 8, 10)],  # overlapping ranges, forwards then backwards
])
def test_a_copy_depending_on_a_pending_one_runs_the_batch_first(copies: list[tuple[int, int, int]]) -> None:
    ar = _filled()
    want = _copied_in_order(ar, copies)
    assert _run(ar, copies) == IssuedCopies(tuple(n for _, _, n in copies), (1, 1))
    assert all(torch.equal(a, b) for a, b in zip((*ar.k, *ar.v), want))
    assert ar.moved_bytes == sum(n for _, _, n in copies) * ar.bytes_per_token


def test_swaps_see_the_pending_copies() -> None:
    ar = _filled()
    want = ar.k[0][0:8].clone()
    ar.copy_run(0, 40, 8)
    host = ar.swap_out(KVLocation(((40, 8),)), 8)
    assert torch.equal(host.k[0], want)
    assert ar.take_issued_copies() == IssuedCopies((8,), (1,))


def test_the_step_cost_charges_each_batch_once() -> None:
    spec = load_model_spec()
    cm = CostModel(load_profile("mlu370-x4"), spec)
    launch = cm.profile.launch_overhead_s
    base = cm.step_time(StepWork.build((), [(500,)] * 8)).time_s

    def extra(copies: IssuedCopies) -> float:
        return cm.step_time(StepWork.build((), [(500,)] * 8, copies)).time_s - base

    one, three = IssuedCopies((300,), (1,)), IssuedCopies((300, 16, 64), (3,))
    assert extra(one) == pytest.approx(cm.copy_bytes_s(300) + 2 * spec.num_layers * launch, rel=1e-9)
    assert extra(three) == pytest.approx(sum(cm.copy_bytes_s(n) for n in (300, 16, 64))
                                         + (4 * spec.num_layers + 2) * launch, rel=1e-9)
    assert cm.step_time(StepWork.build((), [(500,)] * 8, three)).copy_s == pytest.approx(
        sum(cm.copy_bytes_s(n) for n in (300, 16, 64)), rel=1e-9)
    # the pricing's marginal copies add up to the batch
    assert sum(cm.copy_s(n, i) for i, n in enumerate((300, 16, 64))) == pytest.approx(extra(three), rel=1e-9)
    # a short run's bytes cost more than at the stream rate: each copy reads and writes a run
    assert cm.copy_bytes_s(16) > 2 * 16 * cm.kv_bytes_per_token / cm.profile.stream_bandwidth_bytes_per_s
