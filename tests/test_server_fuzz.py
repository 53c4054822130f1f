"""A bounded schema fuzz of the server's own OpenAPI document (schemathesis), on loopback.

Every operation in ``/openapi.json`` gets ``FUZZ_EXAMPLES`` generated requests, schema-valid
and schema-violating (hypothesis, derandomized so a run is repeatable). The contract: no
response is a 5xx, the engine thread never dies or restarts, and afterwards no KV is held.
Run it alone, with the figures printed::

    .venv/bin/pytest -q -s tests/test_server_fuzz.py
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from odma_mlu.config import EngineConfig, SchedulerConfig, ServerConfig  # noqa: E402
from odma_mlu.engine.llm_engine import LLMEngine  # noqa: E402
from odma_mlu.predictor.simple import SimplePredictor  # noqa: E402
from odma_mlu.server.app import create_app  # noqa: E402
from odma_mlu.server.openapi import openapi_document  # noqa: E402
from odma_mlu.server.settings import ServeSettings  # noqa: E402
from odma_mlu.server.thread_server import ThreadedServer  # noqa: E402
from test_server import MODEL, _assert_kv_free  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("ODMA_FUZZ_EXAMPLES", "60"))
"""Generated requests per operation and generation mode (CI default; more for a soak)."""


@pytest.fixture(scope="module")
def fuzz_srv(tiny_model_dir: Path):
    # Short generations keep a case cheap: max_tokens above 8 is a named 400.
    sched = replace(SchedulerConfig(), max_new_tokens=8, max_num_seqs=32)
    engine = LLMEngine(tiny_model_dir, kv_policy="odma", backend="cpu", kv_capacity_tokens=4096,
                       predictor=SimplePredictor(), scheduler=sched)
    settings_ = ServeSettings(engine=EngineConfig(model=str(tiny_model_dir)),
                              server=ServerConfig(served_model_name=MODEL, max_body_bytes=256 * 1024,
                                                  reasoning_parser="deepseek_r1"))
    server = ThreadedServer(create_app(engine, settings_)).start()
    yield server
    server.stop()


def test_schema_fuzz_has_no_5xx(fuzz_srv: ThreadedServer) -> None:
    schema = schemathesis.openapi.from_dict(openapi_document(MODEL))
    statuses: Counter[int] = Counter()
    per_op: Counter[str] = Counter()
    failures: list[str] = []
    state = fuzz_srv.app.state.odma
    thread = state.engine._thread
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if op.method.upper() == "POST" else \
            (GenerationMode.POSITIVE,)  # nothing to make invalid in a bodiless GET
        for mode in modes:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:  # type: ignore[no-untyped-def]
                resp = case.call(base_url=fuzz_srv.base_url, timeout=60)
                statuses[resp.status_code] += 1
                per_op[f"{op.method.upper()} {op.path} {mode.value}"] += 1
                if resp.status_code >= 500:
                    failures.append(f"{op.method.upper()} {op.path}: {resp.status_code} {resp.text[:300]} "
                                    f"for {case.body!r:.300}")

            try:
                run()
            except Unsatisfiable:
                failures.append(f"{op.method.upper()} {op.path} {mode.value}: no case could be generated")
    cases = sum(statuses.values())
    print(f"\nschema fuzz: {cases} cases in {time.monotonic() - t0:.1f} s; status counts {dict(sorted(statuses.items()))}"
          f"; 5xx {sum(v for k, v in statuses.items() if k >= 500)}")
    for name, n in sorted(per_op.items()):
        print(f"  {name}: {n}")
    assert not failures, failures[:5]
    assert cases >= 10 * FUZZ_EXAMPLES // 2, per_op
    assert statuses[200] > 0 and any(400 <= s < 500 for s in statuses), statuses
    # Zero engine restarts: the same engine thread is alive and healthy.
    assert state.engine._thread is thread and state.engine.alive and not state.engine.dead
    _assert_kv_free(fuzz_srv)
