"""Build a KV policy by name (the names the CLI and configs accept)."""

from __future__ import annotations

from odma_mlu.config import CacheConfig
from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.run_pricing import RunCost
from odma_mlu.kvcache.policy import KVPolicy

POLICY_NAMES = ("static", "s3", "odma", "paged", "exact", "ideal")


def make_policy(name: str, arena: KVArena, cache: CacheConfig, max_new_tokens: int,
                drift_detector: object | None = None, run_cost: RunCost | None = None) -> KVPolicy:
    """``run_cost`` prices runs and copies for ODMA's copy decision (the emulator's cost
    model); without it ODMA never copies or moves KV."""
    if name == "static":
        from odma_mlu.kvcache.static import StaticPolicy

        return StaticPolicy(arena)
    if name == "exact":
        from odma_mlu.kvcache.exact import ExactPolicy

        return ExactPolicy(arena)
    if name == "s3":
        from odma_mlu.kvcache.s3 import S3Policy

        return S3Policy(arena, cache.s3_num_buckets)
    if name == "paged":
        from odma_mlu.kvcache.paged import PagedPolicy

        return PagedPolicy(arena, cache.page_size_tokens, cache.watermark_fraction)
    if name == "ideal":
        from odma_mlu.kvcache.paged import IdealPolicy

        return IdealPolicy(arena)
    if name == "odma":
        from odma_mlu.kvcache.odma import OdmaPolicy

        if drift_detector is None and cache.odma.drift_detection:
            from odma_mlu.predictor.drift import KSDriftDetector

            drift_detector = KSDriftDetector()
        granule = cache.odma.granule_tokens or cache.page_size_tokens
        return OdmaPolicy(arena, max_new_tokens, cache.odma, drift_detector, cache.watermark_fraction, run_cost,
                          granule_tokens=granule, min_run_tokens=granule)
    raise ConfigError(f"unknown KV policy {name!r}; choose one of {list(POLICY_NAMES)}")
