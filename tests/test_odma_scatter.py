"""ODMA's scatter at admission (``OdmaPolicy._scatter``): a prompt that fits no single hole
takes the largest holes, each at least the economic run length rounded down to whole
granules, or waits; a ring (read per block) takes any hole."""

from __future__ import annotations

from dataclasses import replace

from odma_mlu.config import OdmaConfig
from odma_mlu.kvcache.odma import OdmaPolicy
from policy_helpers import arena, rr

# Strict claims equal to prompt + max_new (no prediction), one region, 4-token granules.
CFG = OdmaConfig(num_buckets=4, safety_fraction=0.0, elastic=False, histogram_bin_tokens=4)


class _Priced(OdmaPolicy):
    """The economic run length fixed (None: no device costs known)."""

    economic: int | None = None

    def _economic_tokens(self, live_tokens: int) -> int | None:
        return self.economic


def _holes(economic: int | None) -> _Priced:
    """40 tokens: holes of 4, 8 and 4 tokens at [4, 8), [12, 20), [28, 32) among held runs."""
    p = _Priced(arena(40), 64, CFG, granule_tokens=4, min_run_tokens=4)
    p.economic = economic
    sizes = [("a", 4), ("h1", 4), ("b", 4), ("h2", 8), ("c", 8), ("h3", 4), ("d", 8)]
    for rid, n in sizes:
        assert p.reserve(rr(rid, n - 1, 1)) is not None, rid
    for rid in ("h1", "h2", "h3"):
        p.release(rid, None)
    assert p.reserved_tokens() == 24
    p.check_integrity()
    return p


def test_without_prices_a_prompt_scatters_over_the_largest_holes() -> None:
    p = _holes(None)
    loc = p.reserve(rr("x", 11, 1))  # 12 tokens: no single hole holds them
    assert loc is not None and loc.runs[0] == (12, 8) and loc.runs[1] in ((4, 4), (28, 4))
    p.check_integrity()


def test_holes_shorter_than_the_economic_run_length_are_not_taken() -> None:
    # Economic length 9 tokens -> 2 granules: only the 8-token hole may be a piece; 12 do not fit.
    p = _holes(9)
    assert p.reserve(rr("x", 11, 1)) is None  # waits: 16 tokens free, but in pieces too short
    assert p.num_live() == 4
    # 8 tokens fit the 8-token hole whole: no scatter, no wait.
    assert p.reserve(rr("y", 7, 1)).runs == ((12, 8),)
    p.check_integrity()


def test_the_length_rounds_down_to_whole_granules() -> None:
    # 7 tokens round down to one granule: every hole may be a piece, as without prices.
    p = _holes(7)
    runs = p.reserve(rr("x", 11, 1)).runs
    assert runs[0] == (12, 8) and runs[1] in ((4, 4), (28, 4))


def test_a_ring_read_per_block_takes_any_hole() -> None:
    p = _holes(9)
    loc = p.reserve(replace(rr("ring", 11, 1), read_per_block=True))
    assert loc is not None and loc.num_runs >= 2
    p.check_integrity()
