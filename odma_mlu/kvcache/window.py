"""The sliding-window KV group: per request, a ring kept *inside the arena* of the
full-attention layers and reserved through the same KV policy, as a second request.

A sliding-window layer attends to the last ``window_tokens`` positions only (transformers:
key ``k`` is visible to query ``q`` when ``q - window < k <= q``), so a request never needs
more than ``window_tokens`` K/V entries per sliding layer. Token ``p`` lives at ring index
``p % window``; the ring holds ``C = min(tokens rounded up to the block, window)`` ring
slots, so that index never moves while the ring grows.

Layout (flat lanes). The arena of a model with sliding layers is *flat*
(``KVArena(flat_groups=1)``): one K and one V tensor of ``F * capacity`` slots, lane-major,
the ``F`` full layers' tensors (the *lanes*) contiguous views of it. A ring is cut into blocks
of ``B = min(16, window)`` ring slots; block ``b`` (ring slots ``[b B, (b + 1) B)``) of
sliding layer ``j`` (0-based among the ``S`` sliding layers) is *cell* ``q = b S + j``,
which lies in lane ``q % F`` at row-block ``q // F``, i.e. rows ``[(q // F) B, (q // F) B +
B)`` of the ring request ``"<id>#ring"`` (whose policy "tokens" are these rows). A ring of
``n`` blocks needs ``rows_for = ceil(n S / F) * B`` rows: the cells are packed row-block by
row-block over all lanes, so there is no per-layer-group padding (at most the last
row-block is partly used, until the ring's next block fills it)::

    window 8, B 2, F 2 lanes (full layers), S 3 sliding layers; Lj.b = block b of layer j
      row-block:         0      1      2      3      4      5        (rows 2 rb, 2 rb + 1)
      lane 0 (full 0):   L0.b0  L2.b0  L1.b1  L0.b2  L2.b2  L1.b3
      lane 1 (full 1):   L1.b0  L0.b1  L2.b1  L1.b2  L0.b3  L2.b3
      cell q = 3 b + j -> lane q % 2, row-block q // 2
      4 blocks: 12 cells in 6 row-blocks = 12 rows; 3 blocks: 9 cells, 5 row-blocks (10 rows)
    ring index i of sliding layer j: q = (i // B) S + j, row r = (q // F) B + i % B
    row r = the r-th slot of the ring request's KVLocation (its runs, read in order)
    flat slot = (q % F) * capacity + location.slot_of(r)        (what a layer gathers)

Lane groups. One flat tensor of ``F * capacity`` slots can pass torch_mlu's 2^31-byte cap on
one K or V tensor (FACTS.md; a 7B-shaped model with 8 full layers and 6 GiB of KV needs 3
GiB). Then the layers are dealt into ``g`` groups (``flat_groups_for``: the fewest that keep
each tensor under the cap, ``g`` dividing both F and S): group ``c`` holds lanes
``[c F/g, (c + 1) F/g)`` in its own flat tensor and sliding layers ``[c S/g, (c + 1) S/g)``,
laid out as above with ``S/g`` and ``F/g`` in place of S and F. Cells per row-block and rows
per ring stay the same (``S/g`` over ``F/g`` is S over F), so groups cost no padding; a
layer's flat slots index its group's tensor.

    the same ring under paged, pages of 4 slots, location runs ((96, 4), (24, 8)):
      rows 0..3 -> arena slots 96..99, rows 4..11 -> 24..31
      layer 0's blocks: rows 0-1 lane 0, rows 2-3 lane 1, rows 6-7 lane 0, rows 8-9 lane 1
      layer 0's runs (flat slots): (96, 2), (C + 98, 2), (26, 2), (C + 28, 2)   C = capacity

A ring grows with its request (``ensure_capacity`` of the ring request to ``rows_for``), in
whole blocks (``S * B / F`` rows a block, rounded up to row-blocks) until the window, then
stays and wraps; a grown ring's cells keep their rows. Where no single hole takes the next
block (a fragmented ODMA arena), it grows one policy granule at a time, each piece
wherever a hole is: a block's rows need not be adjacent. Whatever runs the policy gives
(pages, ODMA runs; a policy's move into one run copies every lane) the mapping goes through
the location, so ring data stays where the attention reads it. A ring is reserved with
``ReserveRequest.read_per_block``: its blocks are read apart whatever its runs are, so ODMA
never copies it into one run.

``RingPool`` is that mapping, not an allocator: it reads the ring request's location from
the policy, turns ring indices into flat slots of each sliding layer (what ``RingBatch``
gathers and scatters) and runs (what the step description prices), and keeps per-ring token
counts. ``WindowedPolicy`` (odma_mlu/kvcache/windowed.py) reserves, grows and releases the ring with the request through
the inner (full-attention) policy; memory accounting is the inner policy's: ring rows are
arena slots held like any other.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from odma_mlu.errors import ConfigError
from odma_mlu.kvcache.arena import KVArena, KVLocation, covering_runs

if TYPE_CHECKING:  # models import kvcache at run time, not the reverse
    from odma_mlu.models.attention import ForwardBatch
    from odma_mlu.models.window_attention import RingPlan

RING_BLOCK_TOKENS = 16
MAX_TENSOR_BYTES = 2**31
"""The most bytes one K or V tensor may have (torch_mlu's cap, FACTS.md), on every backend
alike so the layout does not depend on where it runs."""
RING_SUFFIX = "#ring"
Run = tuple[int, int]  # (first slot, length in slots)


def ring_id(request_id: str) -> str:
    """The inner policy's id of ``request_id``'s ring."""
    return request_id + RING_SUFFIX


@dataclass(frozen=True)
class WindowStats:
    """Accounting of the ring group at one moment."""

    window_tokens: int
    num_rings: int
    held_slots: int
    """Arena slots (rows of F lanes) the rings' reservations hold."""
    bytes_per_slot: int
    """K and V of one arena slot over every lane (full layer)."""
    held_bytes: int
    """Ring memory of the admitted requests: held_slots x bytes_per_slot."""
    live_tokens: int
    """K/V entries that attention can still read: sum of min(tokens, window) per request."""
    evicted_tokens: int
    """Tokens that left their request's window: overwritten in place, never read again."""


def flat_groups_for(num_lanes: int, num_sliding: int, capacity_tokens: int, lane_slot_bytes: int,
                    max_tensor_bytes: int = MAX_TENSOR_BYTES) -> int:
    """Lane groups of a flat arena: the fewest ``g`` dividing both ``num_lanes`` (F) and
    ``num_sliding`` (S) whose tensors of ``F/g * capacity_tokens`` slots of
    ``lane_slot_bytes`` (K or V of one slot in one layer) stay within ``max_tensor_bytes``."""
    common = math.gcd(num_lanes, num_sliding)
    for g in range(1, common + 1):
        if common % g == 0 and num_lanes // g * capacity_tokens * lane_slot_bytes <= max_tensor_bytes:
            return g
    most = max_tensor_bytes // (num_lanes // common * lane_slot_bytes)
    raise ConfigError(f"kv_capacity_tokens: an arena of {capacity_tokens} slots over {num_lanes} full layers needs K/V "
                      f"tensors past the {max_tensor_bytes / 2**30:g} GiB cap even in {common} lane groups (the most "
                      f"that divide {num_lanes} full and {num_sliding} sliding layers); at most {most} slots fit")


def arena_flat_groups(model: Any, capacity_tokens: int) -> int:
    """``KVArena(flat_groups=)`` for a forward model's arena of ``capacity_tokens`` slots: 0
    (one tensor per layer) without sliding layers, else ``flat_groups_for`` its shapes."""
    if not getattr(model, "num_sliding_layers", 0):
        return 0
    spec = model.spec
    lane_slot_bytes = spec.num_kv_heads * spec.head_dim * torch.tensor([], dtype=model.dtype).element_size()
    return flat_groups_for(model.num_full_layers, model.num_sliding_layers, capacity_tokens, lane_slot_bytes,
                           MAX_TENSOR_BYTES)


class RingPool:
    """The rings of ``num_layers`` sliding layers, laid into the flat lanes of ``arena``."""

    def __init__(self, arena: KVArena, num_layers: int, window_tokens: int,
                 block_tokens: int = RING_BLOCK_TOKENS, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None) -> None:
        """``num_kv_heads`` / ``head_dim``: the sliding layers' K/V shape, when known; it must
        be the full layers' (a ring entry is one arena row)."""
        if window_tokens <= 0:
            raise ConfigError(f"sliding window of {window_tokens} tokens: it must be >= 1 (config.json sliding_window)")
        if block_tokens <= 0:
            raise ConfigError(f"ring block of {block_tokens} tokens: it must be >= 1 (RING_BLOCK_TOKENS)")
        lanes = arena.model.num_layers
        if lanes <= 0:
            raise ConfigError("a model whose every attention layer slides is not supported for now: rings live in "
                              "the full-attention layers' arena")
        assert num_layers > 0, "a ring pool without sliding layers"
        assert arena.shape_only or arena.flat, "rings need a flat arena (KVArena(flat_groups=g)): a layer's blocks lie in every lane"
        groups = max(1, arena.flat_groups)
        if lanes % groups or num_layers % groups:
            raise ConfigError(f"{lanes} full and {num_layers} sliding layers do not split into {groups} equal lane groups")
        full = (arena.model.num_kv_heads, arena.model.head_dim)
        sliding = (num_kv_heads if num_kv_heads is not None else full[0], head_dim if head_dim is not None else full[1])
        if sliding != full:
            raise ConfigError(f"sliding layers with {sliding[0]} KV heads of {sliding[1]} dims cannot share the arena "
                              f"of full layers with {full[0]} KV heads of {full[1]}: not supported")
        self.arena = arena
        self.num_layers = num_layers
        self.num_lanes = lanes
        self.num_groups = groups
        self._group_layers, self._group_lanes = num_layers // groups, lanes // groups
        self.window_tokens = int(window_tokens)
        self._block = max(1, min(block_tokens, self.window_tokens))
        self._layer_in_group = torch.arange(num_layers, dtype=torch.int64) % self._group_layers
        self.policy: Any = None
        """The inner policy that holds the ring requests (``WindowedPolicy`` attaches it)."""
        self._tokens: dict[str, int] = {}
        self._locations: dict[str, KVLocation] = {}
        self._runs: dict[str, tuple[int, KVLocation, tuple[Run, ...]]] = {}
        """Layer 0's runs of each ring, for (ring slots, location): what the step description reads."""
        self.in_place_grows = 0
        self.new_runs = 0
        self.copies = 0
        self.blocked_grows = 0
        self.stepped_grows = 0
        """Ring growths that took one granule at a time (no single hole held the next block)."""

    # -- sizes ----------------------------------------------------------------------------
    @property
    def block_tokens(self) -> int:
        return self._block

    @block_tokens.setter
    def block_tokens(self, tokens: int) -> None:
        assert not self._tokens, "change the ring block only while no ring is held"
        if tokens <= 0:
            raise ConfigError(f"ring block of {tokens} tokens: it must be >= 1 (RING_BLOCK_TOKENS)")
        self._block = max(1, min(tokens, self.window_tokens))

    @property
    def k(self) -> tuple[torch.Tensor, ...]:
        """The arena's flat K tensors, one per lane group (lane-major)."""
        assert self.arena.k_groups, "a shape-only arena has no tensors"
        return self.arena.k_groups

    @property
    def v(self) -> tuple[torch.Tensor, ...]:
        assert self.arena.v_groups, "a shape-only arena has no tensors"
        return self.arena.v_groups

    def group_of(self, layer: int) -> int:
        """The lane group (flat tensor) sliding layer ``layer``'s blocks lie in."""
        return layer // self._group_layers

    @property
    def capacity_slots(self) -> int:
        """Slots of one lane (the arena's capacity)."""
        return self.arena.capacity_tokens

    @property
    def bytes_per_slot(self) -> int:
        return self.arena.bytes_per_token

    def ring_slots_for(self, tokens: int) -> int:
        """Ring slots (per sliding layer) a ring needs to hold ``tokens``: min(tokens rounded
        up to the block, window)."""
        b = self._block
        return min(-(-max(1, tokens) // b) * b, self.window_tokens)

    def rows_for(self, tokens: float) -> int:
        """Rows (arena slots) of a ring holding ``tokens``: its n = ceil(C / B) blocks of S
        layers are n S cells, F to a row-block of B rows: ceil(n S / F) * B."""
        b = self._block
        blocks = -(-self.ring_slots_for(int(math.ceil(tokens))) // b)
        return -(-blocks * self.num_layers // self.num_lanes) * b

    def cell(self, layer: int, block: int) -> tuple[int, int]:
        """(lane, row-block) of block ``block`` of sliding layer ``layer``: the cell
        ``q = block * S_g + layer % S_g`` of its group's S_g layers over the group's F_g lanes
        (one group: S and F)."""
        sg, fg = self._group_layers, self._group_lanes
        q = block * sg + layer % sg
        return self.group_of(layer) * fg + q % fg, q // fg

    def ring_row(self, layer: int, ring_index: int) -> int:
        """The row (of the ring request's location) of ``ring_index`` of sliding layer ``layer``."""
        b = self._block
        return self.cell(layer, ring_index // b)[1] * b + ring_index % b

    def flat_slots(self, location: KVLocation, ring_index: torch.Tensor) -> torch.Tensor:
        """int64 [S, n] (CPU): flat slots of ring indices ``ring_index`` (int64 [n]) in every
        sliding layer, for a ring at ``location``: lane (within the layer's group) * capacity
        + arena slot, an index into the group's flat tensor (``k[group_of(layer)]``)."""
        b, s, f = self._block, self._group_layers, self._group_lanes
        q = (ring_index // b)[None, :] * s + self._layer_in_group[:, None]
        rows = (q // f) * b + (ring_index % b)[None, :]
        return (q % f) * self.capacity_slots + location.slot_table()[rows]

    # -- the rings ------------------------------------------------------------------------
    def holds(self, request_id: str) -> bool:
        return request_id in self._tokens

    def ring_ids(self) -> list[str]:
        return list(self._tokens)

    def admit(self, request_id: str, tokens: int) -> None:
        assert request_id not in self._tokens, f"request {request_id} already holds a ring"
        self._tokens[request_id] = tokens

    def note_tokens(self, request_id: str, total_tokens: int) -> None:
        """Record that ``request_id``'s ring is reserved (or written) up to ``total_tokens``."""
        self._tokens[request_id] = max(self._tokens[request_id], total_tokens)

    def moved(self, request_id: str) -> None:
        """The ring's location changed: read it again from the policy."""
        self._locations.pop(request_id, None)
        self._runs.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        self._tokens.pop(request_id)
        self.moved(request_id)

    def location(self, request_id: str) -> KVLocation:
        loc = self._locations.get(request_id)
        if loc is None:
            loc = self._locations[request_id] = self.policy.location(ring_id(request_id))
        return loc

    def ring_slots(self, request_id: str) -> int:
        """Ring slots (per sliding layer) ``request_id``'s ring holds now."""
        return self.ring_slots_for(self._tokens[request_id])

    def _checked_location(self, request_id: str) -> tuple[int, KVLocation]:
        c = self.ring_slots(request_id)
        loc = self.location(request_id)
        assert loc.capacity_tokens >= self.rows_for(c), (
            f"{request_id}: a ring of {c} slots needs {self.rows_for(c)} rows, its reservation holds "
            f"{loc.capacity_tokens}")
        return c, loc

    def runs_of(self, request_id: str, layer: int = 0) -> tuple[Run, ...]:
        """Sliding layer ``layer``'s runs of the ring in ring order (ring index i = the i-th
        slot), in flat slots (lane * capacity + arena slot), adjacent ones merged."""
        c, loc = self._checked_location(request_id)
        if layer == 0:
            cached = self._runs.get(request_id)
            if cached is not None and cached[0] == c and cached[1] is loc:
                return cached[2]
        offsets = [0]
        for _, n in loc.runs:
            offsets.append(offsets[-1] + n)
        b, cap = self._block, self.capacity_slots
        out: list[list[int]] = []
        for block in range(-(-c // b)):
            lane, row_block = self.cell(layer, block)
            row, left = row_block * b, min(b, c - block * b)
            k = bisect.bisect_right(offsets, row) - 1
            while left > 0:
                start, n = loc.runs[k]
                at = row - offsets[k]
                take = min(left, n - at)
                slot = lane * cap + start + at
                if out and out[-1][0] + out[-1][1] == slot:
                    out[-1][1] += take
                else:
                    out.append([slot, take])
                row, left, k = row + take, left - take, k + 1
        result = tuple((s, n) for s, n in out)
        if layer == 0:
            self._runs[request_id] = (c, loc, result)
        return result

    def read_runs(self, request_id: str, tokens: int) -> tuple[int, ...]:
        """Lengths of the runs a decode over ``tokens`` reads in one sliding layer: ring
        indices [0, min(tokens, window)) of sliding layer 0. Every layer reads one run per
        block (blocks of a layer are S cells apart) where the policy's granule is a multiple
        of B (then no block straddles two location runs); only where S = F do a layer's
        blocks touch, and then alike in every layer."""
        return covering_runs([n for _, n in self.runs_of(request_id, 0)], min(tokens, self.window_tokens))

    def plan(self, batch: "ForwardBatch", request_ids: list[str], device: torch.device | str = "cpu"
             ) -> "RingPlan":
        """The ``RingPlan`` of one forward step (``batch``: its ``ForwardBatch``; ``request_ids``
        in ``batch.seqs`` order)."""
        from odma_mlu.models.window_attention import RingBatch, RingPlan  # models import kvcache, not the reverse

        for seq, rid in zip(batch.seqs, request_ids):
            self.note_tokens(rid, seq.num_total_tokens)
        rings = [self._checked_location(rid) for rid in request_ids]
        return RingPlan(RingBatch.build(self, batch, [(loc, c) for c, loc in rings], device), self.k, self.v)

    # -- accounting -----------------------------------------------------------------------
    def held_slots(self) -> int:
        return sum(self.location(rid).capacity_tokens for rid in self._tokens)

    def live_rows(self) -> int:
        """Rows of the rings' written entries: rows_for(min(tokens, window)) per ring."""
        return sum(self.rows_for(t) for t in self._tokens.values())

    def stats(self) -> WindowStats:
        w = self.window_tokens
        tokens = list(self._tokens.values())
        held = self.held_slots()
        return WindowStats(w, len(tokens), held, self.bytes_per_slot, held * self.bytes_per_slot,
                           sum(min(t, w) for t in tokens), sum(max(0, t - w) for t in tokens))

    def check_integrity(self) -> None:
        for rid, t in self._tokens.items():
            fresh = self.policy.location(ring_id(rid))
            cached = self._locations.get(rid)
            assert cached is None or cached == fresh, f"{rid}: cached ring location {cached} is stale ({fresh})"
            assert fresh.capacity_tokens >= self.rows_for(t), (
                f"{rid}: {fresh.capacity_tokens} ring rows hold fewer than the {self.rows_for(t)} of {t} tokens")
            runs = self._runs.get(rid)
            assert runs is None or runs[1] is not cached or sum(n for _, n in runs[2]) == runs[0], (
                f"{rid}: cached runs {runs[2] if runs else None} do not hold its {runs[0] if runs else 0} ring slots")
