"""Frozen configuration dataclasses. Their defaults are the defaults of the CLI.

``from_mapping`` builds one from a YAML mapping and rejects unknown keys by name, so a typo
in a deploy file fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from odma_mlu.config_values import validate_fields
from odma_mlu.errors import ConfigError

DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

BUILTIN_MODEL_SHAPES: dict[str, str] = {
    "deepseek-r1-distill-qwen-7b": "deepseek-r1-distill-qwen-7b.json",
    "gemma-3-12b": "gemma-3-12b.json",  # 40 sliding (1024) + 8 full layers; tools/bench_hetero.py
    "qwen2-7b-swa": "qwen2-7b-swa.json",  # 20 sliding (1024) + 8 full layers
}
DEFAULT_MODEL = "deepseek-r1-distill-qwen-7b"
DEFAULT_PROFILE = "mlu370-x4"
"""The card the emulated backend emulates when no profile is named."""


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

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], name: str = "model", dtype: str | None = None) -> "ModelSpec":
        """Build a spec from a Hugging Face ``config.json`` mapping."""
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"model config {name!r} lacks {missing}; a Hugging Face config.json for a "
                              "decoder-only model must define them")
        for key in required + ["num_key_value_heads", "head_dim", "max_position_embeddings"]:
            v = cfg.get(key)
            if v is None and key not in required:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 2**40:
                raise ConfigError(f"model config {name!r}: {key} = {v!r} must be an integer >= 1")
        if cfg["num_attention_heads"] % (cfg.get("num_key_value_heads") or cfg["num_attention_heads"]):
            raise ConfigError(f"model config {name!r}: num_attention_heads = {cfg['num_attention_heads']} is not a "
                              f"multiple of num_key_value_heads = {cfg.get('num_key_value_heads')}")
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

    def __post_init__(self) -> None:
        validate_fields(self)

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
    """Share of KV capacity at the top of the arena kept as the safety region: uncertain and
    long requests are placed there first so their runs stay long; anyone may spill across
    when their own region has no room (no capacity is ever idle)."""
    uncertainty_ratio: float = 3.0
    """A request whose predicted q_high / q_mid exceeds this is uncertain (safety region)."""
    long_request_tokens: int = 4096
    """A request whose claim reaches this many tokens is long (safety region)."""
    target_coverage: float = 0.80
    """Quantile of the predicted length that a request's claim covers."""
    growth_factor: float = 2.0
    """On overflow with no larger bucket, the new claim is at least this times the old."""
    elastic: bool = True
    """True: a request holds its live KV plus ``chunk_tokens`` and grows in place into the
    room kept after it (docs/odma-design.md). False: the paper's strict mode, the whole
    claim reserved up front. In both modes an overflow starts a new run, never a copy,
    unless the cost model says the copy pays for itself."""
    chunk_tokens: int = 16
    """Elastic mode: slots taken beyond the live KV at each extension; the floor of the
    economic run length a growing request holds where the device's costs are known
    (docs/odma-design.md)."""
    claim_admission_factor: float = 0.0
    """Admission by predicted claims: admit only while the running requests' claims plus the
    new one stay under this many times the KV capacity (0 disables the rule; the common
    watermark always applies)."""
    compact: bool = True
    """Where the device reads a long one-run decode in place (``view_min_tokens``, from the
    profile: the gather it saves outweighs a group's launches), a request past
    ``compact_from_tokens`` that cannot grow in place is copied into one run, other
    requests' runs moved out of a window for it (docs/odma-design.md, "Compaction")."""
    compact_from_tokens: int = 600
    """Live tokens from which a blocked request is compacted (dev data: the first 200
    ServeGen requests, seed 0; docs/odma-sensitivity.md)."""
    compact_room_fraction: float = 0.1
    """Room a compacted request holds past its live tokens, as a fraction of them (at least
    ``chunk_tokens``), where free memory allows: it grows in place that long before it is
    blocked again. Where it does not, the room shrinks to the free memory's share per live
    request, down to ``compact_room_min_fraction``."""
    compact_room_min_fraction: float = 0.02
    """The least room a compacted request holds, as a fraction of its live tokens, however
    little memory is free: at saturation a room is memory no other request may use, and
    a smaller one is used up sooner, so compacted again (dev data: ServeGen seeds 8 and 9,
    3,000 requests each; docs/odma-sensitivity.md). Above ``compact_room_fraction`` it wins."""
    compact_copy_fraction: float = 0.008
    """Where no window can be emptied for a compaction, other runs are slid together to make
    one (docs/odma-design.md, "Compaction"), but only while all KV ODMA has copied stays
    under this share of the KV its requests have read. Copies are charged per step like
    every kernel; this caps them below the 1% of the ODMA v2 acceptance. 0: never slide."""
    granule_tokens: int | None = None
    """Tokens per allocation granule, which is also the shortest run ODMA places; None: the
    page size (``cache.page_size_tokens``). Runs then start on a page boundary, so
    block-table kernels can read them. A finer granule raises ``kv_utilization`` by holding
    less past the live tokens, but reads each request as more runs. It suits a card whose
    attention takes token offsets and whose gather curve is flat at a few tokens
    (docs/odma-sensitivity.md, "Granules")."""


@dataclass(frozen=True)
class CacheConfig:
    def __post_init__(self) -> None:
        validate_fields(self)

    policy: str = "odma"
    kv_capacity_tokens: int | None = None
    """KV capacity; None derives it from the device profile (memory - weights - reserve)."""
    page_size_tokens: int = 16
    watermark_fraction: float = 0.01
    """Admission watermark shared by every policy that can run out of room after admission
    (paged, odma): a request is admitted only if this share of KV capacity stays free
    after it. 0.01 is vLLM's block-manager default (``watermark=0.01``), so paged runs under
    the rule it has in production."""
    s3_num_buckets: int = 10
    enable_prefix_caching: bool = False
    """Requests sharing a prompt prefix share its KV (odma_mlu/kvcache/prefix.py); full-attention
    models only."""
    activation_reserve_fraction: float = 0.10
    """Share of device memory kept for activations and the runtime (90% memory use)."""
    swap_space_bytes: int = 4 * 1024**3
    """Host memory that holds the KV of preempted requests until they run again (vLLM's
    ``swap_space``, 4 GiB by default): a preempted request whose computed KV fits is copied
    to the host and back instead of being recomputed (odma_mlu/engine/scheduler.py). 0:
    every preemption recomputes. Models with SSM layers, and prefix caching, always
    recompute (their states and shared pages are not swapped); a sliding-window model swaps
    its ring's rows with its runs."""
    odma: OdmaConfig = field(default_factory=OdmaConfig)


@dataclass(frozen=True)
class SchedulerConfig:
    def __post_init__(self) -> None:
        validate_fields(self)

    max_num_seqs: int = 1024
    """High enough that KV memory, not this cap, limits the batch of the 7B model on a
    24 GB card (~118K KV tokens): that is the regime ODMA is about."""
    max_num_batched_tokens: int = 8192
    max_new_tokens: int = 512
    enable_chunked_prefill: bool = True
    """One token budget per step for decodes and prefill chunks (vLLM v1's default): long
    prompts, and the recompute of a preempted request, are computed over several steps next
    to the running decodes (odma_mlu/engine/scheduler.py). False: each prompt is prefilled
    whole in one step (the default before 2026-12-06; docs/results.md has both)."""
    max_prefill_chunk_tokens: int = 512
    """With chunked prefill: the most prompt tokens one sequence computes in a step."""


@dataclass(frozen=True)
class EngineConfig:
    def __post_init__(self) -> None:
        validate_fields(self)

    model: str = DEFAULT_MODEL
    backend: str = "auto"
    dtype: str = "float16"
    profile: str | None = None
    """A device profile: a name in device_profiles/ or a YAML path. Backend ``emulated``: the
    card it emulates (None: ``DEFAULT_PROFILE``). A real backend (mlu, cuda, cpu): the card's
    own profile, which prices ODMA's decisions (how far ahead a growing request holds,
    whether a copy or a move pays: docs/odma-design.md); None: ODMA holds ``chunk_tokens``
    ahead and never copies or moves. Measure it with ``odma-mlu profile-bandwidth``."""
    emulated_target: str | None = None
    """Backend ``emulated`` only: the model shape its clock and KV capacity follow (a built-in
    shape such as ``gemma-3-12b``, or a config.json / model folder); None: the 7B target."""
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


@dataclass(frozen=True)
class ServerConfig:
    """The ``server:`` section of an ``odma-mlu serve`` YAML file (odma_mlu/server/settings.py).

    Bind address, port and API key are deliberately *not* here: they are deployment
    decisions taken on the command line (or the systemd unit), so a config file copied
    between hosts can never silently expose a server or carry a secret.
    """

    def __post_init__(self) -> None:
        validate_fields(self)

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
    """On SIGTERM, in-flight requests get this long to finish (0: none); those still running
    then get a 503 (streams: an error event, then ``[DONE]``) and the engine stops."""
    body_read_timeout_s: float = 30.0
    """A request body not fully received within this long is answered 408 (slow clients
    cannot hold connections open)."""
    reasoning_parser: str | None = None
    """``deepseek_r1``: chat answers split the ``<think>`` part into ``reasoning_content``
    (as vLLM's ``--reasoning-parser deepseek_r1``); None leaves it in ``content``."""
    request_log: str | None = None
    """A JSONL file to append each finished request to (prompt text and output length, the
    format ``odma-mlu predictor train --data`` reads): fit the predictor to this traffic.
    None (default): nothing is logged (the log holds prompts)."""
    log_level: str = "info"
