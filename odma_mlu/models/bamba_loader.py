"""Load a Hugging Face Bamba folder (BambaForCausalLM) into a ``BambaForwardModel``.

Same checks as the Qwen2 loader (odma_mlu/models/loader.py), from metadata first: config,
dtype against the backend, every safetensors header, every tensor's presence and shape,
the tokenizer and the memory the weights need; only then are weights read.
``load_model`` dispatches here when config.json names a Bamba architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from odma_mlu.backends.base import Backend
from odma_mlu.config import ModelSpec
from odma_mlu.errors import ConfigError
from odma_mlu.models.bamba import AttentionWeights, BambaForwardModel, BambaLayer, MambaWeights
from odma_mlu.models.decoder_parts import outer_shapes, outer_weights
from odma_mlu.models.hybrid_spec import HybridSpec, hybrid_spec_from_config, time_step_limit

BAMBA_ARCHITECTURE = "BambaForCausalLM"
BAMBA_MODEL_TYPE = "bamba"
_FINAL_NORM = "model.final_layernorm.weight"


def is_bamba_folder(folder: Path) -> bool:
    """True when ``folder``/config.json names Bamba; False on anything else (even unreadable),
    so the Qwen2 loader then reports what is wrong with the folder."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("model_type") == BAMBA_MODEL_TYPE
                                      or BAMBA_ARCHITECTURE in (cfg.get("architectures") or []))


def expected_bamba_shapes(hs: HybridSpec, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a BambaForCausalLM checkpoint must hold, with its shape."""
    s = hs.base
    h, d, i = s.hidden_size, s.head_dim, s.intermediate_size
    q, kv = s.num_heads * d, s.num_kv_heads * d
    attn_bias, proj_bias = bool(cfg.get("attention_bias")), bool(cfg.get("mamba_proj_bias"))
    conv_bias = bool(cfg.get("mamba_conv_bias", True))
    shapes = outer_shapes(s, _FINAL_NORM)
    for n in range(s.num_layers):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "pre_ff_layernorm.weight": (h,),
                       p + "feed_forward.gate_proj.weight": (i, h), p + "feed_forward.up_proj.weight": (i, h),
                       p + "feed_forward.down_proj.weight": (h, i)})
        if n in hs.attention_layers:
            a = p + "self_attn."
            shapes.update({a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
                           a + "o_proj.weight": (h, q)})
            if attn_bias:
                shapes.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,),
                               a + "o_proj.bias": (h,)})
        else:
            m = p + "mamba."
            proj = hs.d_inner + hs.conv_dim + hs.num_ssm_heads
            shapes.update({m + "in_proj.weight": (proj, h), m + "conv1d.weight": (hs.conv_dim, 1, hs.d_conv),
                           m + "dt_bias": (hs.num_ssm_heads,), m + "A_log": (hs.num_ssm_heads,),
                           m + "D": (hs.num_ssm_heads,), m + "norm.weight": (hs.d_inner,),
                           m + "out_proj.weight": (h, hs.d_inner)})
            if conv_bias:
                shapes[m + "conv1d.bias"] = (hs.conv_dim,)
            if proj_bias:
                shapes.update({m + "in_proj.bias": (proj,), m + "out_proj.bias": (h,)})
    return shapes


def load_bamba(folder: Path, device: torch.device | str | None = None, dtype: str | torch.dtype | None = None,
               backend: Backend | None = None, with_tokenizer: bool = True
               ) -> tuple[BambaForwardModel, ModelSpec, Any]:
    """(model, spec of the whole stack, tokenizer or None) of a Bamba folder."""
    from safetensors import safe_open

    from odma_mlu.models import loader as base_loader

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise base_loader.ModelFolderError(f"{path}: rope type {rope_type!r} is not supported (only 'default')")
    dtype_name = base_loader._dtype_name(dtype if dtype is not None else (cfg.get("dtype") or cfg.get("torch_dtype")
                                                                          or "float32"))
    torch_dtype = base_loader._TORCH_DTYPES[dtype_name]
    if backend is not None:
        backend.check_dtype(torch_dtype)
    dev = torch.device(device) if device is not None else (backend.device if backend is not None
                                                           else torch.device("cpu"))
    try:
        hs = hybrid_spec_from_config(cfg, name=folder.name, dtype=dtype_name)
    except ConfigError as e:
        raise base_loader.ModelFolderError(f"{path}: {e}") from e
    spec = hs.base
    if spec.num_heads % spec.num_kv_heads or hs.num_ssm_heads % hs.num_groups:
        raise base_loader.ModelFolderError(
            f"{path}: heads {spec.num_heads} / kv heads {spec.num_kv_heads} and mamba heads {hs.num_ssm_heads} / "
            f"groups {hs.num_groups} must divide evenly")
    files = base_loader.weight_files(folder)
    headers = {p: base_loader.read_safetensors_header(p) for p in sorted(set(files.values()))}
    for name, shape in expected_bamba_shapes(hs, cfg).items():
        entry = headers[files[name]].get(name) if name in files else None
        if entry is None:
            raise base_loader.ModelFolderError(f"{folder}: tensor {name!r} is missing (expected shape {list(shape)})")
        if tuple(entry["shape"]) != shape:
            raise base_loader.ModelFolderError(f"{files[name]}: tensor {name!r} has shape {list(entry['shape'])}, "
                                               f"expected {list(shape)} from config.json")
    tokenizer = base_loader.load_tokenizer(folder, spec.vocab_size) if with_tokenizer else None
    if backend is not None:
        need, free = hs.num_params * spec.dtype_bytes, backend.mem_get_info().free_bytes
        if need > free:
            raise base_loader.ModelFolderError(f"{folder}: weights need {need / 2**30:.2f} GiB in {dtype_name}, "
                                               f"backend {backend.name!r} has {free / 2**30:.2f} GiB free")
    handles: dict[Path, Any] = {}

    def get(name: str, as_dtype: torch.dtype = torch_dtype) -> torch.Tensor:
        p = files[name]
        if p not in handles:
            handles[p] = safe_open(str(p), framework="pt", device="cpu")
        return handles[p].get_tensor(name).to(device=dev, dtype=as_dtype)

    def opt(name: str) -> torch.Tensor | None:
        return get(name) if name in files else None

    layers = []
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        if n in hs.attention_layers:
            a = p + "self_attn."
            bias = [opt(a + x + "_proj.bias") for x in "qkv"]
            mixer: AttentionWeights | MambaWeights = AttentionWeights(
                torch.cat([get(a + x + "_proj.weight") for x in "qkv"]),
                torch.cat(bias) if all(b is not None for b in bias) else None,  # type: ignore[misc]
                get(a + "o_proj.weight"), opt(a + "o_proj.bias"))
        else:
            m = p + "mamba."
            mixer = MambaWeights(get(m + "in_proj.weight"), opt(m + "in_proj.bias"), get(m + "conv1d.weight")[:, 0],
                                 opt(m + "conv1d.bias"), get(m + "dt_bias"),
                                 -torch.exp(get(m + "A_log").float()), get(m + "D"), get(m + "norm.weight"),
                                 get(m + "out_proj.weight"), opt(m + "out_proj.bias"))
        f = p + "feed_forward."
        layers.append(BambaLayer(get(p + "input_layernorm.weight"), mixer, get(p + "pre_ff_layernorm.weight"),
                                 torch.cat([get(f + "gate_proj.weight"), get(f + "up_proj.weight")]),
                                 get(f + "down_proj.weight")))
    embed, final_norm, lm_head = outer_weights(spec, get, _FINAL_NORM)
    model = BambaForwardModel(hs, embed, layers, final_norm, lm_head, time_step_limit(cfg))
    return model, spec, tokenizer
