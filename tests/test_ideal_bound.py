"""``ideal`` bounds every policy (within 0.5%) under the same scheduler and limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.bench import run_bench
from emulator.profile import load_profile
from emulator.traces import load_trace
from odma_mlu.config import load_model_spec
from odma_mlu.kvcache.factory import POLICY_NAMES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOLERANCE = 0.005


def _check(trace_name: str, max_requests: int | None, max_new_tokens: int | None, seed: int = 0) -> None:
    trace = load_trace(trace_name, seed=seed, max_requests=max_requests, max_new_tokens=max_new_tokens)
    results = run_bench(trace, POLICY_NAMES, load_model_spec(), load_profile("mlu370-x4"), predictor_name="simple",
                        max_new_tokens=max_new_tokens, progress=False)
    by = {r.policy: r for r in results}
    assert all(r.lost == 0 for r in results)
    for r in results:
        assert by["ideal"].tps >= r.tps * (1 - TOLERANCE), (trace_name, r.policy, r.tps, by["ideal"].tps)


def test_ideal_bounds_every_policy_on_the_bundled_trace() -> None:
    _check("default", 600, None)


DEV_TRACES = [("alpaca-vicuna", None, 512, 0), ("servegen-r1", 1000, 32768, 0), ("servegen-r1", 1000, 32768, 1),
              ("servegen-r1", 1000, 32768, 2), ("mooncake", 1000, None, 0), ("vidur-arxiv", 3000, None, 0),
              ("azure-code", None, None, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("trace, max_requests, max_new, seed", DEV_TRACES)
def test_ideal_bounds_every_policy_on_development_traces(trace: str, max_requests: int | None,
                                                         max_new: int | None, seed: int) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the development traces live there")
    _check(trace, max_requests, max_new, seed)
