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


@pytest.fixture(scope="session")
def cpu_host_call_one_launch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """device_profiles/cpu-host.yaml with an attention call priced as one launch (its measured
    ``attention_call_overhead`` dropped). The tiny models' view length at the measured call
    cost (464 tokens for ``tiny_model_dir``) is past the contexts tests can afford to
    generate; at one launch a call it is 53, so views and split reads occur in short runs."""
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "device_profiles" / "cpu-host.yaml").read_text())
    data.pop("attention_call_overhead", None)
    path = tmp_path_factory.mktemp("profiles") / "cpu-host-call-one-launch.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
