"""Shared fixtures: tiny random-weight Qwen2 folders, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_model import make_tiny_qwen2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, 2 layers, hidden 64, 4 heads / 2 KV heads, untied lm_head, single model.safetensors."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_sharded_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as ``tiny_model_dir`` (same seed), saved as shards + model.safetensors.index.json."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2_sharded"), sharded=True)
