"""Frozen configuration dataclasses. Their defaults are the defaults of the CLI.

``load_engine_config`` reads YAML and rejects unknown keys by name, so a typo in a deploy
file fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from odma_mlu.errors import ConfigError

DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

BUILTIN_MODEL_SHAPES: dict[str, str] = {
    "deepseek-r1-distill-qwen-7b": "deepseek-r1-distill-qwen-7b.json",
}
DEFAULT_MODEL = "deepseek-r1-distill-qwen-7b"


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer: everything the allocator and cost model need."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    dtype: str = "float16"
    architecture: str = "Qwen2ForCausalLM"
    eos_token_ids: tuple[int, ...] = ()

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return self.num_layers * self.kv_bytes_per_token_per_layer

    @property
    def num_params(self) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        # Qwen2: q/k/v projections carry biases, o_proj does not.
        attn = h * q + q + 2 * (h * kv + kv) + q * h
        mlp = 3 * h * i
        norms = 2 * h
        per_layer = attn + mlp + norms
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + embed + head + h

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def streamed_weight_bytes(self) -> int:
        """Weights read once per forward step: all but the embedding table (only rows are read)."""
        embed_only = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return (self.num_params - embed_only) * self.dtype_bytes

    @property
    def matmul_params(self) -> int:
        """Parameters used in matmuls per token (2 FLOPs each)."""
        return self.num_params - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "model", dtype: str | None = None) -> "ModelSpec":
        """Build a spec from a Hugging Face ``config.json`` mapping."""
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"model config {name!r} lacks {missing}; a Hugging Face config.json for a "
                              "decoder-only model must define them")
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
        torch_dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
        if torch_dtype not in DTYPE_BYTES:
            raise ConfigError(f"model {name!r}: dtype {torch_dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        archs = cfg.get("architectures") or ["Qwen2ForCausalLM"]
        return cls(
            name=name,
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=torch_dtype,
            architecture=str(archs[0]),
            eos_token_ids=eos_ids,
        )


def load_model_spec(name_or_path: str = DEFAULT_MODEL, dtype: str | None = "float16") -> ModelSpec:
    """A built-in shape by name, a ``config.json`` path, or a model folder holding one.

    ``dtype`` defaults to float16: the MLU370 serves the 7B model in fp16 (no bf16 below
    compute capability 5). Pass ``None`` to keep the config's own dtype.
    """
    if name_or_path in BUILTIN_MODEL_SHAPES:
        text = resources.files("odma_mlu.models").joinpath("shapes").joinpath(BUILTIN_MODEL_SHAPES[name_or_path]).read_text()
        return ModelSpec.from_hf_config(json.loads(text), name=name_or_path, dtype=dtype)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"model {name_or_path!r} is neither a built-in shape ({sorted(BUILTIN_MODEL_SHAPES)}) "
                          "nor a config.json / model folder that exists")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); expected a Hugging Face config.json") from e
    label = path.parent.name if path.name == "config.json" else path.stem
    return ModelSpec.from_hf_config(cfg, name=label, dtype=dtype)


@dataclass(frozen=True)
class OdmaConfig:
    """Constants of the ``odma`` policy. docs/odma-sensitivity.md sweeps each of them."""

    num_buckets: int = 8
    """K: number of bucket sizes the optimizer chooses."""
    histogram_window: int = 2000
    """Completed requests kept in the sliding histogram of generation lengths."""
    reoptimize_every: int = 200
    """Re-optimize bucket boundaries after this many completions (drift can trigger sooner)."""
    drift_detection: bool = True
    """Re-optimize boundaries early when recent lengths leave the window's distribution
    (two-sample KS test, odma_mlu/predictor/drift.py)."""
    histogram_bin_tokens: int = 16
    """Bin width of the online histogram; boundaries land on bin edges."""
    safety_fraction: float = 0.10
    """Share of KV capacity reserved as the safety pool."""
    uncertainty_ratio: float = 3.0
    """A request whose q_high / q_mid exceeds this goes straight to the safety pool."""
    target_coverage: float = 0.80
    """Quantile of the predicted length that the first reservation must cover."""
    growth_factor: float = 2.0
    """On overflow with no larger bucket, the new extent is at least this times the old."""
    elastic: bool = True
    """Elastic slabs (docs/odma-design.md): a request holds its live KV plus a growth chunk,
    not its whole bucket; it grows in place while the next slots are free, else moves (one
    contiguous copy) to a hole sized to its predicted claim. False gives the paper's strict
    reservations (the whole bucket up front)."""
    chunk_tokens: int = 4
    """Elastic mode: slots held beyond the live KV when the whole claim does not fit."""
    admission_watermark_fraction: float = 0.04
    """Elastic mode: admit a new request only if this share of the main region stays free
    after it, so running slabs can still grow (a preemption costs a whole recompute)."""
    overcommit_max: float = 4.0
    """Elastic mode: admission keeps the sum of running claims under ``overcommit`` x the
    main region. ``overcommit`` adapts (AIMD): it starts at 1 (no overcommit, like strict
    reservations), rises by ``overcommit_increase`` per finished request and is multiplied
    by ``overcommit_decrease`` whenever a slab finds no room to grow (a preemption), so it
    settles where the workload's growth stops causing recomputes."""
    overcommit_initial: float = 1.0
    overcommit_increase: float = 0.1
    overcommit_decrease: float = 0.7
    compact_min_free_fraction: float = 0.02
    """Elastic mode: before preempting for lack of a big enough hole, compact the main region
    (slide slabs together) if at least this share of it is free."""


@dataclass(frozen=True)
class CacheConfig:
    policy: str = "odma"
    kv_capacity_tokens: int | None = None
    """KV capacity; None derives it from the device profile (memory - weights - reserve)."""
    page_size_tokens: int = 16
    s3_num_buckets: int = 10
    activation_reserve_fraction: float = 0.10
    """Share of device memory kept for activations and the runtime (90% memory use)."""
    odma: OdmaConfig = field(default_factory=OdmaConfig)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 1024
    """High enough that KV memory, not this cap, limits the batch of the 7B model on a
    24 GB card (~118K KV tokens): that is the regime ODMA is about."""
    max_num_batched_tokens: int = 8192
    max_new_tokens: int = 512
    group_decode_by_bucket: bool = True


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    backend: str = "auto"
    dtype: str = "float16"
    profile: str = "mlu370-x4"
    predictor: str | None = None
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


T = TypeVar("T")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name (recursively)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = known[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            kwargs[key] = from_mapping(type(default), value, f"{where}.{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping, with clear errors for a missing file, bad
    YAML or a non-mapping document."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return dict(data)


def load_engine_config(path: str | Path) -> EngineConfig:
    return from_mapping(EngineConfig, read_yaml_mapping(path), str(path))


@dataclass(frozen=True)
class ServerConfig:
    """The ``server:`` section of an ``odma-mlu serve`` YAML file (odma_mlu/server/settings.py).

    Bind address, port and API key are deliberately *not* here: they are deployment
    decisions taken on the command line (or the systemd unit), so a config file copied
    between hosts can never silently expose a server or carry a secret.
    """

    served_model_name: str | None = None
    """Name clients put in ``model``; None uses the model folder's name."""
    memory_fraction: float = 0.90
    """Share of the device's total memory this process may fill (weights + KV). On mlu/cuda
    the KV capacity is ``total * memory_fraction - memory already in use - weights``, unless
    ``cache.kv_capacity_tokens`` fixes it."""
    cpu_kv_capacity_tokens: int = 16384
    """KV capacity on cpu/emulated backends when ``cache.kv_capacity_tokens`` is unset (host
    RAM is shared with everything else, so it is never sized from free memory)."""
    max_waiting_requests: int = 256
    """Back-pressure: a new request is answered 429 while this many are already waiting."""
    max_body_bytes: int = 1 << 20
    """Request bodies above this are answered 413 before they are parsed."""
    default_max_tokens: int = 16
    """max_tokens of a completion that does not say (the OpenAI default); chat requests
    without one get up to the engine's max_new_tokens."""
    drain_timeout_s: float = 60.0
    """On SIGTERM, in-flight requests get this long to finish before the engine is stopped."""
    log_level: str = "info"
