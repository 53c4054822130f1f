"""A real backend priced by the card's own device profile: ODMA's cost rules (the economic
run length, the copy rule) get the profile's costs for the served model's shape, tokens do
not change, and a missing or bad profile says so."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from odma_mlu.config import DEFAULT_PROFILE, CacheConfig, EngineConfig, SchedulerConfig
from odma_mlu.engine.llm_engine import LLMEngine
from odma_mlu.engine.sampler import SamplingParams
from odma_mlu.errors import ConfigError
from odma_mlu.server.settings import ServeSettings, build_engine, load_serve_file
from hf_reference import encode, hf_greedy

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the cache model serve request", "a", "what is the length of a contiguous slab in the school house"]
MAX_NEW = 40


def _engine(model_dir: Path, profile: str | None) -> LLMEngine:
    sched = replace(SchedulerConfig(), max_new_tokens=MAX_NEW)
    return LLMEngine(model_dir, kv_policy="odma", backend="cpu", kv_capacity_tokens=256, scheduler=sched,
                     profile=profile)


def test_a_profile_prices_odma_on_a_real_backend_and_tokens_stay(tiny_model_dir: Path) -> None:
    priced, unpriced = _engine(tiny_model_dir, "cpu-host"), _engine(tiny_model_dir, None)
    assert priced.priced_by == "cpu-host" and unpriced.priced_by is None
    cost = priced.policy.run_cost
    assert cost is not None and unpriced.policy.run_cost is None
    # Priced for the served model's shape (the tiny model's layers), not the 7B target's.
    assert cost.model.num_layers == priced.spec.num_layers and cost.decode_fixed_s() > 0
    ref = hf_greedy(tiny_model_dir, encode(tiny_model_dir, PROMPTS), MAX_NEW)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    for eng in (priced, unpriced):
        assert [list(o.token_ids) for o in eng.generate(PROMPTS, params)] == ref
        eng.policy.check_integrity()


def test_an_unknown_profile_or_another_device_kind_is_a_config_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no-such-card"):
        _engine(tiny_model_dir, "no-such-card")
    with pytest.raises(ConfigError, match="profile = 'mlu370-x4' is for the mlu backend, but the engine runs on the cpu"):
        _engine(tiny_model_dir, "mlu370-x4")


def test_serve_settings_pass_the_profile_to_a_real_backend(tiny_model_dir: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def build(profile: str | None) -> LLMEngine:
        cfg = EngineConfig(model=str(tiny_model_dir), backend="cpu", dtype="auto", profile=profile,
                           cache=replace(CacheConfig(), kv_capacity_tokens=256))
        return build_engine(ServeSettings(engine=cfg))

    with caplog.at_level(logging.INFO, logger="odma_mlu.server"):
        assert build("cpu-host").priced_by == "cpu-host"
        assert "prices its runs and copies with device profile cpu-host" in caplog.text
        caplog.clear()
        assert build(None).priced_by is None
        assert "no device profile for backend cpu" in caplog.text


def test_the_emulated_backend_defaults_to_the_mlu370_and_the_deploy_file_names_it(tiny_model_dir: Path) -> None:
    engine = build_engine(ServeSettings(engine=EngineConfig(model=str(tiny_model_dir), backend="emulated",
                                                            dtype="auto")))
    assert engine.backend.profile.name == DEFAULT_PROFILE and engine.priced_by is None
    mlu, _ = load_serve_file(ROOT / "deploy" / "mlu370-x4" / "deepseek-r1-distill-qwen-7b.yaml")
    assert mlu.backend == "mlu" and mlu.profile == "mlu370-x4"
