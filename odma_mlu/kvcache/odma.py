"""``odma``: predicted-length buckets, re-learned boundaries, a safety pool, elastic slabs.

::

    arena:  [ main region ......................................... | safety pool ]
    claim = prompt + smallest bucket >= predicted length at ``target_coverage``;
    bucket edges re-optimized (exact DP) from the lengths of completed requests.

Strict mode (the paper): the whole claim is reserved up front. Elastic mode (default)
holds only ``live + chunk`` slots, placed at the start of the smallest hole that could take
the whole claim, so the request usually grows in place::

    |..B..|  A live  | A chunk |   free: A grows here in place    |..C..|
          ^ A placed at the start of the smallest hole >= A's claim

When the slots after a slab are taken it moves (one contiguous copy, counted in
``migrated_bytes``) to a new hole, else to the safety pool; if only small scattered holes
are left it compacts the main region (slides slabs together); only when nothing fits does
the scheduler preempt. A request's KV is always one contiguous slab. Uncertain requests
(q_high / q_mid > ``uncertainty_ratio``) start in the pool. Every constant is in ``OdmaConfig``.
"""

from __future__ import annotations

from odma_mlu.config import OdmaConfig
from odma_mlu.kvcache.arena import KVArena, KVLocation
from odma_mlu.kvcache.extent import Extent, ExtentAllocator
from odma_mlu.kvcache.policy import ContiguousPolicy, GrowResult, GrowStatus, PolicyStats, ReserveRequest, _Slab
from odma_mlu.predictor.histogram import OnlineLengthHistogram


class OdmaPolicy(ContiguousPolicy):
    name = "odma"
    uses_prediction = True

    def __init__(self, arena: KVArena, max_new_tokens: int, config: OdmaConfig = OdmaConfig(),
                 drift_detector: object | None = None) -> None:
        assert 0.0 <= config.safety_fraction < 1.0, "safety_fraction must be in [0, 1)"
        assert config.chunk_tokens >= 1, "chunk_tokens must be >= 1"
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
        self.compactions = 0
        self.overcommit = max(1.0, config.overcommit_initial)
        self._claims_total = 0

    @property
    def main(self) -> ExtentAllocator:
        return self.regions[0]

    @property
    def pool(self) -> ExtentAllocator | None:
        return self.regions[1] if len(self.regions) > 1 else None

    # -- sizes ---------------------------------------------------------------------------
    def _bucket_tokens(self, generated_tokens: float, req_max_new: int) -> int:
        for e in self.histogram.boundaries.edges_tokens:
            if generated_tokens <= e:
                return min(e, req_max_new)
        return req_max_new

    def _is_uncertain(self, req: ReserveRequest) -> bool:
        return req.prediction is None or req.prediction.ratio > self.config.uncertainty_ratio

    def initial_tokens(self, req: ReserveRequest) -> int:
        """The claim: prompt + the bucket of the predicted length at ``target_coverage``."""
        generated = req.num_tokens - req.prompt_tokens
        want = float(req.max_new_tokens) if req.prediction is None else req.prediction.at(self.config.target_coverage)
        # A recomputed request already has ``generated`` tokens: its bucket must exceed them.
        bucket = self._bucket_tokens(max(want, generated + 1), req.max_new_tokens)
        return max(req.num_tokens, req.prompt_tokens + bucket)

    def region_for(self, req: ReserveRequest, size: int) -> ExtentAllocator | None:
        """Strict mode: uncertain requests try the pool first; everyone else the main region."""
        pool = self.pool
        if pool is not None and self._is_uncertain(req) and pool.can_allocate(size):
            return pool
        return self.main if self.main.can_allocate(size) else None

    # -- elastic placement ---------------------------------------------------------------
    def _place(self, region: ExtentAllocator, claim: int, hard: int) -> Extent | None:
        """``hard`` slots in the smallest hole that could hold the whole claim (after the room
        its left neighbour still needs, where the hole is big enough), else the smallest
        hole that holds ``hard``."""
        hole = region.smallest_hole(claim)
        if hole is not None:
            hole_len, hole_start = hole
            # Leave the left neighbour room to reach its own claim when the hole allows it,
            # so the two do not collide (a collision costs a move).
            left = region.used_ending_at(hole_start)
            owner = self.slab_at(left.start) if left is not None else None
            room = 0 if owner is None else max(0, owner.claim_tokens - owner.extent.length)
            return region.allocate_at(hole_start + min(room, hole_len - claim), hard, hole_start)
        return region.allocate(hard)

    def _hard_size(self, req: ReserveRequest, claim: int) -> int:
        return min(claim, req.num_tokens + self.config.chunk_tokens)

    def can_reserve(self, req: ReserveRequest) -> bool:
        if not self.config.elastic:
            return super().can_reserve(req)
        claim = self.initial_tokens(req)
        pool = self.pool
        if pool is not None and self._is_uncertain(req) and pool.can_allocate(claim):
            return True
        hard = self._hard_size(req, claim)
        return self.main.can_allocate(hard) and self._may_admit(hard, claim)

    def _may_admit(self, hard: int, claim: int) -> bool:
        """The watermark of free slots and the adaptive overcommit of claims both hold."""
        main = self.main
        if main.free_tokens - hard < self.config.admission_watermark_fraction * main.capacity_tokens:
            return False
        return self._claims_total + claim <= self.overcommit * main.capacity_tokens

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        if not self.config.elastic:
            return super().reserve(req)
        assert req.request_id not in self._slabs, f"request {req.request_id} already holds KV"
        claim = self.initial_tokens(req)
        pool = self.pool
        if pool is not None and self._is_uncertain(req):
            ext = pool.allocate(claim)
            if ext is not None:
                self.add_slab(req, pool, ext, claim)
                return KVLocation(capacity_tokens=ext.length, start_slot=ext.start)
        hard = self._hard_size(req, claim)
        if not self._may_admit(hard, claim):
            return None
        ext = self._place(self.main, claim, hard)
        if ext is None:
            return None
        self.add_slab(req, self.main, ext, claim)
        return KVLocation(capacity_tokens=ext.length, start_slot=ext.start)

    def compact(self, need_tokens: int) -> int:
        """Open a hole of ``need_tokens`` in the main region by copying as little KV as possible.

        Over the slabs in address order, find the run of consecutive slabs whose surrounding
        gaps add up to ``need_tokens`` with the least live KV inside (two pointers), then
        slide that run down, in order, onto the slab before it: the gaps merge into one hole
        after the run. Returns the tokens copied.
        """
        main = self.main
        used = main.used_extents()
        if not used:
            return 0
        slabs = [self.slab_at(e.start) for e in used]
        assert all(s is not None for s in slabs), "compaction found a slab without an owner"
        lives = [min(s.live_tokens, e.length) for s, e in zip(slabs, used)]  # type: ignore[union-attr]
        # gap[k]: free slots just before slab k; gap[n]: after the last slab.
        bounds = [main.base] + [e.end for e in used]
        gap = [e.start - b for e, b in zip(used, bounds)] + [main.base + main.capacity_tokens - used[-1].end]
        # Sliding slabs i..j down onto the end of slab i-1 merges gap[i..j+1] into one hole
        # at a cost of their live KV. Two pointers: for each j, the largest such i.
        best: tuple[int, int, int] | None = None
        i = 0
        window_gaps = 0  # sum gap[i..j]
        cost = 0
        for j in range(len(used)):
            window_gaps += gap[j]
            cost += lives[j]
            while i < j and window_gaps - gap[i] + gap[j + 1] >= need_tokens:
                window_gaps -= gap[i]
                cost -= lives[i]
                i += 1
            if window_gaps + gap[j + 1] >= need_tokens and (best is None or cost < best[0]):
                best = (cost, i, j)
        if best is None:
            return 0
        _, i, j = best
        pos = used[i - 1].end if i > 0 else main.base
        copied = 0
        for k in range(i, j + 1):
            ext, slab, live = used[k], slabs[k], lives[k]
            if ext.start != pos:
                main.free(ext)
                new = main.allocate_at(pos, ext.length, pos)
                assert new is not None, "compaction target must be free"
                # Overlapping ranges are fine: the arena copies through a temporary.
                self.arena.move(range(ext.start, ext.start + live), range(new.start, new.start + live))
                self._owner[new.start] = self._owner.pop(ext.start)
                slab.extent = new  # type: ignore[union-attr]
                copied += live
            pos += ext.length
        self.compactions += 1
        self.migrated_tokens += copied
        return copied

    def _evict_right_neighbour(self, slab: _Slab, size: int) -> int | None:
        """Make room after ``slab`` by moving its right neighbour when that copies less KV
        than moving ``slab`` itself. Returns tokens copied, or None if it did not help."""
        region = slab.allocator
        right = self.slab_at(slab.extent.end)
        if right is None or right.allocator is not region or right.live_tokens >= slab.live_tokens:
            return None
        extra = size - slab.extent.length
        if right.extent.length + region.free_run_after(right.extent.end) < extra:
            return None  # even with the neighbour gone the run would be too short
        new = region.allocate(right.extent.length)
        if new is None:
            return None
        live = min(right.live_tokens, right.extent.length)
        self.relocate(right, region, new, live)
        return live

    # -- growth --------------------------------------------------------------------------
    def _raise_claim(self, slab: _Slab, needed_tokens: int) -> None:
        """Overflow past the claim: the next bucket, at least ``growth_factor`` x the old."""
        req_max_new = slab.max_total_tokens - slab.prompt_tokens
        bucket = self._bucket_tokens(needed_tokens - slab.prompt_tokens, req_max_new)
        floor = min(req_max_new, int((slab.claim_tokens - slab.prompt_tokens) * self.config.growth_factor))
        new_claim = slab.prompt_tokens + max(bucket, floor, needed_tokens - slab.prompt_tokens)
        slab.claim_tokens = min(new_claim, slab.max_total_tokens)

    def add_slab(self, req: ReserveRequest, region: ExtentAllocator, extent: Extent, claim_tokens: int) -> None:
        super().add_slab(req, region, extent, claim_tokens)
        self._claims_total += claim_tokens

    def grow(self, request_id: str, slab: _Slab, needed_tokens: int) -> GrowResult:
        if needed_tokens > slab.claim_tokens:
            before = slab.claim_tokens
            self._raise_claim(slab, needed_tokens)
            self._claims_total += slab.claim_tokens - before
        result = self._grow(slab, needed_tokens)
        if result.status == GrowStatus.NO_ROOM:
            self.overcommit = max(1.0, self.overcommit * self.config.overcommit_decrease)
        return result

    def _grow(self, slab: _Slab, needed_tokens: int) -> GrowResult:
        live = needed_tokens - 1  # KV written so far; the needed slot is the next one
        if not self.config.elastic:
            targets = [self.main] + ([self.pool] if self.pool is not None else [])
            if slab.allocator is not self.main:
                targets = [slab.allocator] + [r for r in targets if r is not slab.allocator]
            result = self.try_grow_to(slab, slab.claim_tokens, live, targets)
            return result or GrowResult(GrowStatus.NO_ROOM)
        target = max(needed_tokens, min(slab.claim_tokens, live + self.config.chunk_tokens))
        if self.grow_in_place(slab, target, needed_tokens):
            return GrowResult(GrowStatus.OK, 0, "in_place")
        moved = self._evict_right_neighbour(slab, needed_tokens)
        if moved is not None and self.grow_in_place(slab, target, needed_tokens):
            return GrowResult(GrowStatus.OK, moved, "neighbour_moved")
        new = self._place(self.main, slab.claim_tokens, target)
        if new is not None:
            self.relocate(slab, self.main, new, live)
            return GrowResult(GrowStatus.OK, live, "moved")
        pool = self.pool
        if pool is not None and slab.allocator is not pool:
            new = pool.allocate(slab.claim_tokens) or pool.allocate(target)
            if new is not None:
                self.relocate(slab, pool, new, live)
                return GrowResult(GrowStatus.OK, live, "safety_pool")
        main = self.main
        if main.free_tokens >= max(target, self.config.compact_min_free_fraction * main.capacity_tokens):
            copied = self.compact(target)
            new = main.allocate(target)
            if new is not None:
                self.relocate(slab, main, new, live)
                return GrowResult(GrowStatus.OK, copied + live, "compacted")
        return GrowResult(GrowStatus.NO_ROOM)

    def check_integrity(self) -> None:
        super().check_integrity()
        total = sum(s.claim_tokens for s in self._slabs.values())
        assert total == self._claims_total, f"claims counter {self._claims_total} != {total}"
        assert self.overcommit >= 1.0, f"overcommit {self.overcommit} below 1"

    # -- completion ----------------------------------------------------------------------
    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self._claims_total -= self._slabs[request_id].claim_tokens
        super().release(request_id, generated_tokens)
        if generated_tokens is None:
            return
        self.overcommit = min(self.config.overcommit_max, self.overcommit + self.config.overcommit_increase)
        reoptimized = self.histogram.observe(generated_tokens)
        detector = self.drift_detector
        if detector is not None and not reoptimized:
            if getattr(detector, "observe")(generated_tokens, self.histogram):
                self.histogram.reoptimize()

    def stats(self) -> PolicyStats:
        base = super().stats()
        pool = self.pool
        extra = {"safety_pool_used_tokens": float(pool.used_tokens if pool else 0),
                 "safety_pool_tokens": float(pool.capacity_tokens if pool else 0),
                 "reoptimizations": float(self.histogram.num_reoptimizations),
                 "compactions": float(self.compactions), "overcommit": self.overcommit}
        return PolicyStats(**{**base.__dict__, "bucket_edges_tokens": self.histogram.boundaries.edges_tokens,
                              "extra": extra})
