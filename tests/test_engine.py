"""LLMEngine greedy output equals transformers' generate for every KV policy, including
forced overflow (an underestimating predictor), migration into the safety pool, and
preemption (an arena too small for the batch)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from odma_mlu.config import CacheConfig, OdmaConfig, SchedulerConfig
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.engine.step_work import ViewRule
from odma_mlu.errors import RequestRejected
from odma_mlu.predictor.base import LengthPrediction, LengthPredictor, RequestFeatures
from hf_reference import ENGINE_PROMPTS as PROMPTS, encode, hf_greedy
from policy_helpers import CopiesAlwaysPay

MAX_NEW = 24


class ConstantPredictor(LengthPredictor):
    """Predicts ``tokens`` for every request with a chosen spread (forces overflow / pool)."""

    def __init__(self, tokens: float, spread: float = 1.0) -> None:
        self.tokens = tokens
        self.spread = spread

    def predict(self, request: RequestFeatures) -> LengthPrediction:
        t = self.tokens
        return LengthPrediction.from_values([t, t, t, t, t * self.spread], request.max_new_tokens)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[list[int]]:
    return hf_greedy(tiny_model_dir, encode(tiny_model_dir, PROMPTS), MAX_NEW)


def _engine(model_dir: Path, policy: str, capacity: int, predictor: LengthPredictor | None = None,
            odma: OdmaConfig = OdmaConfig(), max_num_seqs: int = 64) -> LLMEngine:
    cache = replace(CacheConfig(), odma=odma)
    sched = replace(SchedulerConfig(), max_new_tokens=MAX_NEW, max_num_seqs=max_num_seqs)
    return LLMEngine(model_dir, kv_policy=policy, backend="cpu", kv_capacity_tokens=capacity, predictor=predictor,
                     cache=cache, scheduler=sched)


def _run(engine: LLMEngine) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    engine.policy.check_integrity()
    assert engine.policy.reserved_tokens() == 0 and engine.policy.num_live() == 0, "KV leaked after generate"
    return [list(o.token_ids) for o in outs]


@pytest.mark.parametrize("policy", ["static", "s3", "odma", "paged", "exact", "ideal"])
def test_greedy_matches_transformers_roomy(tiny_model_dir: Path, reference: list[list[int]], policy: str) -> None:
    eng = _engine(tiny_model_dir, policy, capacity=2048, predictor=ConstantPredictor(8))
    assert _run(eng) == reference


@pytest.mark.parametrize("policy", ["static", "s3", "odma", "paged", "exact", "ideal"])
def test_greedy_matches_under_preemption(tiny_model_dir: Path, reference: list[list[int]], policy: str) -> None:
    # Room for roughly two requests at a time: forces waiting and, for growing policies, preemption.
    eng = _engine(tiny_model_dir, policy, capacity=96, predictor=ConstantPredictor(2))
    assert _run(eng) == reference
    if policy in ("paged", "odma", "ideal"):
        assert eng.scheduler.num_preemptions > 0, "the small arena was meant to force preemption"


def test_odma_forced_multi_run_placements_match(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    # Underestimate (1 token), strict claims, no safety region: every request overflows its
    # claim while its neighbour sits right after it, so it goes on in new runs.
    eng = _engine(tiny_model_dir, "odma", capacity=1024, predictor=ConstantPredictor(1),
                  odma=OdmaConfig(safety_fraction=0.0, num_buckets=4, elastic=False))
    assert _run(eng) == reference
    st = eng.policy.stats()
    assert st.overflowed_requests == len(PROMPTS)
    assert st.new_runs > 0 and eng.arena.moved_bytes == 0


@pytest.mark.parametrize("policy, fused", [("odma", True), ("paged", True), ("odma", False)])
def test_split_reads_match(tiny_model_dir: Path, reference: list[list[int]], policy: str, fused: bool,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Multi-run decodes read in parts (runs in place, the rest gathered, merged by log-sum-exp):
    a view length of 4 tokens makes the tiny model's forced multi-run placements (odma) and
    scattered pages (paged) take that path, and the output stays transformers' greedy one;
    also with the parts in plain ops, as on a device without a fused kernel (MLU)."""
    import odma_mlu.models.attention as attention
    import odma_mlu.models.split_reads as split_reads

    if not fused:
        monkeypatch.setattr(split_reads, "has_fused_lse", lambda *args: False)

    real = attention.split_attention
    calls: list[int] = []

    def counted(*args):  # type: ignore[no-untyped-def]
        calls.append(args[-2].num_seqs)
        return real(*args)

    monkeypatch.setattr(attention, "split_attention", counted)
    if policy == "odma":
        eng = _engine(tiny_model_dir, "odma", capacity=1024, predictor=ConstantPredictor(1),
                      odma=OdmaConfig(safety_fraction=0.0, num_buckets=4, elastic=False))
    else:
        eng = _engine(tiny_model_dir, "paged", capacity=1024)
    eng.views = ViewRule(4)
    assert _run(eng) == reference
    assert calls and max(calls) > 1, "the forced view length was meant to read several decodes in parts"


def test_a_part_is_priced_as_the_device_runs_it(tiny_model_dir: Path, cpu_host_call_one_launch: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's split rule prices a part at one call where its device has a kernel that
    returns the log-sum-exp, and at ``PLAIN_LSE_KERNELS`` launches where it runs plain ops."""
    import odma_mlu.engine.llm_engine as llm_engine

    def views() -> ViewRule | None:
        return LLMEngine(tiny_model_dir, kv_policy="paged", backend="cpu", kv_capacity_tokens=256,
                         profile=str(cpu_host_call_one_launch)).views

    fused = views()
    monkeypatch.setattr(llm_engine, "has_fused_lse", lambda *args: False)
    plain = views()
    assert fused is not None and plain is not None and fused.min_tokens == plain.min_tokens
    assert (fused.part_calls, plain.part_calls) == (1.0, pytest.approx(8.0))


def test_odma_copies_into_one_run_match(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    eng = _engine(tiny_model_dir, "odma", capacity=1024, predictor=ConstantPredictor(1),
                  odma=OdmaConfig(safety_fraction=0.0, num_buckets=4, elastic=False))
    eng.policy.run_cost = CopiesAlwaysPay()  # type: ignore[attr-defined]
    assert _run(eng) == reference
    assert eng.policy.stats().copies > 0 and eng.arena.moved_bytes > 0


def test_odma_moves_blocking_runs_match(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    # Elastic, one token held ahead, copies free: a blocked request moves its neighbour's run
    # out of the way (``OdmaPolicy._move_blocker``); the moved request's cached location must
    # be dropped, or its next tokens would be read and written at its old slots.
    eng = _engine(tiny_model_dir, "odma", capacity=1024, predictor=ConstantPredictor(1),
                  odma=OdmaConfig(safety_fraction=0.0, num_buckets=4, chunk_tokens=1))
    eng.policy.run_cost = CopiesAlwaysPay()  # type: ignore[attr-defined]
    assert _run(eng) == reference
    assert eng.policy.moved_runs > 0 and eng.arena.moved_bytes > 0


def test_odma_scattered_prefill_and_tiny_granules_match(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    # A small arena, one-token chunks and no watermark: requests collide, scatter their
    # prompts over several holes, start new runs and get preempted; tokens must not change.
    eng = _engine(tiny_model_dir, "odma", capacity=120, predictor=ConstantPredictor(2),
                  odma=OdmaConfig(safety_fraction=0.2, chunk_tokens=1, num_buckets=2))
    assert _run(eng) == reference
    assert eng.policy.stats().new_runs > 0


def test_uncertain_requests_start_in_the_safety_region(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    eng = _engine(tiny_model_dir, "odma", capacity=2048, predictor=ConstantPredictor(4, spread=20.0),
                  odma=OdmaConfig(safety_fraction=0.5, uncertainty_ratio=3.0))
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    rid = eng.add_request(PROMPTS[0], params)
    eng.step()
    assert eng.policy.location(rid).start_slot >= eng.policy.main.capacity_tokens * eng.policy.unit
    while eng.has_unfinished():
        eng.step()
    assert _run(eng) == reference


def test_bad_requests_rejected_without_disturbing_others(tiny_model_dir: Path, reference: list[list[int]]) -> None:
    eng = _engine(tiny_model_dir, "odma", capacity=512, predictor=ConstantPredictor(8))
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    good = eng.add_request(PROMPTS[0], params)
    eng.step()
    with pytest.raises(RequestRejected, match="exceeds the model context"):
        eng.add_request(list(range(5)) * 500, SamplingParams(max_new_tokens=MAX_NEW))
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        eng.add_request([10**9], params)
    with pytest.raises(RequestRejected, match="exceeds the engine limit"):
        eng.add_request("hello", SamplingParams(max_new_tokens=MAX_NEW + 1))
    with pytest.raises(RequestRejected, match="can give one request at most"):
        eng.add_request([5] * 499, params)
    tokens: list[int] = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == good:
                tokens = list(o.token_ids)
    assert tokens == reference[0]


def test_abort_frees_kv_and_streaming_callback(tiny_model_dir: Path) -> None:
    eng = _engine(tiny_model_dir, "odma", capacity=512, predictor=ConstantPredictor(8))
    seen: list[int] = []
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    a = eng.add_request(PROMPTS[1], params, callback=lambda o: seen.extend(o.new_token_ids))
    b = eng.add_request(PROMPTS[2], params)
    for _ in range(3):
        eng.step()
    assert len(seen) == 3
    assert eng.abort(b)
    assert eng.policy.num_live() == 1
    while eng.has_unfinished():
        eng.step()
    assert len(seen) == MAX_NEW and eng.policy.reserved_tokens() == 0
    assert not eng.abort(a)
