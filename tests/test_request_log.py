"""The server's request log is training data for `odma-mlu predictor train`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from odma_mlu.config import SchedulerConfig
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.errors import ConfigError
from odma_mlu.predictor.data import read_records


def test_finished_requests_are_logged_in_the_training_format(tiny_model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    eng = LLMEngine(tiny_model_dir, kv_policy="odma", backend="cpu", kv_capacity_tokens=1024,
                    scheduler=replace(SchedulerConfig(), max_new_tokens=16), request_log=log)
    outs = eng.generate(["hello world", "the cache model"], [SamplingParams(max_new_tokens=5, ignore_eos=True),
                                                            SamplingParams(max_new_tokens=9, ignore_eos=True)])
    aborted = eng.add_request("memory and bucket", SamplingParams(max_new_tokens=9))
    eng.step()
    eng.abort(aborted)  # aborted requests are not logged
    eng.request_log.close()  # type: ignore[union-attr]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(d["prompt"], d["output_tokens"], d["max_new_tokens"]) for d in lines] == \
        [("hello world", 5, 5), ("the cache model", 9, 9)]
    assert all(d["finish_reason"] == "length" for d in lines) and len(outs) == 2
    records = read_records(log)  # what `odma-mlu predictor train --data` reads
    assert [(r.prompt, r.length) for r in records] == [("hello world", 5), ("the cache model", 9)]


def test_request_log_in_a_missing_folder_is_a_config_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.request_log"):
        LLMEngine(tiny_model_dir, backend="cpu", kv_capacity_tokens=1024, request_log=tmp_path / "no" / "log.jsonl")
