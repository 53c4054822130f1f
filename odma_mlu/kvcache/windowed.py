"""The KV policy of a model with sliding-window layers: each request and its ring
(odma_mlu/kvcache/window.py: the ring's layout in the arena's lanes) held through one inner
full-attention policy, so both share one budget and one admission rule::

    reserve(req)           -> inner.reserve(req), then inner.reserve(<id>#ring)  (either fails: wait)
    ensure_capacity(id, n) -> the request to n tokens, its ring to rows_for(min(n, window))
    release(id)            -> both, on finish, preemption and abort alike
"""

from __future__ import annotations

from typing import Any

from odma_mlu.kvcache.arena import KVLocation
from odma_mlu.kvcache.policy import GrowResult, GrowStatus, ReserveRequest
from odma_mlu.kvcache.window import RingPool, ring_id
from odma_mlu.predictor.base import QUANTILES, LengthPrediction

class WindowedPolicy:
    """A full-attention KV policy that also holds each request's ring, as one policy.

    Everything is delegated to ``inner`` except admission (the request, then its ring
    ``"<id>#ring"``, both through ``inner``: no room for the ring = ``reserve`` returns None
    and the scheduler waits), growth (the ring grows with the request; blocked = NO_ROOM,
    the scheduler preempts) and release (the ring is freed on finish, preemption and abort
    alike). A policy that sizes a request's one run at admission (static, exact, S3) gives
    the ring its whole size, rows for min(that run, window), up front; the others reserve
    it at the prompt with the request's prediction turned into rows.
    """

    swappable = True  # a preempted request's runs and its ring rows go to the host (``swap_slots``)

    def __init__(self, inner: Any, rings: RingPool) -> None:
        self.inner = inner
        self.rings = rings
        rings.policy = inner

    def __getattr__(self, name: str) -> Any:  # name, layout, capacity_tokens, location, ...
        return getattr(self.inner, name)

    def _ring_request(self, req: ReserveRequest) -> ReserveRequest:
        rows = self.rings.rows_for
        rid, now = ring_id(req.request_id), rows(req.num_tokens)
        sized = getattr(self.inner, "initial_tokens", None)
        if sized is not None:  # ContiguousPolicy: the run it reserves now is all it gets
            full = max(now, rows(max(req.num_tokens, sized(req))))
            # prompt 0, no prediction, true length = the most: static, exact and S3 all size it at ``full``
            return ReserveRequest(rid, 0, full, now, None, full, read_per_block=True)
        prompt, most = rows(req.prompt_tokens), rows(req.max_total_tokens)
        grow_rows = max(1, most - prompt)
        prediction = None
        if req.prediction is not None:  # the ring's predicted growth: the request's, through rows_for
            prediction = LengthPrediction.from_values(
                [rows(req.prompt_tokens + req.prediction.at(q)) - prompt for q in QUANTILES], grow_rows, QUANTILES)
        return ReserveRequest(rid, prompt, grow_rows, now, prediction, read_per_block=True)

    def can_reserve(self, req: ReserveRequest) -> bool:
        return self.inner.can_reserve(req) and self.inner.can_reserve(self._ring_request(req))

    def reserve(self, req: ReserveRequest) -> KVLocation | None:
        ring = self._ring_request(req)  # before the request's reservation (S3 sizes by its state then)
        loc = self.inner.reserve(req)
        if loc is None:
            return None
        if self.inner.reserve(ring) is None:
            self.inner.release(req.request_id, None)
            return None
        self.rings.admit(req.request_id, req.num_tokens)
        return loc

    def ensure_capacity(self, request_id: str, needed_tokens: int) -> GrowResult:
        res = self.inner.ensure_capacity(request_id, needed_tokens)
        if res.status != GrowStatus.OK:
            return res
        ring = self._grow_ring(request_id, self.rings.rows_for(needed_tokens))
        rings = self.rings
        if ring.status != GrowStatus.OK:
            rings.blocked_grows += 1
            if ring.how:
                rings.moved(request_id)
            # the request's runs may have changed already: say so, or its cached location goes stale
            return GrowResult(ring.status, res.copied_tokens, res.how)
        if ring.how:
            rings.moved(request_id)
            rings.in_place_grows += ring.how == "in_place"
            rings.new_runs += ring.how in ("new_run", "pages")
            rings.copies += ring.how == "copied"
        rings.note_tokens(request_id, needed_tokens)
        return GrowResult(GrowStatus.OK, res.copied_tokens + ring.copied_tokens, res.how or ring.how)

    def _grow_ring(self, request_id: str, rows: int) -> GrowResult:
        """The ring to ``rows``: at once where the inner policy can (in place, or one new run
        placed with room); else, under a policy of granules (ODMA), one granule at a time,
        each going wherever a hole is (a block's rows need not be adjacent: the mapping goes
        through the location), so a fragmented arena still takes a ring's next block."""
        rid = ring_id(request_id)
        res = self.inner.ensure_capacity(rid, rows)
        unit = int(getattr(self.inner, "unit", 0))
        if res.status != GrowStatus.NO_ROOM or unit <= 0:
            return res
        held = self.inner.location(rid).capacity_tokens
        self.rings.stepped_grows += 1
        copied, how = 0, ""
        while held < rows:
            step = self.inner.ensure_capacity(rid, min(held + unit, rows))
            copied, how = copied + step.copied_tokens, how or step.how
            if step.status != GrowStatus.OK:
                return GrowResult(step.status, copied, how)
            held = self.inner.location(rid).capacity_tokens
        return GrowResult(GrowStatus.OK, copied, how or "new_run")

    def swap_slots(self, request_id: str, kv_tokens: int) -> tuple[int, ...]:
        """A swap moves the request's first ``kv_tokens`` slots and the ring rows that hold
        them (rows for min(kv_tokens, window) in every sliding layer): where a ring index
        lies among its rows depends on the index alone (``RingPool.ring_row``), so rows
        written back to the first rows of the ring it gets when re-admitted read the same."""
        return kv_tokens, self.rings.rows_for(kv_tokens)

    def swap_locations(self, request_id: str) -> tuple[KVLocation, ...]:
        return self.inner.location(request_id), self.rings.location(request_id)

    def release(self, request_id: str, generated_tokens: int | None) -> None:
        self.inner.release(request_id, generated_tokens)
        if self.rings.holds(request_id):
            # A ring's rows are no output length: only a policy that does not learn lengths hears "finished".
            learns = getattr(self.inner, "learns_lengths", False)
            self.inner.release(ring_id(request_id), None if learns else generated_tokens)
            self.rings.forget(request_id)

    def max_request_tokens(self) -> int:
        """The most tokens one request can hold *with its ring*: the largest n with n and
        rows_for(n), each rounded up to the inner policy's page (or granule), within the inner
        policy's largest request (so a request that can never run is rejected, not queued)."""
        most = self.inner.max_request_tokens()
        unit = max(1, int(getattr(self.inner, "page_tokens", 0) or getattr(self.inner, "unit", 1)))

        def fits(n: int) -> bool:
            return -(-n // unit) * unit + -(-self.rings.rows_for(n) // unit) * unit <= most

        lo, hi = 0, most  # fits(lo) (or lo == 0); the answer is in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def num_live(self) -> int:
        """Requests, not rings."""
        return len(self.rings.ring_ids())

    def live_ring_rows(self) -> int:
        return self.rings.live_rows()

    def check_integrity(self) -> None:
        self.inner.check_integrity()
        self.rings.check_integrity()
        live = self.inner.num_live()
        rings = self.rings.ring_ids()
        assert live == 2 * len(rings), f"{len(rings)} rings held by {live} live inner requests (want 2 per ring)"
        for rid in rings:
            self.inner.location(rid)  # the request and its ring are both live in the inner policy
            self.inner.location(ring_id(rid))
