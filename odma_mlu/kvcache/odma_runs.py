"""The run book ODMA keeps: each request's ordered runs, in granules, and the two indexes
placement and growth read next to them, kept in step with every change.

::

    request r:  runs [(region, Extent)...]   the last run is the one that grows
                held_units = sum of run lengths, claim_units = claim in granules
    tail_rooms: end granule of r's last run -> room(r) = claim_units - held_units (>= 0)
                (the room a hole starting there begins with: ``OdmaPolicy._fit``)
    owner_at:   first granule of every run -> r   (who blocks a growing run)

Mechanism only: the book records and carries out what the policy (odma.py) decided; it
picks nothing. ``check_integrity`` rebuilds both indexes from the runs and compares.
"""

from __future__ import annotations

from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.extent import Extent, ExtentAllocator


class OdmaRequest:
    """One request's runs and sizes. Counters kept beside the runs are read on every
    placement next to the request, so no placement walks its runs."""

    __slots__ = ("request_id", "runs", "held_units", "prompt_tokens", "max_total_tokens", "claim_tokens",
                 "claim_units", "first_claim_tokens", "live_tokens", "prefer_safety", "read_per_block", "pinned",
                 "compact_retry_tokens")

    def __init__(self, request_id: str, prompt_tokens: int, max_total_tokens: int, claim_tokens: int,
                 claim_units: int, live_tokens: int, prefer_safety: bool, read_per_block: bool = False,
                 pinned: bool = False) -> None:
        self.request_id = request_id
        self.runs: list[tuple[ExtentAllocator, Extent]] = []
        self.held_units = 0
        """Granules held: the runs' total length."""
        self.prompt_tokens = prompt_tokens
        self.max_total_tokens = max_total_tokens
        self.claim_tokens = claim_tokens
        self.claim_units = claim_units
        """The claim in granules."""
        self.first_claim_tokens = claim_tokens
        self.live_tokens = live_tokens
        self.prefer_safety = prefer_safety
        self.read_per_block = read_per_block
        """``ReserveRequest.read_per_block``: never copied into one run."""
        self.pinned = pinned or read_per_block
        """``ReserveRequest.pinned`` (or read per block): its runs never move for another's growth."""
        self.compact_retry_tokens = 0
        """Live tokens from which a request in several runs tries compaction again while it
        grows in place (``OdmaPolicy._compact``: set when a compaction finds no window)."""

    @property
    def room_units(self) -> int:
        """Granules it still expects to grow into past its last run (0 once it holds its claim)."""
        return max(0, self.claim_units - self.held_units)


class RunBook:
    def __init__(self) -> None:
        self.reqs: dict[str, OdmaRequest] = {}
        self.tail_rooms: dict[int, int] = {}
        """End granule of each request's last run -> its ``room_units``. Kept as ints, not the
        requests, so a placement's look-ups at its candidate holes touch no request."""
        self.owner_at: dict[int, OdmaRequest] = {}
        """First granule of every run -> its request."""

    def add_run(self, r: OdmaRequest, region: ExtentAllocator, ext: Extent) -> None:
        """Append a run: it becomes the request's last run (the one that grows)."""
        if r.runs:
            del self.tail_rooms[r.runs[-1][1].end]
        r.runs.append((region, ext))
        self.owner_at[ext.start] = r
        r.held_units += ext.length
        self.tail_rooms[ext.end] = r.room_units

    def replace_run(self, r: OdmaRequest, i: int, region: ExtentAllocator, ext: Extent) -> None:
        """``ext`` in place of ``r``'s run ``i`` (grown in place, or moved)."""
        _, old = r.runs[i]
        r.runs[i] = (region, ext)
        r.held_units += ext.length - old.length
        if ext.start != old.start:
            del self.owner_at[old.start]
            self.owner_at[ext.start] = r
        if i == len(r.runs) - 1:
            del self.tail_rooms[old.end]
            self.tail_rooms[ext.end] = r.room_units

    def set_claim(self, r: OdmaRequest, claim_tokens: int, claim_units: int) -> None:
        r.claim_tokens, r.claim_units = claim_tokens, claim_units
        self.tail_rooms[r.runs[-1][1].end] = r.room_units

    def take_runs(self, r: OdmaRequest) -> list[tuple[ExtentAllocator, Extent]]:
        """Drop all of ``r``'s runs from the book and hand them back (the caller frees them)."""
        runs, r.runs, r.held_units = r.runs, [], 0
        for _, ext in runs:
            del self.owner_at[ext.start]
        del self.tail_rooms[runs[-1][1].end]
        return runs

    def gather_into(self, r: OdmaRequest, live_tokens: int, region: ExtentAllocator, ext: Extent,
                    arena: KVArena, unit_tokens: int) -> None:
        """Copy ``r``'s first ``live_tokens`` from its runs, in order, to the start of ``ext``
        (already allocated), free the old runs, and make ``ext`` its only run."""
        pos = ext.start * unit_tokens
        left = live_tokens
        for old_region, old in self.take_runs(r):
            n = min(old.length * unit_tokens, left)
            if n > 0:
                arena.copy_run(old.start * unit_tokens, pos, n)
                pos += n
                left -= n
            old_region.free(old)
        self.add_run(r, region, ext)

    def move_run(self, r: OdmaRequest, i: int, region: ExtentAllocator, ext: Extent, live_tokens: int,
                 arena: KVArena, unit_tokens: int) -> None:
        """Copy the first ``live_tokens`` of ``r``'s run ``i`` to the start of ``ext`` (already
        allocated, as long as the run), free the old run, and put ``ext`` in its place."""
        old_region, old = r.runs[i]
        if live_tokens:
            arena.copy_run(old.start * unit_tokens, ext.start * unit_tokens, live_tokens)
        old_region.free(old)
        self.replace_run(r, i, region, ext)

    def replace_runs(self, changes: list[tuple[OdmaRequest, Extent, list[tuple[ExtentAllocator, Extent]]]]) -> None:
        """Put each change's pieces (allocated, in token order) in place of its request's run
        ``old``; the caller frees the old runs and moves the KV. Every old entry leaves the
        indexes before any new one enters: a piece may end where another change's old run
        ended."""
        changed = {id(r): r for r, _, _ in changes}
        for r in changed.values():
            del self.tail_rooms[r.runs[-1][1].end]
        # Matched by the old runs' starts before any run changes: a piece may start where
        # another of the same request's old runs did.
        replaced: dict[int, dict[int, list[tuple[ExtentAllocator, Extent]]]] = {}
        for r, old, pieces in changes:
            del self.owner_at[old.start]
            replaced.setdefault(id(r), {})[old.start] = pieces
            r.held_units += sum(ext.length for _, ext in pieces) - old.length
        for key, r in changed.items():
            by_start = replaced[key]
            r.runs = [run for region, e in r.runs for run in by_start.get(e.start, ((region, e),))]
        for r, _, pieces in changes:
            for _, ext in pieces:
                self.owner_at[ext.start] = r
        for r in changed.values():
            self.tail_rooms[r.runs[-1][1].end] = r.room_units

    def live_tokens_in(self, r: OdmaRequest, i: int, unit_tokens: int) -> int:
        """Tokens of ``r``'s live KV that its run ``i`` holds."""
        return self.live_tokens_by_start(r, unit_tokens)[r.runs[i][1].start]

    def live_tokens_by_start(self, r: OdmaRequest, unit_tokens: int) -> dict[int, int]:
        """Tokens of ``r``'s live KV that each of its runs holds, by the run's first granule."""
        out: dict[int, int] = {}
        left = r.live_tokens
        for _, ext in r.runs:
            n = ext.length * unit_tokens
            out[ext.start] = max(0, min(n, left))
            left -= n
        return out

    def check_integrity(self, unit_tokens: int) -> None:
        tail_rooms = {r.runs[-1][1].end: r.room_units for r in self.reqs.values()}
        assert tail_rooms == self.tail_rooms, "tail room index out of sync with the runs and claims"
        owners = {e.start: r.request_id for r in self.reqs.values() for _, e in r.runs}
        assert owners == {g: r.request_id for g, r in self.owner_at.items()}, "run owner index out of sync"
        for rid, r in self.reqs.items():
            assert r.runs, f"{rid} holds no run"
            assert r.live_tokens <= r.held_units * unit_tokens, f"{rid}: {r.live_tokens} live tokens held in {r.runs}"
            assert r.held_units == sum(e.length for _, e in r.runs), f"{rid}: held counter out of sync"
