"""The model loader's errors: each bad folder, config, weight file, dtype or tokenizer gets
one clear error naming the problem (split from test_models.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from odma_mlu.backends.cpu import CpuBackend
from odma_mlu.errors import BackendUnavailable, ConfigError
from odma_mlu.models.loader import ModelFolderError, load_model


@pytest.fixture
def folder_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_error_missing_folder_and_config(tmp_path, folder_copy):
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model(tmp_path / "nope")
    (folder_copy / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"config.json is missing"):
        load_model(folder_copy)


def test_error_config_not_json(folder_copy):
    (folder_copy / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(folder_copy)


def test_error_unsupported_architecture(folder_copy):
    _edit_config(folder_copy, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ModelFolderError, match=r"\['LlamaForCausalLM'\] \(model_type 'llama'\) is not supported"):
        load_model(folder_copy)


def test_error_unsupported_rope_and_sliding_window(folder_copy):
    _edit_config(folder_copy, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ModelFolderError, match="rope type 'yarn'"):
        load_model(folder_copy)
    _edit_config(folder_copy, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                 layer_types=["chunked_attention", "full_attention"])  # sliding windows run (test_sliding_models)
    with pytest.raises(ModelFolderError, match="layer types"):
        load_model(folder_copy)


def test_error_missing_weights(folder_copy):
    (folder_copy / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_model(folder_copy)


def test_error_missing_shard(tiny_sharded_model_dir, tmp_path):
    folder = Path(shutil.copytree(tiny_sharded_model_dir, tmp_path / "sharded"))
    (folder / "model-00003-of-00012.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"missing from .*'model-00003-of-00012.safetensors'"):
        load_model(folder)


def test_error_truncated_safetensors(folder_copy):
    path = folder_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFolderError, match=rf"model.safetensors is corrupt or truncated: .* declares {len(data)} "
                                               rf"bytes, the file has {len(data) - 1000}"):
        load_model(folder_copy)
    path.write_bytes(data[:5])
    with pytest.raises(ModelFolderError, match="too short for a safetensors header"):
        load_model(folder_copy)


def test_error_missing_and_misshaped_tensor(folder_copy):
    path = folder_copy / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.self_attn.k_proj.bias"
    save_file({k: v for k, v in tensors.items() if k != name}, path, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=rf"'{name}' is missing .*expected shape \[32\]"):
        load_model(folder_copy)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \[64, 100\], "
                                               r"expected \[64, 128\]"):
        load_model(folder_copy)


def test_error_dtype_the_backend_lacks(tiny_model_dir):
    class NoBf16Backend(CpuBackend):
        name = "nobf16"

        def supports_dtype(self, dtype: torch.dtype) -> bool:
            return dtype != torch.bfloat16

    with pytest.raises(BackendUnavailable, match="'nobf16' does not support bfloat16"):
        load_model(tiny_model_dir, dtype="bfloat16", backend=NoBf16Backend())
    with pytest.raises(ConfigError, match="'int8' is not one of"):
        load_model(tiny_model_dir, dtype="int8")


def test_error_missing_tokenizer(folder_copy):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder_copy / name).unlink(missing_ok=True)
    with pytest.raises(ModelFolderError, match=r"cannot load the tokenizer: none of \['tokenizer.json'"):
        load_model(folder_copy)
    model, _, tok = load_model(folder_copy, with_tokenizer=False)
    assert tok is None and model.spec.num_layers == 2


def test_error_tokenizer_larger_than_vocab(folder_copy):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder_copy, local_files_only=True)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(60)])
    tokenizer.save_pretrained(folder_copy)
    with pytest.raises(ModelFolderError, match="tokenizer has 460 tokens but config.json's vocab_size is 448"):
        load_model(folder_copy)
