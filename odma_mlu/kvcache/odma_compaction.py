"""ODMA's compaction: a long request copied into one run, a window made for it.

Where the device reads a long one-run decode in place (the profile's view length,
``StepWork.build``), a run that long is rarely free at saturation, so ``OdmaPolicy`` makes
one when such a request is blocked, or grows in several runs. First by emptying a window::

    blocked:  |B|  |r run 2|C  |D.......|   free   ...  |r run 1| ...
               <--------- window ---------->
    after:    |r .................... room|  |B|C|D|D ...  (B, C, D split into any holes,
                                                           r's old runs among them)

``find_window`` picks the stretch that copies the fewest tokens: the other requests' live
tokens in it, and ``r``'s own, but for its first run where the window starts at it (a
request blocked by a short run then moves that run away and stays where it is), among those
holding no pinned run (a shared prefix block, a ring) and no run of a compacted request (one
run of ``floor`` tokens or more) at least as long as ``r`` (moving it would cost the view it
was copied for: the longer request keeps its run, so two requests never take a window from
each other in turn), and whose occupants the free memory outside it then holds.
``compact_into`` moves them, whole-token-order, into the largest holes (they may end in
more runs: their decodes are gathered either way) and the request into the window.

Where no window qualifies (the arena held by longer compacted requests, or too little free
memory outside any window), by sliding runs together::

    before:  |B..|  free |r run 2|C.....| free  |D|  ...  |r run 1| ...
              <--------------- stretch --------------->
    after:   |B..|C.....|D|r ....................... room|  ...  (free)  ...

``find_slide`` picks the stretch whose holes and ``r``'s own runs hold the new run, with
the fewest live tokens in other requests' runs, among stretches without a pinned run;
``slide_into`` packs its other runs towards its start, each whole and in address order, so
no request gains a run and a compacted one keeps its view, and moves ``r`` into the room
they leave at its end. A slide copies more than a window (every run it passes), so the
policy budgets it (``compact_copy_fraction``).

Both searches read one ``scan`` of the regions' extents, made once per compaction.
Every move of either runs in one batch that reads all sources before writing any target
(``KVArena.copy_runs_at_once``): a target may be a source, since the window may hold the
request's own runs, the occupants go where it was, and a packed run may land where another
was.

Mechanism over the run book and the region allocators; the policy decides when
(``OdmaPolicy._compacts``) and how large.
"""

from __future__ import annotations

from typing import NamedTuple

from odma_mlu.kvcache.arena import KVArena
from odma_mlu.kvcache.extent import Extent, ExtentAllocator
from odma_mlu.kvcache.odma_runs import OdmaRequest, RunBook


class Piece(NamedTuple):
    """One extent of a region as a compaction for ``r`` sees it."""

    start: int
    length: int
    owner: OdmaRequest | None
    """Another request's run, which may move; None: room for ``r`` (a hole, or ``r``'s own run)."""
    live_tokens: int
    """The owner's live tokens in it."""
    fixed: bool
    """A pinned run (a shared prefix block, a ring), or one without an owner: nothing moves it."""


Scan = list[tuple[ExtentAllocator, list[Piece]]]


def scan(book: RunBook, regions: tuple[ExtentAllocator, ...], r: OdmaRequest, unit_tokens: int) -> Scan:
    """Each region's extents in address order, as ``find_window`` and ``find_slide`` read them:
    one pass over the tiling, made once per compaction."""
    owner_at = book.owner_at
    live_at: dict[int, int] = {}  # first granule of a run -> its owner's live tokens in it
    out: Scan = []
    for region in regions:
        pieces: list[Piece] = []
        for start, length, used in region.tiling():
            y = owner_at.get(start) if used else None
            if not used or y is r:
                pieces.append(Piece(start, length, None, 0, False))
            elif y is None or y.pinned:
                pieces.append(Piece(start, length, y, 0, True))
            else:
                live = live_at.get(start)
                if live is None:  # the owner's first run met: all its runs at once, O(its runs)
                    live_at.update(book.live_tokens_by_start(y, unit_tokens))
                    live = live_at[start]
                pieces.append(Piece(start, length, y, live, False))
        out.append((region, pieces))
    return out


COMPACTED_MOVE_WEIGHT = 4
"""A window weighs a compacted occupant's live tokens this many times: moved out, into any
holes, it is gathered until it compacts again, which copies it once more. 2 (the two
copies), 4 and 10 were measured on ServeGen seeds 8 and 9, 3,000 requests each: +0.1% /
+0.6%, +0.3% / +0.7%, +0.3% / +0.6% over 1 (docs/odma-sensitivity.md)."""


class Window(NamedTuple):
    region: ExtentAllocator
    start: int
    """First granule."""
    occupants: list[tuple[OdmaRequest, Extent, int]]
    """Other requests' runs in it, each with its live tokens (each moves whole)."""


def find_window(regions: Scan, r: OdmaRequest, units: int, unit_tokens: int, floor_tokens: int,
                free_units: int) -> Window | None:
    """The stretch of ``units`` granules for ``r`` that costs the fewest tokens copied (its
    other requests' runs' live tokens, a shorter compacted request's ``COMPACTED_MOVE_WEIGHT``
    times, and ``r``'s own but for a first run the stretch starts at), among those no run
    in it forbids (module docstring: a pinned run, or one of a compacted request no shorter
    than ``r``) and whose occupants fit the ``free_units`` free now plus what ``r`` and they
    free, less the window; None if no stretch qualifies. One pass over each region's
    extents (``scan``) with two pointers; the first region is searched first and a window
    that copies no more than ``r``'s later runs ends the search."""
    # A window that starts at r's first run leaves that run's live tokens where they are.
    first_region, first = r.runs[0]
    kept = min(first.length * unit_tokens, r.live_tokens)
    least = r.live_tokens - kept
    best: tuple[int, ExtentAllocator, int, list[Piece]] | None = None  # (cost, region, start, its pieces)
    for region, pieces in regions:
        # per extent: (length, cost of moving it, granules its live tokens need); None: forbidden
        info: list[tuple[int, int, int] | None] = []
        for p in pieces:
            y = p.owner
            if y is None:
                info.append((p.length, 0, 0))
                continue
            compacted = len(y.runs) == 1 and y.live_tokens >= floor_tokens
            if p.fixed or (compacted and y.live_tokens >= r.live_tokens):
                info.append(None)
            else:
                weight = COMPACTED_MOVE_WEIGHT if compacted else 1
                info.append((p.length, weight * p.live_tokens, max(1, -(-p.live_tokens // unit_tokens))))
        j = k = span = cost = need = occupied = 0
        while j < len(info):
            while k < len(info) and span < units:
                entry = info[k]
                if entry is None:
                    break
                length, tokens, n = entry
                span, cost, need = span + length, cost + tokens, need + n
                occupied += length if n else 0
                k += 1
            if span < units:
                if k == len(info):
                    break
                j = k = k + 1  # a forbidden extent ends every window through it
                span = cost = need = occupied = 0
                continue
            total = cost + r.live_tokens - (kept if region is first_region and pieces[j].start == first.start else 0)
            if free_units + r.held_units + occupied - units >= need and (best is None or total < best[0]):
                best = (total, region, pieces[j].start, pieces[j:k])
            entry = info[j]
            assert entry is not None
            length, tokens, n = entry
            span, cost, need = span - length, cost - tokens, need - n
            occupied -= length if n else 0
            j += 1
        if best is not None and best[0] <= least:
            break
    if best is None:
        return None
    _, region, start, chosen = best
    return Window(region, start, [(p.owner, Extent(p.start, p.length), p.live_tokens) for p in chosen
                                  if p.owner is not None])


def compact_into(book: RunBook, window: Window, r: OdmaRequest, units: int, regions: tuple[ExtentAllocator, ...],
                 arena: KVArena, unit_tokens: int) -> tuple[list[str], int]:
    """Move ``window``'s occupants into the largest holes of ``regions`` and ``r``'s live KV
    into the window's first ``units`` granules, now its only run; returns (the requests
    moved, the tokens copied)."""
    region = window.region
    moving = window.occupants
    old_runs = book.take_runs(r)
    for old_region, ext in old_runs:
        old_region.free(ext)
    for _, ext, _ in moving:
        region.free(ext)
    new = region.allocate_at(window.start, units)
    assert new is not None, "a compaction window must be free once its runs are"
    # Largest first; a hole partly taken keeps its rest at the front (``h`` walks the list once).
    holes = sorted(([n, s, reg] for reg in regions for n, s in reg.largest_holes(reg.num_free)), key=lambda h: -h[0])
    h = 0
    moves: list[tuple[int, int, int]] = []
    changes = []
    for y, ext, tokens in moving:
        pieces: list[tuple[ExtentAllocator, Extent]] = []
        need = max(1, -(-tokens // unit_tokens))
        while need > 0:
            n, hole_start, reg = holes[h]
            piece = reg.allocate_at(hole_start, min(n, need), hole_start)
            assert piece is not None, "a listed hole must be free"
            pieces.append((reg, piece))
            need -= piece.length
            if piece.length < n:
                holes[h] = [n - piece.length, hole_start + piece.length, reg]
            else:
                h += 1
        changes.append((y, ext, pieces))
        moves += _moves(ext.start * unit_tokens, [p for _, p in pieces], tokens, unit_tokens)
    book.replace_runs(changes)
    return [y.request_id for y, _, _ in changes], _finish(book, r, old_runs, region, new, moves, arena, unit_tokens)


def _moves(src_slot: int, pieces: list[Extent], tokens: int, unit_tokens: int) -> list[tuple[int, int, int]]:
    """(source, target, tokens) copies of ``tokens`` from ``src_slot`` on into ``pieces`` in order."""
    moves = []
    for piece in pieces:
        n = min(piece.length * unit_tokens, tokens)
        if n <= 0:
            break
        moves.append((src_slot, piece.start * unit_tokens, n))
        src_slot += n
        tokens -= n
    return moves


class Slide(NamedTuple):
    region: ExtentAllocator
    start: int
    """First granule of the stretch: a hole or one of ``r``'s runs. Its other runs pack from here."""
    runs: list[tuple[OdmaRequest, Extent, int]]
    """Other requests' runs in the stretch, in address order, each with its live tokens; each
    moves (the stretch starts with room, so every run after it shifts)."""
    cost_tokens: int
    """Their live tokens: what the slide copies besides ``r``."""


def find_slide(regions: Scan, units: int) -> Slide | None:
    """The stretch of extents whose holes and ``r``'s own runs add up to ``units`` granules,
    with the fewest live tokens in other requests' runs, among stretches without a pinned
    run; None if no stretch qualifies. One two-pointer pass over each region's extents
    (``scan``); the first region is searched first, and a stretch that moves nothing ends
    the search. (``r`` goes last, after the packed runs, where the stretch ends: measured
    better than keeping its first run in place and packing the others after it, which
    leaves ``r`` blocked as soon as its room is used.)"""
    best: Slide | None = None
    for region, pieces in regions:
        j = k = space = cost = 0
        while j < len(pieces):
            while k < len(pieces) and space < units:
                p = pieces[k]
                if p.fixed:
                    break
                space += p.length if p.owner is None else 0
                cost += p.live_tokens
                k += 1
            if space < units:
                if k == len(pieces):
                    break
                j = k = k + 1  # a pinned run ends every stretch through it
                space = cost = 0
                continue
            first = pieces[j]
            # A stretch that starts at another's run would only copy it onto itself: skip it.
            if first.owner is None and (best is None or cost < best.cost_tokens):
                runs = [(p.owner, Extent(p.start, p.length), p.live_tokens) for p in pieces[j:k] if p.owner is not None]
                best = Slide(region, first.start, runs, cost)
            space -= first.length if first.owner is None else 0
            cost -= first.live_tokens
            j += 1
        if best is not None and best.cost_tokens == 0:
            break
    return best


def slide_into(book: RunBook, slide: Slide, r: OdmaRequest, units: int, arena: KVArena,
               unit_tokens: int) -> tuple[list[str], int]:
    """Pack ``slide``'s runs towards its start and move ``r``'s live KV into the ``units``
    granules after them, now its only run; returns (the requests moved, the tokens copied)."""
    region = slide.region
    old_runs = book.take_runs(r)
    for old_region, ext in old_runs:
        old_region.free(ext)
    for _, ext, _ in slide.runs:
        region.free(ext)
    # The freed stretch is one hole, which starts at ``slide.start`` unless a hole ran up to it.
    pos = slide.start
    hole: int | None = pos if region.hole_at(pos) else None
    moves: list[tuple[int, int, int]] = []
    changes = []
    for y, ext, tokens in slide.runs:
        new = region.allocate_at(pos, ext.length, hole)
        assert new is not None and new.start < ext.start, "a packed run moves into the freed stretch"
        changes.append((y, ext, [(region, new)]))
        if tokens:
            moves.append((ext.start * unit_tokens, new.start * unit_tokens, tokens))
        pos = hole = new.end
    window = region.allocate_at(pos, units, hole)
    assert window is not None, "a slide's window must be free once its runs are packed"
    book.replace_runs(changes)
    return [y.request_id for y, _, _ in changes], _finish(book, r, old_runs, region, window, moves, arena, unit_tokens)


def _finish(book: RunBook, r: OdmaRequest, old_runs: list[tuple[ExtentAllocator, Extent]], region: ExtentAllocator,
            new: Extent, moves: list[tuple[int, int, int]], arena: KVArena, unit_tokens: int) -> int:
    """Add ``r``'s live tokens, in order from its ``old_runs``, to the others' ``moves`` (a
    piece already where it belongs stays), make ``new`` its only run, and carry out every
    move in one batch (reads before writes); returns the tokens copied."""
    pos, left = new.start * unit_tokens, r.live_tokens
    for _, ext in old_runs:
        n = min(ext.length * unit_tokens, left)
        if n > 0 and ext.start * unit_tokens != pos:
            moves.append((ext.start * unit_tokens, pos, n))
        pos += n
        left -= n
    book.add_run(r, region, new)
    if moves:
        arena.copy_runs_at_once(moves)
    return sum(n for _, _, n in moves)
