"""LLMEngine on a hybrid (Bamba) model: greedy output equals transformers under every KV
policy, roomy and tight (preemption recomputes the SSM state; capacity migrates between
the KV and state pools both ways); the state pool frees its slot on finish, preemption and
abort; a full state pool makes admission wait, never crash."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from odma_mlu.config import CacheConfig, SchedulerConfig
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.kvcache.avmp import AvmpPolicy
from odma_mlu.kvcache.factory import POLICY_NAMES, make_policy
from odma_mlu.kvcache.policy import ReserveRequest
from odma_mlu.models.loader import load_model
from odma_mlu.predictor.base import LengthPrediction, LengthPredictor, RequestFeatures
from hf_reference import hf_greedy
from tiny_hybrid import make_tiny_bamba

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 3, 44, 55, 66, 77, 88, 99, 100, 101],
    [7],
    [9, 10, 11, 12, 13],
    [200, 201, 202, 203, 204, 205, 206, 207, 208],
    [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42],
]
MAX_NEW = 16
ENGINE_POLICIES = list(POLICY_NAMES)


class ConstantPredictor(LengthPredictor):
    def __init__(self, tokens: float) -> None:
        self.tokens = tokens

    def predict(self, request: RequestFeatures) -> LengthPrediction:
        return LengthPrediction.from_values([self.tokens] * 5, request.max_new_tokens)


@pytest.fixture(scope="module")
def bamba_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bamba(tmp_path_factory.mktemp("tiny_bamba_engine"))


@pytest.fixture(scope="module")
def reference(bamba_dir: Path) -> list[list[int]]:
    return hf_greedy(bamba_dir, PROMPTS, MAX_NEW)


def _engine(model_dir: Path, policy: str, capacity: int) -> LLMEngine:
    sched = replace(SchedulerConfig(), max_new_tokens=MAX_NEW)
    return LLMEngine(model_dir, kv_policy=policy, backend="cpu", kv_capacity_tokens=capacity,
                     predictor=ConstantPredictor(4), cache=CacheConfig(), scheduler=sched)


def _run(eng: LLMEngine) -> list[list[int]]:
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    pol = eng.policy
    assert isinstance(pol, AvmpPolicy)
    pol.check_integrity()
    assert pol.num_live() == 0 and pol.reserved_tokens() == 0, "KV leaked after generate"
    assert eng.states is not None and eng.states.num_live == 0, "a state slot leaked after generate"
    return [list(o.token_ids) for o in outs]


@pytest.mark.parametrize("policy", ENGINE_POLICIES)
def test_greedy_matches_transformers_roomy(bamba_dir: Path, reference: list[list[int]], policy: str) -> None:
    eng = _engine(bamba_dir, policy, capacity=4096)
    assert _run(eng) == reference
    assert eng.policy.migrations_to_states >= 1, "the state pool starts empty: its first slots are a migration"


@pytest.mark.parametrize("policy", ENGINE_POLICIES)
def test_greedy_matches_under_preemption_and_migration(bamba_dir: Path, reference: list[list[int]],
                                                       policy: str) -> None:
    # A state slot costs 44 KV tokens here: room for two or three requests' states + KV.
    eng = _engine(bamba_dir, policy, capacity=200)
    assert _run(eng) == reference
    pol = eng.policy
    # Pressure shows as preemption, capacity moved back to KV, or (policies that reserve the
    # worst case and never preempt) requests waiting: fewer state slots than requests.
    assert pol.migrations_to_states >= 1
    assert eng.scheduler.num_preemptions + pol.migrations_to_kv >= 1 or pol.num_loans < len(PROMPTS), (
        f"{policy}: expected memory pressure (preemptions {eng.scheduler.num_preemptions}, "
        f"migrations to KV {pol.migrations_to_kv}, state slots {pol.num_loans})")


def test_state_pool_moves_capacity_back_to_kv(bamba_dir: Path, reference: list[list[int]]) -> None:
    """Short requests grow the state pool (KV -> states); a long one then needs that KV
    back: free slots are compacted away and loans repaid (states -> KV); tokens stay equal."""
    long_prompt = list(range(100, 160))
    (want_long,) = hf_greedy(bamba_dir, [long_prompt], MAX_NEW)
    eng = _engine(bamba_dir, "paged", capacity=160)  # two slots' loans (2 x 48) + the long request's 80
    short = SamplingParams(max_new_tokens=2, ignore_eos=True)
    outs = eng.generate(PROMPTS[1:] + [long_prompt], [short] * 4 + [SamplingParams(max_new_tokens=MAX_NEW,
                                                                                     ignore_eos=True)])
    assert [list(o.token_ids) for o in outs[:4]] == [r[:2] for r in reference[1:]]
    assert list(outs[4].token_ids) == want_long
    assert eng.policy.migrations_to_states >= 2 and eng.policy.migrations_to_kv >= 1
    eng.policy.check_integrity()


def test_abort_frees_the_state_slot(bamba_dir: Path) -> None:
    eng = _engine(bamba_dir, "static", capacity=1024)
    rid = eng.add_request(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
    eng.step()
    assert eng.states is not None and eng.states.holds(rid)
    assert eng.abort(rid)
    assert not eng.states.holds(rid) and eng.policy.num_live() == 0
    eng.policy.check_integrity()


def test_full_state_pool_makes_admission_wait(bamba_dir: Path) -> None:
    """A static split (no migration) with one state slot: the second request gets None
    (no room), holds nothing, and is admitted once the first is released."""
    model, _, _ = load_model(bamba_dir, with_tokenizer=False)
    arena = model.new_arena(1024)
    states = model.new_state_pool(0)
    pol = AvmpPolicy(make_policy("static", arena, CacheConfig(), MAX_NEW), states, model.hybrid.kv_bytes_per_token,
                     state_slots=1, migrate=False)
    a = ReserveRequest(request_id="a", prompt_tokens=8, max_new_tokens=MAX_NEW, num_tokens=8)
    b = ReserveRequest(request_id="b", prompt_tokens=8, max_new_tokens=MAX_NEW, num_tokens=8)
    assert pol.reserve(a) is not None
    assert pol.reserve(b) is None and pol.num_live() == 1 and pol.state_oom_events == 1
    pol.check_integrity()
    pol.release("a", 3)
    assert pol.reserve(b) is not None and states.slot_of("b") == 0
    pol.check_integrity()


def test_state_slots_that_do_not_fit_are_rejected_with_the_fix(bamba_dir: Path) -> None:
    model, _, _ = load_model(bamba_dir, with_tokenizer=False)
    inner = make_policy("static", model.new_arena(100), CacheConfig(), MAX_NEW)
    with pytest.raises(ValueError, match="lower state_slots"):
        AvmpPolicy(inner, model.new_state_pool(0), model.hybrid.kv_bytes_per_token, state_slots=10, migrate=False)
