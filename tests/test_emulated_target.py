"""`serve --backend emulated --emulated-target SHAPE`: the emulated clock and KV capacity
follow a chosen model shape (sliding-window and hybrid shapes priced by kind), with one-line
errors for a bad shape, a shape whose weights fill the card, or a non-emulated backend."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from odma_mlu.backends import get_backend
from odma_mlu.config import CacheConfig, EngineConfig
from odma_mlu.errors import ConfigError
from odma_mlu.server.settings import ServeSettings, build_engine, settings_from_args


def _settings(model: Path, **engine: object) -> ServeSettings:
    return ServeSettings(engine=EngineConfig(model=str(model), backend="emulated", dtype="auto", **engine))


def test_emulated_target_prices_the_chosen_shape(tiny_model_dir: Path) -> None:
    default = build_engine(_settings(tiny_model_dir))
    swa = build_engine(_settings(tiny_model_dir, emulated_target="qwen2-7b-swa"))
    assert default.backend.target_model.name != "qwen2-7b-swa"
    assert swa.backend.target_model.name == "qwen2-7b-swa"
    kinds = swa.backend.target_layers
    assert (kinds.num_full, kinds.num_sliding, kinds.window_tokens) == (8, 20, 1024)
    assert "sliding" in swa.backend.describe()


def test_the_flag_sets_the_key() -> None:
    ns = argparse.Namespace(config=None, model="m", backend="emulated", emulated_target="gemma-3-12b")
    assert settings_from_args(ns).engine.emulated_target == "gemma-3-12b"


def test_bad_targets_are_one_line_errors(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"emulated_target = 'no-such-shape'.*neither a built-in shape"):
        build_engine(_settings(tiny_model_dir, emulated_target="no-such-shape"))
    # Gemma-3-12B's weights alone fill a 24 GB card: the operator must name the KV budget.
    with pytest.raises(ConfigError, match=r"gemma-3-12b.*cache.kv_capacity_tokens"):
        build_engine(_settings(tiny_model_dir, emulated_target="gemma-3-12b"))
    eng = build_engine(_settings(tiny_model_dir, emulated_target="gemma-3-12b",
                                 cache=CacheConfig(kv_capacity_tokens=4096)))
    assert eng.backend.target_layers.num_sliding == 40
    with pytest.raises(ConfigError, match=r"emulated_target = 'gemma-3-12b' applies to backend 'emulated' only"):
        get_backend("cpu", target_model="gemma-3-12b")
