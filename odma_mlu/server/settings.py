"""What ``odma-mlu serve`` runs: config file + flags -> settings -> an LLMEngine.

A serve YAML file is an ``EngineConfig`` (read by ``config.from_mapping``) plus an
optional ``server:`` section (``ServerConfig``); unknown keys are rejected by name at every
level. Command-line flags override the file. Bind address, port and API key come only from
flags or the environment (see ``ServerConfig``).

KV capacity, in order:
1. ``cache.kv_capacity_tokens`` when set (any backend);
2. mlu / cuda: ``total * memory_fraction - (total - free) - weight bytes``, measured before the
   weights load, divided by the model's KV bytes per token;
3. emulated: the profiled card's capacity for the target shape (the 7B on an MLU370-X4:
   ~118K tokens), so the emulated server admits and preempts as the card would;
4. cpu: ``server.cpu_kv_capacity_tokens`` (host RAM is shared, never sized from it).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


from odma_mlu.config import (DEFAULT_PROFILE, EngineConfig, ServerConfig, from_mapping, load_model_spec,
                             read_yaml_mapping)
from odma_mlu.errors import ConfigError

log = logging.getLogger("odma_mlu.server")

API_KEY_ENV = "ODMA_API_KEY"
MIN_KV_TOKENS = 256


@dataclass(frozen=True)
class ServeSettings:
    engine: EngineConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)


def load_serve_file(path: str | Path) -> tuple[EngineConfig, ServerConfig]:
    path = Path(path)
    data = read_yaml_mapping(path)
    server = from_mapping(ServerConfig, data.pop("server", None) or {}, f"{path}.server")
    engine = from_mapping(EngineConfig, data, str(path))
    return engine, server


def settings_from_args(ns: argparse.Namespace) -> ServeSettings:
    """Merge ``--config`` (or ``--model``) with the other serve flags."""
    if getattr(ns, "config", None):
        engine, server = load_serve_file(ns.config)
    else:
        # --model alone: keep the folder's dtype (the backend check below may lower it).
        engine, server = EngineConfig(model=ns.model, dtype="auto"), ServerConfig()
    if getattr(ns, "backend", None):
        engine = replace(engine, backend=ns.backend)
    if getattr(ns, "emulated_target", None):
        engine = replace(engine, emulated_target=ns.emulated_target)
    if getattr(ns, "kv_policy", None):
        engine = replace(engine, cache=replace(engine.cache, policy=ns.kv_policy))
    if getattr(ns, "predictor", None):
        engine = replace(engine, predictor=ns.predictor)
    if getattr(ns, "reasoning_parser", None):
        server = replace(server, reasoning_parser=None if ns.reasoning_parser == "none" else ns.reasoning_parser)
    api_key = _api_key(getattr(ns, "api_key", None))
    port = getattr(ns, "port", 8000)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be an integer in [0, 65535], got {port!r}")
    _check_server(server)
    return ServeSettings(engine=engine, server=server, host=getattr(ns, "host", "127.0.0.1") or "127.0.0.1",
                         port=port, api_key=api_key)


def _api_key(flag: str | None) -> str | None:
    """--api-key, else $ODMA_API_KEY, else None (no auth). An empty or blank key is an error:
    it would silently turn authentication off."""
    for where, key in (("--api-key", flag), (f"${API_KEY_ENV}", os.environ.get(API_KEY_ENV))):
        if key is None:
            continue
        if not key.strip():
            raise ConfigError(f"{where} is empty: that would disable authentication silently; give a key "
                              f"(e.g. `openssl rand -hex 24`) or leave {where} unset for no auth")
        if key != key.strip() or any(not c.isprintable() for c in key):
            raise ConfigError(f"{where} has surrounding whitespace or unprintable characters; clients could "
                              "never send it in an Authorization header")
        return key
    return None


def _check_server(s: ServerConfig) -> None:
    if not 0.0 < s.memory_fraction <= 1.0:
        raise ConfigError(f"server.memory_fraction must be in (0, 1], got {s.memory_fraction}")
    for name in ("max_waiting_requests", "max_body_bytes", "default_max_tokens", "cpu_kv_capacity_tokens"):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"server.{name} must be a positive integer, got {v!r}")
    if s.drain_timeout_s < 0:
        raise ConfigError(f"server.drain_timeout_s must be >= 0, got {s.drain_timeout_s}")


def resolve_model_path(model: str) -> Path:
    """A model *folder* (with weights): built-in shape names have no weights to serve."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {model!r} is not a model folder with a config.json (relative paths are from "
                          f"the current directory, {Path.cwd()}); for CI write a tiny one with "
                          "`python tools/make_tiny_model.py out/tiny-qwen2`")
    return path


def kv_capacity_tokens(cfg: EngineConfig, server: ServerConfig, backend: Any, model_path: Path,
                       dtype: str | None) -> int:
    """KV capacity for the engine (module docstring); called before the weights load."""
    if cfg.cache.kv_capacity_tokens is not None:
        return int(cfg.cache.kv_capacity_tokens)
    if backend.name == "emulated":  # the card's capacity for the target shape (7B on MLU370-X4)
        tokens = int(backend.kv_capacity_tokens(cfg.cache.activation_reserve_fraction))
        if tokens < 256:
            raise ConfigError(f"emulated_target {backend.target_model.name}: its weights leave {tokens} KV tokens on "
                              f"{backend.profile.name}; set cache.kv_capacity_tokens (the KV budget to emulate)")
        return tokens
    if backend.name == "cpu":
        return server.cpu_kv_capacity_tokens
    spec = load_model_spec(str(model_path), dtype=dtype)
    info = backend.mem_get_info()
    in_use = info.total_bytes - info.free_bytes
    budget = info.total_bytes * server.memory_fraction - in_use - spec.weight_bytes
    tokens = int(budget // spec.kv_bytes_per_token)
    log.info("KV capacity: %.2f GiB total x %.2f - %.2f GiB in use - %.2f GiB weights = %d tokens",
             info.total_bytes / 2**30, server.memory_fraction, in_use / 2**30, spec.weight_bytes / 2**30, tokens)
    if tokens < MIN_KV_TOKENS:
        raise ConfigError(f"only {tokens} KV tokens fit on {backend.name} (total {info.total_bytes / 2**30:.1f} GiB,"
                          f" free {info.free_bytes / 2**30:.1f} GiB, weights {spec.weight_bytes / 2**30:.1f} GiB, "
                          f"memory_fraction {server.memory_fraction}); raise server.memory_fraction, free the "
                          "card (cnmon), or set cache.kv_capacity_tokens")
    return tokens


def _dtype_for(cfg: EngineConfig, backend: Any, model_path: Path) -> str | None:
    if cfg.dtype != "auto":
        return cfg.dtype
    import torch

    folder = load_model_spec(str(model_path), dtype=None).dtype
    if backend.supports_dtype(getattr(torch, folder)):
        return None
    log.warning("backend %s does not support the folder's %s; serving in float16", backend.name, folder)
    return "float16"


def build_engine(settings: ServeSettings) -> Any:
    """Load the model and policy: the slow part of startup (weights from disk)."""
    from odma_mlu.predictor.registry import load_predictor
    from odma_mlu.backends import get_backend
    from odma_mlu.engine.llm_engine import LLMEngine

    cfg = settings.engine
    model_path = resolve_model_path(cfg.model)
    emulated = cfg.backend == "emulated"
    try:
        backend = get_backend(cfg.backend, profile=(cfg.profile or DEFAULT_PROFILE) if emulated else None, pace=True,
                              target_model=cfg.emulated_target)
    except ConfigError as e:
        if cfg.emulated_target is None or not emulated:
            raise
        raise ConfigError(f"emulated_target = {cfg.emulated_target!r}: {e}") from e
    dtype = _dtype_for(cfg, backend, model_path)
    capacity = kv_capacity_tokens(cfg, settings.server, backend, model_path, dtype)
    predictor = None
    if cfg.cache.policy in ("odma", "s3"):
        try:
            predictor = load_predictor(cfg.predictor)
        except ConfigError:
            if cfg.predictor is not None:
                raise
            # A damaged bundled model must not stop serving: the online predictor needs none.
            log.warning("the bundled learned predictor could not be read; using the online 'simple' predictor")
            predictor = load_predictor("simple")
    log.info("loading %s on %s (policy %s, KV %d tokens)", model_path, backend.describe(), cfg.cache.policy, capacity)
    engine = LLMEngine(model_path, kv_policy=cfg.cache.policy, backend=backend, dtype=dtype,
                       kv_capacity_tokens=capacity, predictor=predictor, cache=cfg.cache, scheduler=cfg.scheduler,
                       profile=None if emulated else cfg.profile, seed=cfg.seed,
                       request_log=settings.server.request_log)
    if cfg.cache.policy == "odma" and not emulated:
        if engine.priced_by is not None:
            log.info("odma prices its runs and copies with device profile %s", engine.priced_by)
        else:
            log.warning("no device profile for backend %s: odma holds %d tokens ahead of growth and never copies or moves KV; "
                        "measure the card with `odma-mlu profile-bandwidth` and set `profile:`", backend.name,
                        cfg.cache.odma.chunk_tokens)
    return engine
