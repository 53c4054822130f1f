"""``odma`` v2: contiguity as a placement property.

A request's KV is an ordered list of runs. ODMA's job is to *place* each request so that
it almost always keeps one run, without copying to stay contiguous::

    arena:  [ main region ........................................ | safety region ]
             |A live|A room ->   |B live|B room ----->  |  free   |  long/uncertain

    claim  = prompt + smallest bucket >= predicted length at ``target_coverage``
             (bucket edges re-learned from completed lengths: OnlineLengthHistogram + DP)
    place  = the smallest hole that holds the left neighbour's remaining room *and* this
             claim; start after the neighbour's room, so both grow in place
    hold   = live + ``chunk_tokens`` (elastic; live alone for a ring, read per block) or the
             whole claim (strict, the paper); a growing request holds the economic run
             length instead where the device's costs are known (run_pricing.py);
             the rest of the claim is room kept for the request while nobody else needs it:
             when no hole fits a claim, the largest hole is used and the room is lent
    grow   = extend the last run in place; if its right side is taken, start a new run
             placed like a new request with the predicted remaining length as its claim;
             past the claim, the claim rises to the next bucket (at least ``growth_factor``x)
    copy   = only where the cost model says it pays: moving the runs into one hole costs
             a read and a write of the live KV now; keeping them costs the extra runs'
             read time on every remaining step (``RunCost``, from the device profile);
             and only into a hole with room for the whole claim (a lent run splits again)
    move   = before either: where the run that blocks the growth is another request's and
             moving it (whole, into a hole that holds it) costs less than the grower's new
             run would over its expected remaining steps, move it and grow in place
    compact= where the device reads a long one-run decode in place (the profile's view
             length), a blocked request of ``compact_from_tokens`` or more is copied into
             one run with room ahead, others' runs moved out of a window for it
             (``_compact``), before a copy or a new run is considered; a request in
             several runs past the view length tries it again as it grows in place
    admit  = the common watermark (``CacheConfig.watermark_fraction``) and, when
             ``claim_admission_factor`` > 0, the sum of running claims; with no request
             live, neither holds one back (nothing would run to change the answer)
    scatter= a prompt no hole holds takes the largest holes no shorter than the economic
             run length (whole granules, rounded down), or waits

Uncertain (q_high / q_mid > ``uncertainty_ratio``) and long (claim >= ``long_request_tokens``)
requests are placed in the safety region first, short ones in the main region first; each
spills into the other when its own has no hole, so no capacity is ever idle.
"""

from __future__ import annotations

from bisect import bisect_left

from odma_mlu.config import OdmaConfig
from odma_mlu.kvcache.arena import KVArena, KVLocation, covering_runs
from odma_mlu.kvcache.extent import Extent, ExtentAllocator
from odma_mlu.kvcache.odma_compaction import compact_into, find_slide, find_window, scan, slide_into
from odma_mlu.kvcache.odma_runs import OdmaRequest, RunBook
from odma_mlu.kvcache.policy import GrowResult, GrowStatus, KVPolicy, PolicyStats, ReserveRequest
from odma_mlu.kvcache.run_pricing import RunCost, copy_pays, economic_run_tokens, move_pays
from odma_mlu.predictor.drift import KSDriftDetector
from odma_mlu.predictor.histogram import OnlineLengthHistogram

PLACEMENT_CANDIDATES = 8
"""Holes (smallest first) examined for one that holds the neighbour's room and the claim."""
LEND_CANDIDATES = 4
"""Largest holes examined for the one with the most room to spare when none fits."""


class OdmaPolicy(KVPolicy):
    name = "odma"
    uses_prediction = True
    learns_lengths = True
    can_run_out_of_room = True

    def __init__(self, arena: KVArena, max_new_tokens: int, config: OdmaConfig = OdmaConfig(),
                 drift_detector: KSDriftDetector | None = None, watermark_fraction: float = 0.0,
                 run_cost: RunCost | None = None, granule_tokens: int = 1, min_run_tokens: int = 16) -> None:
        super().__init__(arena, watermark_fraction)
        assert 0.0 <= config.safety_fraction < 1.0, "safety_fraction must be in [0, 1)"
        assert config.chunk_tokens >= 1, "chunk_tokens must be >= 1"
        assert granule_tokens >= 1, "granule_tokens must be >= 1"
        # The allocator counts granules of ``granule_tokens`` (the factory: the page size) and
        # places a run only in a hole of at least ``min_run_tokens``, so no run reads worse
        # than a page. Finer granules (1 token) were measured worse: frees leave sub-page
        # holes no run may use, and preemptions rose 14x on Alpaca (docs/odma-sensitivity.md).
        self.unit = granule_tokens
        self.min_run_units = max(1, -(-min_run_tokens // granule_tokens))
        total = arena.capacity_tokens // granule_tokens
        safety = int(total * config.safety_fraction)
        main = total - safety
        self.main = ExtentAllocator(main, 0)
        self.safety = ExtentAllocator(safety, main) if safety > 0 else None
        self.config = config
        self.max_new_tokens = max_new_tokens
        self.run_cost = run_cost
        self.histogram = OnlineLengthHistogram(
            max_tokens=max_new_tokens, num_buckets=config.num_buckets, window=config.histogram_window,
            reoptimize_every=config.reoptimize_every, bin_tokens=config.histogram_bin_tokens)
        self.drift_detector = drift_detector
        self.book = RunBook()
        """Each request's runs and the indexes kept beside them (odma_runs.py)."""
        self._claims_total = 0
        self._moved: list[str] = []
        """Requests whose runs ``_move_blocker`` moved since ``take_moved`` was last called."""
        self.moved_runs = 0
        self.hold_ahead_tokens = config.chunk_tokens
        """The room the last growing request held ahead of its live tokens (``_ahead_tokens``)."""
        self._token_price_s = run_cost.decode_fixed_s() / max(1, arena.capacity_tokens) if run_cost else 0.0
        """What a token of KV capacity is worth per step (``_ahead_tokens``): a step's fixed time
        shared by as many requests as the capacity holds."""
        self.compactions = 0
        self.slides = 0
        """Compactions that slid runs together (the rest emptied a window)."""
        self.asked_tokens = 0
        """KV tokens running requests have asked for, summed over their steps (``ensure_capacity``):
        what their attention reads, per layer, the base of the slides' copy budget."""

    # -- sizes -------------------------------------------------------------------------
    def _bucket_tokens(self, generated_tokens: float, req_max_new: int) -> int:
        edges = self.histogram.boundaries.edges_tokens  # increasing
        i = bisect_left(edges, generated_tokens)
        return min(edges[i], req_max_new) if i < len(edges) else req_max_new

    def claim_tokens(self, req: ReserveRequest) -> int:
        """prompt + the bucket of the predicted length at ``target_coverage``."""
        generated = req.num_tokens - req.prompt_tokens
        want = float(req.max_new_tokens) if req.prediction is None else req.prediction.at(self.config.target_coverage)
        # A recomputed request already has ``generated`` tokens: its bucket must exceed them.
        bucket = self._bucket_tokens(max(want, generated + 1), req.max_new_tokens)
        return max(req.num_tokens, req.prompt_tokens + bucket)

    def _prefers_safety(self, req: ReserveRequest, claim: int) -> bool:
        """Uncertain (no prediction, or a wide one) or long."""
        prediction = req.prediction
        return (prediction is None or claim >= self.config.long_request_tokens
                or prediction.ratio > self.config.uncertainty_ratio)

    def _units(self, tokens: int) -> int:
        return -(-tokens // self.unit)

    def _ahead_tokens(self, read_per_block: bool, live_tokens: int | None = None) -> int:
        """Tokens held past what is live (elastic mode); none for a request read per block (a
        ring), whose runs cost nothing, so room held ahead would only be memory nobody uses.
        A new request holds ``chunk_tokens`` ahead; a growing one (``live_tokens`` given) the
        economic run length where the device's costs are known (run_pricing.py), never less."""
        if read_per_block:
            return 0
        base = self.config.chunk_tokens
        economic = None if live_tokens is None else self._economic_tokens(live_tokens)
        if economic is None:
            return base
        self.hold_ahead_tokens = max(base, economic)
        return self.hold_ahead_tokens

    def _economic_tokens(self, live_tokens: int) -> int | None:
        """The economic run length of a request with ``live_tokens`` (run_pricing.py); None
        until the device's costs and a mean completed length are known."""
        cost, mean_tokens = self.run_cost, self.histogram.mean_tokens
        if cost is None or mean_tokens is None or not self._token_price_s:
            return None
        return economic_run_tokens(cost, self.unit, live_tokens, mean_tokens, self._token_price_s)

    def _hold_units(self, num_tokens: int, claim: int, read_per_block: bool) -> int:
        hold_tokens = min(claim, num_tokens + self._ahead_tokens(read_per_block)) if self.config.elastic else claim
        return -(-hold_tokens // self.unit)

    def _regions(self, prefer_safety: bool) -> tuple[ExtentAllocator, ...]:
        if self.safety is None:
            return (self.main,)
        return (self.safety, self.main) if prefer_safety else (self.main, self.safety)

    # -- placement ---------------------------------------------------------------------
    def _fit(self, region: ExtentAllocator, want: int, hold: int, lend: bool = True) -> tuple[int, int] | None:
        """(start, start of its hole) in ``region`` for a run that will want ``want`` tokens and takes
        ``hold`` now: after the left neighbour's room in the smallest hole that has room for
        both. Failing that (the rooms oversubscribe memory), and if ``lend``: among the largest
        holes, the one with the most room to spare, split between the neighbour's room and ours
        in proportion to the two."""
        # The room a hole starts with: that of the request whose last run ends at the hole's
        # start (none: 0); a run ending at a region's base is the other region's.
        tail_rooms = self.book.tail_rooms
        base = region.base
        floor = max(hold, self.min_run_units)
        for hole_len, hole_start in region.holes_at_least(max(want, floor), PLACEMENT_CANDIDATES):
            room = tail_rooms.get(hole_start, 0) if hole_start != base else 0
            if hole_len >= room + want:
                return hole_start + room, hole_start
        if not lend:
            return None
        best: tuple[int, int, int] | None = None  # (spare, start, room)
        for hole_len, hole_start in region.largest_holes(LEND_CANDIDATES):
            if hole_len < floor:
                break
            room = tail_rooms.get(hole_start, 0) if hole_start != base else 0
            spare = hole_len - room - want
            if best is None or spare > best[0]:
                best = (spare, hole_start, room)
        if best is None:
            return None
        spare, hole_start, room = best
        hole_len = spare + room + want
        offset = (hole_len * room) // (room + want) if room + want > 0 else 0
        return hole_start + max(0, min(offset, hole_len - hold)), hole_start

    def _place(self, regions: tuple[ExtentAllocator, ...], want: int, hold: int, lend: bool = True
               ) -> tuple[ExtentAllocator, Extent] | None:
        for region in regions:
            fit = self._fit(region, want, hold, lend)
            if fit is not None:
                ext = region.allocate_at(fit[0], hold, fit[1])
                assert ext is not None, "a fitted slot range must be free"
                return region, ext
        return None

    # -- admission and reservation -----------------------------------------------------
    def _may_admit(self, hold: int, claim: int) -> bool:
        if not self.may_admit(hold):
            return False
        factor = self.config.claim_admission_factor
        return factor <= 0 or not self.book.reqs or self._claims_total + claim <= factor * self.capacity_tokens

    def can_reserve(self, req: ReserveRequest) -> bool:
        claim = self.claim_tokens(req)
        hold = self._hold_units(req.num_tokens, claim, req.read_per_block)
        if not self._may_admit(hold * self.unit, claim):
            return False
        return self.free_tokens() >= hold * self.unit

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        book = self.book
        assert req.request_id not in book.reqs, f"request {req.request_id} already holds KV"
        claim = self.claim_tokens(req)
        hold = self._hold_units(req.num_tokens, claim, req.read_per_block)
        if not self._may_admit(hold * self.unit, claim):
            return None
        prefer_safety = self._prefers_safety(req, claim)
        regions = self._regions(prefer_safety)
        claim_units = self._units(claim)
        placed = self._place(regions, claim_units, hold)
        pieces = [placed] if placed is not None else self._scatter(regions, self._units(req.num_tokens),
                                                                   req.read_per_block)
        if not pieces:
            return None
        r = OdmaRequest(req.request_id, req.prompt_tokens, req.max_total_tokens, claim, claim_units,
                        req.num_tokens, prefer_safety, req.read_per_block, req.pinned)
        book.reqs[req.request_id] = r
        for region, ext in pieces:
            book.add_run(r, region, ext)
        self.new_runs += len(pieces) - 1
        self._claims_total += claim
        if placed is not None:  # one run, nearly always: built here, without walking the runs
            return KVLocation(((placed[1].start * self.unit, placed[1].length * self.unit),))
        return self.location(req.request_id)

    def _scatter(self, regions: tuple[ExtentAllocator, ...], units: int, read_per_block: bool
                 ) -> list[tuple[ExtentAllocator, Extent]]:
        """No hole holds ``units``: take the largest holes until they do (several runs),
        rather than wait while the free memory would suffice; [] if they do not. A piece is
        read on every step of the request's life, so none is shorter than the economic run
        length, rounded down to whole granules (a shorter hole is worth more as a
        neighbour's room; docs/odma-sensitivity.md), while any request is live. A ring,
        read per block, takes any."""
        least = self.min_run_units
        # The floor waits for holes that running requests will free; with none live, no
        # hole will grow, and a floor that excludes one would hold the request back for good.
        economic = None if read_per_block or not self.book.reqs else self._economic_tokens(units * self.unit)
        if economic is not None:
            least = max(least, economic // self.unit)
        # Largest holes first, as few runs as possible; all holes of ``least`` or more if need be.
        holes = sorted(((n, s, region) for region in regions for n, s in region.largest_holes(region.num_free)
                        if n >= least), key=lambda h: -h[0])
        if sum(n for n, _, _ in holes) < units:
            return []
        pieces: list[tuple[ExtentAllocator, Extent]] = []
        left = units
        for n, start, region in holes:
            ext = region.allocate_at(start, min(n, left), start)
            assert ext is not None, "a listed hole must be free"
            pieces.append((region, ext))
            left -= ext.length
            if left <= 0:
                break
        return pieces

    # -- growth ------------------------------------------------------------------------
    def _raise_claim(self, r: OdmaRequest, needed_tokens: int) -> None:
        """Past the claim: the next bucket, at least ``growth_factor`` x the old claim."""
        req_max_new = r.max_total_tokens - r.prompt_tokens
        bucket = self._bucket_tokens(needed_tokens - r.prompt_tokens, req_max_new)
        floor = min(req_max_new, int((r.claim_tokens - r.prompt_tokens) * self.config.growth_factor))
        new_claim = min(r.max_total_tokens, r.prompt_tokens + max(bucket, floor, needed_tokens - r.prompt_tokens))
        self._claims_total += new_claim - r.claim_tokens
        self.book.set_claim(r, new_claim, self._units(new_claim))

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        r = self.book.reqs[request_id]
        assert needed_tokens <= r.max_total_tokens, \
            f"request {request_id} asks {needed_tokens} KV tokens, above its limit {r.max_total_tokens}"
        held = r.held_units * self.unit
        self.asked_tokens += needed_tokens
        if needed_tokens <= held:
            r.live_tokens = needed_tokens
            return GrowResult(GrowStatus.OK)
        if needed_tokens > r.claim_tokens:
            if needed_tokens > r.first_claim_tokens:
                self.mark_overflow(request_id)
            self._raise_claim(r, needed_tokens)
        target = max(needed_tokens, r.claim_tokens if not self.config.elastic
                     else min(r.claim_tokens, needed_tokens - 1 + self._ahead_tokens(r.read_per_block, r.live_tokens)))
        result = self._grow(request_id, r, held, needed_tokens, target)
        if result.status == GrowStatus.OK:
            r.live_tokens = needed_tokens
        return result

    def _grow(self, request_id: str, r: OdmaRequest, held_tokens: int, needed_tokens: int, target_tokens: int
              ) -> GrowResult:
        """Sizes in granules from here on."""
        held, needed, target = r.held_units, self._units(needed_tokens), self._units(target_tokens)
        compacts = self._compacts(r)
        if compacts and len(r.runs) > 1 and r.live_tokens >= max(self._view_tokens(), r.compact_retry_tokens):
            # Gathered on every step while in several runs past the view length, though it
            # may grow in place for long in a run placed after a failed compaction: try again.
            if self._compact(r, target):
                return GrowResult(GrowStatus.OK, r.live_tokens, "copied")
        region, last = r.runs[-1]
        for moved in (False, True):
            for size in (target, needed):
                grown = region.grow_in_place(last, last.length + size - held)
                if grown is not None:
                    self.book.replace_run(r, len(r.runs) - 1, region, grown)
                    self.in_place_grows += 1
                    return GrowResult(GrowStatus.OK, 0, "in_place")
            if moved or not self._move_blocker(r, region, last, needed - held):
                break
        live = r.live_tokens
        if compacts and self._compact(r, target):
            return GrowResult(GrowStatus.OK, live, "copied")
        if self._copy_pays(r, live):
            # Only into a hole with room for the whole claim: the copy pays by keeping the
            # request one run for the rest of its life, and a run squeezed between others'
            # rooms (lent) splits again (measured: one request copied up to 34 times).
            placed = self._place(self._regions(r.prefer_safety), self._units(r.claim_tokens), target, lend=False)
            if placed is not None:
                self.book.gather_into(r, live, *placed, self.arena, self.unit)
                self.copies += 1
                self.copied_tokens += live
                return GrowResult(GrowStatus.OK, live, "copied")
        remaining_want = max(target, self._units(r.claim_tokens)) - held
        for hold in (target - held, needed - held):
            placed = self._place(self._regions(r.prefer_safety), remaining_want, hold)
            if placed is not None:
                self.book.add_run(r, *placed)
                self.new_runs += 1
                return GrowResult(GrowStatus.OK, 0, "new_run")
        return GrowResult(GrowStatus.NO_ROOM)

    def _move_blocker(self, r: OdmaRequest, region: ExtentAllocator, last: Extent, need_units: int) -> bool:
        """Move the run that starts where ``r``'s last run ends, another request's, whole into a
        hole elsewhere, so ``r`` can grow in place; True if it moved. Only where the move pays
        (``move_pays``: the blocker's live tokens copied now, against the run ``r`` would start
        instead, read on its expected remaining steps), the freed room gives ``r`` the granules
        it needs, and a hole holds the blocker next to its left neighbour's room (not lent: a
        lent run would block someone again). The blocker keeps its number of runs; its cached
        location goes stale (``take_moved``)."""
        cost = self.run_cost
        y = self.book.owner_at.get(last.end)
        if cost is None or y is None or r.read_per_block or y.pinned:
            return False
        i = next(k for k, (_, e) in enumerate(y.runs) if e.start == last.end)
        y_region, blocker = y.runs[i]
        if y_region is not region or blocker.length + region.hole_at(blocker.end) < need_units:
            return False
        unit = self.unit
        moved_tokens = self.book.live_tokens_in(y, i, unit)
        if not move_pays(cost, unit, r.claim_tokens, r.live_tokens, r.prompt_tokens, moved_tokens,
                         self.arena.num_pending_copies):
            return False
        for dest_region in self._regions(y.prefer_safety):
            fit = self._fit(dest_region, blocker.length, blocker.length, lend=False)
            if fit is not None:
                break
        else:
            return False
        new = dest_region.allocate_at(fit[0], blocker.length, fit[1])
        assert new is not None, "a fitted slot range must be free"
        self.book.move_run(y, i, dest_region, new, moved_tokens, self.arena, unit)
        if moved_tokens:
            self.copies += 1
            self.copied_tokens += moved_tokens
        self._moved.append(y.request_id)
        self.moved_runs += 1
        return True

    # -- compaction --------------------------------------------------------------------
    def _compacts(self, r: OdmaRequest) -> bool:
        """A blocked request is compacted rather than given another run: where the device reads
        a long one-run decode in place, once it has ``compact_from_tokens`` live, if its limit
        lets it grow that long (with Alpaca's 512 new tokens none does on the MLU370-X4). The
        view length is what compaction buys (``StepWork.build``); None where the device
        gathers nothing or is not priced."""
        view = self._view_tokens()
        return (self.config.compact and view is not None and not r.read_per_block
                and r.live_tokens >= self.config.compact_from_tokens and r.max_total_tokens >= view)

    def _view_tokens(self) -> int | None:
        """The device's view length (``RunCost.view_min_tokens``), read when ODMA decides."""
        return self.run_cost.view_min_tokens() if self.run_cost is not None else None

    def _compact_room_tokens(self, live_tokens: int, free_tokens: int) -> int:
        """Room a compaction holds past ``live_tokens``: ``compact_room_fraction`` of them where
        ``free_tokens`` (free memory, the request's own runs counted free) shared among the
        live requests allows, down to ``compact_room_min_fraction`` at saturation, never
        under ``chunk_tokens``. At saturation a room is memory no one else may use (measured:
        at 0.1 it held 4% of the KV capacity on ServeGen, and the requests it kept out cost
        more steps than the compactions a smaller room brings cost in copies and gathers)."""
        cfg = self.config
        share = max(0, free_tokens) // max(1, len(self.book.reqs))
        room = min(int(live_tokens * cfg.compact_room_fraction), share)
        return max(cfg.chunk_tokens, int(live_tokens * cfg.compact_room_min_fraction), room)

    def _compact(self, r: OdmaRequest, target_units: int) -> bool:
        """Copy ``r`` into one run of ``target_units`` granules, or its live tokens and its
        room (``_compact_room_tokens``) if that is larger (failing that, ``chunk_tokens``
        more), others' runs moved out of a window for it, or else slid together within the
        copy budget (odma_compaction.py); True if it moved. Where neither qualifies, ``r``
        tries again once it has grown by that room (``compact_retry_tokens``)."""
        live = r.live_tokens
        floor = self.config.compact_from_tokens
        free_units = self.main.free_tokens + (self.safety.free_tokens if self.safety is not None else 0)
        room = self._compact_room_tokens(live, (free_units + r.held_units) * self.unit - live)
        hold_units = max(target_units, self._units(live + room))
        extents = scan(self.book, self._regions(r.prefer_safety), r, self.unit)
        window = find_window(extents, r, hold_units, self.unit, floor, free_units)
        if window is None:  # at saturation the room may be what is missing: hold what a new request would
            hold_units = max(target_units, self._units(live + self.config.chunk_tokens))
            window = find_window(extents, r, hold_units, self.unit, floor, free_units)
        if window is not None:
            moved, tokens = compact_into(self.book, window, r, hold_units, self._regions(False), self.arena, self.unit)
        else:
            budget_tokens = self.config.compact_copy_fraction * self.asked_tokens - self.copied_tokens - live
            slide = find_slide(extents, hold_units) if budget_tokens >= 0 else None
            if slide is None or slide.cost_tokens > budget_tokens:
                r.compact_retry_tokens = live + room
                return False
            moved, tokens = slide_into(self.book, slide, r, hold_units, self.arena, self.unit)
            self.slides += 1
        self._moved.extend(moved)
        self.copies += 1
        self.copied_tokens += tokens
        self.compactions += 1
        return True

    def take_moved(self) -> tuple[str, ...]:
        moved, self._moved = tuple(self._moved), []
        return moved

    def _copy_pays(self, r: OdmaRequest, live: int) -> bool:
        cost = self.run_cost
        if cost is None or live <= 0 or r.read_per_block:
            return False
        return copy_pays(cost, [e.length * self.unit for _, e in r.runs], r.claim_tokens, live, r.prompt_tokens,
                         self.arena.num_pending_copies)

    # -- reads and release -------------------------------------------------------------
    def location(self, request_id: str) -> KVLocation:
        unit = self.unit
        return KVLocation(tuple((e.start * unit, e.length * unit) for _, e in self.book.reqs[request_id].runs))

    def read_runs(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        unit = self.unit
        return covering_runs([e.length * unit for _, e in self.book.reqs[request_id].runs], num_tokens)

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        book = self.book
        r = book.reqs.pop(request_id)
        for region, ext in book.take_runs(r):
            region.free(ext)
        self._claims_total -= r.claim_tokens
        if generated_tokens is None:
            return
        reoptimized = self.histogram.observe(generated_tokens)
        detector = self.drift_detector
        if detector is not None and not reoptimized:
            if detector.observe(generated_tokens, self.histogram):
                self.histogram.reoptimize()

    def reserved_tokens(self) -> int:
        return (self.main.used_tokens + (self.safety.used_tokens if self.safety is not None else 0)) * self.unit

    def num_live(self) -> int:
        return len(self.book.reqs)

    def max_request_tokens(self) -> int:
        return (self.capacity_tokens // self.unit) * self.unit

    def check_integrity(self) -> None:
        self.main.check_integrity()
        if self.safety is not None:
            self.safety.check_integrity()
        reqs = self.book.reqs
        held = sum(r.held_units for r in reqs.values()) * self.unit
        assert held == self.reserved_tokens(), f"requests hold {held} tokens, regions say {self.reserved_tokens()}"
        self.book.check_integrity(self.unit)
        for rid, r in reqs.items():
            assert r.claim_units == self._units(r.claim_tokens), f"{rid}: claim in granules out of sync"
        total = sum(r.claim_tokens for r in reqs.values())
        assert total == self._claims_total, f"claims counter {self._claims_total} != {total}"

    def stats(self) -> PolicyStats:
        base = super().stats()
        safety = self.safety
        extra = {"safety_pool_used_tokens": float(safety.used_tokens * self.unit if safety else 0),
                 "safety_pool_tokens": float(safety.capacity_tokens * self.unit if safety else 0),
                 "hold_ahead_tokens": float(self.hold_ahead_tokens),
                 "moved_runs": float(self.moved_runs), "compactions": float(self.compactions),
                 "compaction_slides": float(self.slides),
                 "reoptimizations": float(self.histogram.num_reoptimizations)}
        return PolicyStats(**{**base.__dict__, "fragmentation": self.main.fragmentation(),
                              "bucket_edges_tokens": self.histogram.boundaries.edges_tokens, "extra": extra})
