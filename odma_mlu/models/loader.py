"""Load a Hugging Face model folder: Qwen2 (full or sliding-window layers) into a
``Qwen2ForwardModel``, Gemma-3 text into a ``Gemma3ForwardModel`` (odma_mlu/models/gemma3.py).

Everything that can be wrong with the folder is checked from metadata first: config.json,
the architecture, the dtype against the backend, every safetensors header (file size
against the byte ranges it declares, so a truncated download is caught), every tensor's
presence and shape, the tokenizer, and the memory the weights need. Only then are weights
read. A bad folder therefore fails in well under a second, naming the file or the numbers,
before anything big is allocated on the device.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from odma_mlu.backends.base import Backend
from odma_mlu.config import DTYPE_BYTES, ModelSpec
from odma_mlu.errors import ConfigError
from odma_mlu.models import gemma3
from odma_mlu.models.decoder_parts import outer_shapes, outer_weights
from odma_mlu.models.layer_types import layer_windows
from odma_mlu.models.qwen2 import LayerWeights, Qwen2ForwardModel

SUPPORTED_ARCHITECTURE = "Qwen2ForCausalLM"
SUPPORTED_MODEL_TYPE = "qwen2"
SUPPORTED = {SUPPORTED_MODEL_TYPE: SUPPORTED_ARCHITECTURE, gemma3.MODEL_TYPE: gemma3.ARCHITECTURE}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                          "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32", "F16", "BF16"}


class ModelFolderError(ConfigError):
    """A model folder is missing a file, holds a corrupt one, or does not match its config."""


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _TORCH_DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {sorted(_TORCH_DTYPES)}")
    return name


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict, after checking it describes a supported model (``SUPPORTED``)."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing; a Hugging Face model folder needs config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED or (archs and SUPPORTED[model_type] not in archs):
        raise ModelFolderError(f"{path}: architecture {archs} (model_type {model_type!r}) is not supported; "
                               f"odma-mlu runs {sorted(SUPPORTED.values())} (model_type {sorted(SUPPORTED)})")
    try:
        layer_windows(cfg, str(path))
        if model_type == gemma3.MODEL_TYPE:
            gemma3.extras_from_config(cfg, str(path))
            return cfg
    except ConfigError as e:
        raise ModelFolderError(str(e)) from e
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ModelFolderError(f"{path}: rope type {rope_type!r} is not supported (only 'default' rotary)")
    return cfg


def spec_from_config(cfg: dict[str, Any], name: str, dtype: str) -> ModelSpec:
    """ModelSpec of a Qwen2 config; transformers 5 keeps rope_theta inside rope_parameters."""
    import dataclasses

    spec = ModelSpec.from_hf_config(cfg, name=name, dtype=dtype)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        spec = dataclasses.replace(spec, rope_theta=float(rope["rope_theta"]))
    return spec


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen2ForCausalLM checkpoint must hold, with its shape."""
    h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = outer_shapes(spec)
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries of one safetensors file, after checking the file holds every byte they declare."""
    if not path.is_file():
        raise ModelFolderError(f"weight file {path} is missing")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFolderError(f"{path} is corrupt: {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ModelFolderError(f"{path} is corrupt: header declares {header_len} bytes, file has {size}")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is corrupt: unreadable safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_end = max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise ModelFolderError(f"{path} is corrupt or truncated: its header declares {8 + header_len + data_end} "
                               f"bytes, the file has {size}; re-download it")
    return header


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it, from model.safetensors or the sharded index."""
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFolderError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ModelFolderError(f"{index} references shard(s) missing from {folder}: {missing}")
        return {name: folder / f for name, f in weight_map.items()}
    if single.is_file():
        return {name: single for name in read_safetensors_header(single)}
    raise ModelFolderError(f"{folder} holds no weights: neither {SINGLE_FILE} nor {INDEX_FILE} is present")


def check_weights(folder: Path, spec: ModelSpec, shapes: dict[str, tuple[int, ...]] | None = None
                  ) -> dict[str, Path]:
    """Validate every header and every expected tensor's presence, dtype and shape; no data read."""
    files = weight_files(folder)
    headers = {path: read_safetensors_header(path) for path in sorted(set(files.values()))}
    for name, shape in (shapes if shapes is not None else expected_shapes(spec)).items():
        if name not in files:
            raise ModelFolderError(f"{folder}: tensor {name!r} is missing from the weights "
                                   f"(expected shape {list(shape)})")
        entry = headers[files[name]].get(name)
        if entry is None:
            raise ModelFolderError(f"{files[name]}: tensor {name!r} listed in {INDEX_FILE} is not in this shard")
        if tuple(entry["shape"]) != shape:
            raise ModelFolderError(f"{files[name]}: tensor {name!r} has shape {list(entry['shape'])}, "
                                   f"expected {list(shape)} from config.json")
        if entry["dtype"] not in _ST_DTYPES:
            raise ModelFolderError(f"{files[name]}: tensor {name!r} is {entry['dtype']}; expected one of "
                                   f"{sorted(_ST_DTYPES)}")
    return files


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(folder: Path, vocab_size: int) -> Any:
    """The folder's tokenizer through transformers, never touching the network.

    The files are checked first: without them transformers 5 silently builds an empty
    tokenizer for a qwen2 folder instead of failing.
    """
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelFolderError(f"{folder}: cannot load the tokenizer: none of {list(TOKENIZER_FILES)} is present")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
        raise ModelFolderError(f"{folder}: cannot load the tokenizer (tokenizer.json / tokenizer_config.json): "
                               f"{type(e).__name__}: {e}") from e
    if len(tokenizer) > vocab_size:
        raise ModelFolderError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but config.json's vocab_size "
                               f"is {vocab_size}; tokenizer and weights do not belong together")
    return tokenizer


def load_model(folder: str | Path, device: torch.device | str | None = None, dtype: str | torch.dtype | None = None,
               backend: Backend | None = None, with_tokenizer: bool = True
               ) -> tuple[Qwen2ForwardModel | gemma3.Gemma3ForwardModel, ModelSpec, Any]:
    """Load ``folder`` (a Hugging Face Qwen2 or Gemma-3 text folder) -> (model, spec, tokenizer or None).

    ``dtype`` None keeps config.json's dtype. ``device`` defaults to the backend's device, or
    CPU. With a ``backend``, the dtype is checked against it and the weights against its
    free memory before any weight is read.
    """
    from safetensors import safe_open

    folder = Path(folder)
    from odma_mlu.models.bamba_loader import is_bamba_folder, load_bamba

    if is_bamba_folder(folder):  # hybrid Mamba2 + attention: its own loader
        return load_bamba(folder, device, dtype, backend, with_tokenizer)  # type: ignore[return-value]
    cfg = read_config(folder)
    dtype_name = _dtype_name(dtype if dtype is not None else (cfg.get("torch_dtype") or cfg.get("dtype") or "float32"))
    torch_dtype = _TORCH_DTYPES[dtype_name]
    if backend is not None:
        backend.check_dtype(torch_dtype)
    if device is not None:
        dev = torch.device(device)
    else:
        dev = backend.device if backend is not None else torch.device("cpu")
    spec = spec_from_config(cfg, name=folder.name, dtype=dtype_name)
    if spec.num_heads % spec.num_kv_heads:
        raise ModelFolderError(f"{folder / 'config.json'}: num_attention_heads {spec.num_heads} is not a multiple "
                               f"of num_key_value_heads {spec.num_kv_heads}")
    windows = layer_windows(cfg)
    extras = gemma3.extras_from_config(cfg) if cfg.get("model_type") == gemma3.MODEL_TYPE else None
    files = check_weights(folder, spec, gemma3.expected_shapes(spec, extras) if extras is not None else None)
    tokenizer = load_tokenizer(folder, spec.vocab_size) if with_tokenizer else None
    if backend is not None:
        need, free = spec.num_params * DTYPE_BYTES[dtype_name], backend.mem_get_info().free_bytes
        if need > free:
            raise ModelFolderError(f"{folder}: weights need {need / 2**30:.2f} GiB in {dtype_name}, backend "
                                   f"{backend.name!r} has {free / 2**30:.2f} GiB free")

    handles: dict[Path, Any] = {}

    def get(name: str) -> torch.Tensor:
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handles[path].get_tensor(name).to(device=dev, dtype=torch_dtype)

    if extras is not None:
        return gemma3.build(spec, extras, windows, get), spec, tokenizer
    layers = []
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append(LayerWeights(
            input_norm=get(p + "input_layernorm.weight"),
            qkv_weight=torch.cat([get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")]),
            qkv_bias=torch.cat([get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias")]),
            o_weight=get(a + "o_proj.weight"),
            post_norm=get(p + "post_attention_layernorm.weight"),
            gate_up_weight=torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]),
            down_weight=get(m + "down_proj.weight"),
        ))
    embed, final_norm, lm_head = outer_weights(spec, get)
    model = Qwen2ForwardModel(spec, embed, layers, final_norm, lm_head, windows)
    return model, spec, tokenizer
