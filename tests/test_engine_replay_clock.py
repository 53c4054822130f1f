"""The emulated engine and the replay run the same scheduler, describe steps with the same
function and price them with the one step-cost function: on the same requests they must
produce the same schedule and the same clock."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from emulator.profile import load_profile
from emulator.replay import replay
from emulator.traces import Trace, TraceRequest
from odma_mlu.backends import get_backend
from odma_mlu.config import CacheConfig, SchedulerConfig, load_model_spec
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from test_engine import ConstantPredictor

MAX_NEW = 12
PROMPT_LENGTHS = (5, 9, 3, 14, 7, 11, 6, 8)


@pytest.mark.parametrize("policy", ["static", "odma", "paged", "ideal"])
def test_engine_and_replay_share_schedule_and_clock(tiny_model_dir: Path, policy: str) -> None:
    capacity = 64  # tight: forces waiting, and preemption for the growing policies
    sched = replace(SchedulerConfig(), max_new_tokens=MAX_NEW, max_num_seqs=8)
    cache = CacheConfig(page_size_tokens=4)
    backend = get_backend("emulated", profile="mlu370-x4", host="cpu")
    eng = LLMEngine(tiny_model_dir, kv_policy=policy, backend=backend, kv_capacity_tokens=capacity,
                    predictor=ConstantPredictor(4), cache=cache, scheduler=sched)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    for i, n in enumerate(PROMPT_LENGTHS):
        eng.add_request([3 + (i * 7 + j) % 50 for j in range(n)], params, request_id=f"r{i}")
    engine_steps = 0
    while eng.has_unfinished():
        eng.step()
        engine_steps += 1
    engine_clock_s = backend.clock.now_s  # type: ignore[attr-defined]

    trace = Trace("clock-test", "synthetic", tuple(TraceRequest(f"r{i}", 0.0, n, MAX_NEW)
                                                   for i, n in enumerate(PROMPT_LENGTHS)), MAX_NEW)
    res = replay(trace, policy, load_model_spec(), load_profile("mlu370-x4"), cache=cache, scheduler_config=sched,
                 max_new_tokens=MAX_NEW, capacity_tokens=capacity, predictor=ConstantPredictor(4))
    assert res.completed == len(PROMPT_LENGTHS) and res.lost == 0
    assert res.num_steps == engine_steps
    assert res.preemptions == eng.scheduler.num_preemptions
    assert engine_clock_s == pytest.approx(res.makespan_s, rel=1e-12)
    if policy in ("odma", "paged"):
        assert res.preemptions > 0, "the tight arena was meant to force preemption"
