"""``odma``: predicted-length buckets, re-learned boundaries, and a safety pool.

::

    arena:  [ main region: adaptive buckets ........................ | safety pool ]
             ^ first reservation = prompt + smallest bucket >= predicted length at
               ``target_coverage``; bucket edges re-optimized from completed lengths
                                                                        ^ uncertain requests
                                                                          and overflows

On overflow a request grows in place when its right neighbour is free, else moves (one
contiguous copy) to a larger bucket in the main region, else to the safety pool; only when
nothing fits does the scheduler preempt. Every constant is in ``OdmaConfig``.
"""

from __future__ import annotations

from odma_mlu.config import OdmaConfig
from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.extent import ExtentAllocator
from odma_mlu.kvcache.policy import ContiguousPolicy, GrowResult, GrowStatus, PolicyStats, ReserveRequest, _Slab
from odma_mlu.predictor.histogram import OnlineLengthHistogram


class OdmaPolicy(ContiguousPolicy):
    name = "odma"
    uses_prediction = True

    def __init__(self, arena: KVArena, max_new_tokens: int, config: OdmaConfig = OdmaConfig(),
                 drift_detector: object | None = None) -> None:
        assert 0.0 <= config.safety_fraction < 1.0, "safety_fraction must be in [0, 1)"
        pool = int(arena.capacity_tokens * config.safety_fraction)
        main = arena.capacity_tokens - pool
        regions = [ExtentAllocator(main, 0)]
        if pool > 0:
            regions.append(ExtentAllocator(pool, main))
        super().__init__(arena, regions)
        self.config = config
        self.max_new_tokens = max_new_tokens
        self.histogram = OnlineLengthHistogram(
            max_tokens=max_new_tokens, num_buckets=config.num_buckets, window=config.histogram_window,
            reoptimize_every=config.reoptimize_every, bin_tokens=config.histogram_bin_tokens)
        self.drift_detector = drift_detector
        self._uncertain: set[str] = set()
        self.reclaimed_tokens = 0

    @property
    def pool(self) -> ExtentAllocator | None:
        return self.regions[1] if len(self.regions) > 1 else None

    def _bucket_tokens(self, generated_tokens: float, req_max_new: int) -> int:
        edges = self.histogram.boundaries.edges_tokens
        for e in edges:
            if generated_tokens <= e:
                return min(e, req_max_new)
        return req_max_new

    def _is_uncertain(self, req: ReserveRequest) -> bool:
        return req.prediction is None or req.prediction.ratio > self.config.uncertainty_ratio

    def initial_tokens(self, req: ReserveRequest) -> int:
        generated = req.num_tokens - req.prompt_tokens
        if req.prediction is None:
            want = float(req.max_new_tokens)
        else:
            want = req.prediction.at(self.config.target_coverage)
        # A recomputed request already has ``generated`` tokens: its bucket must exceed them.
        bucket = self._bucket_tokens(max(want, generated + 1), req.max_new_tokens)
        return max(req.num_tokens, req.prompt_tokens + bucket)

    def region_for(self, req: ReserveRequest, size: int) -> ExtentAllocator | None:
        main, pool = self.regions[0], self.pool
        if pool is not None and self._is_uncertain(req) and pool.can_allocate(size):
            return pool
        return main if main.can_allocate(size) else None

    def place_under_pressure(self, req: ReserveRequest, size: int) -> tuple[ExtentAllocator, int] | None:
        """Start a request with less than its bucket when the bucket does not fit.

        Reclaims the unused tails of running slabs (largest first) until one hole holds the
        prompt plus ``reclaim_headroom_tokens``; the request then takes the largest hole up
        to its bucket. Requests whose tails were taken grow back in place while the space
        after them stays free, or move once (one contiguous copy).
        """
        cfg = self.config
        if not cfg.reclaim_unused_tails:
            return None
        main = self.regions[0]
        need = min(size, req.num_tokens + cfg.reclaim_headroom_tokens)
        if main.largest_free() < need:
            tails = sorted((s for s in self._slabs.values() if s.allocator is main
                            and s.extent.length - s.live_tokens > cfg.reclaim_headroom_tokens),
                           key=lambda s: s.extent.length - s.live_tokens, reverse=True)
            for slab in tails[:cfg.reclaim_max_slabs]:
                keep = slab.live_tokens + cfg.reclaim_headroom_tokens
                self.reclaimed_tokens += slab.extent.length - keep
                slab.extent = main.shrink(slab.extent, keep)
                if main.largest_free() >= need:
                    break
            if main.largest_free() < need:
                return None
        # Watermark: keep enough free slots (main + pool) for every running slab to grow
        # through one headroom; otherwise admitting now only trades for preemptions later.
        pool_free = self.pool.free_tokens if self.pool is not None else 0
        hard = min(size, main.largest_free())
        if main.free_tokens - hard + pool_free < len(self._slabs) * cfg.reclaim_headroom_tokens:
            return None
        return main, hard

    def grow(self, request_id: str, slab: _Slab, needed_tokens: int) -> GrowResult:
        req_max_new = slab.max_total_tokens - slab.prompt_tokens
        if needed_tokens <= slab.claim_tokens:
            new_size = slab.claim_tokens  # its tail was reclaimed: grow back to the claim
        else:
            bucket = self._bucket_tokens(needed_tokens - slab.prompt_tokens, req_max_new)
            floor = int((slab.claim_tokens - slab.prompt_tokens) * self.config.growth_factor)
            new_size = slab.prompt_tokens + max(bucket, min(floor, req_max_new), needed_tokens - slab.prompt_tokens)
            new_size = min(new_size, slab.max_total_tokens)
            slab.claim_tokens = new_size
        live = needed_tokens - 1  # KV written so far; the needed slot is the next one
        targets = [self.regions[0]] + ([self.pool] if self.pool is not None else [])
        if slab.allocator is not self.regions[0]:
            targets = [slab.allocator] + [r for r in targets if r is not slab.allocator]
        result = self.try_grow_to(slab, new_size, live, targets)
        if result is None and new_size > needed_tokens:
            # No room for the whole claim: settle for this step plus the headroom.
            small = min(slab.max_total_tokens, needed_tokens + self.config.reclaim_headroom_tokens)
            result = self.try_grow_to(slab, small, live, targets)
        return result or GrowResult(GrowStatus.NO_ROOM)

    def reserve(self, req: ReserveRequest):  # type: ignore[override]
        loc = super().reserve(req)
        if loc is not None and self._is_uncertain(req):
            self._uncertain.add(req.request_id)
        return loc

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        super().release(request_id, generated_tokens)
        self._uncertain.discard(request_id)
        if generated_tokens is None:
            return
        reoptimized = self.histogram.observe(generated_tokens)
        detector = self.drift_detector
        if detector is not None and not reoptimized:
            observe = getattr(detector, "observe")
            if observe(generated_tokens, self.histogram):
                self.histogram.reoptimize()

    def stats(self) -> PolicyStats:
        base = super().stats()
        pool = self.pool
        extra = {"safety_pool_used_tokens": float(pool.used_tokens if pool else 0),
                 "safety_pool_tokens": float(pool.capacity_tokens if pool else 0),
                 "reoptimizations": float(self.histogram.num_reoptimizations),
                 "reclaimed_tokens": float(self.reclaimed_tokens)}
        return PolicyStats(**{**base.__dict__, "bucket_edges_tokens": self.histogram.boundaries.edges_tokens,
                              "extra": extra})
