"""How much of the card one run per request can use, with exact lengths: two upper bounds on
``kv_utilization`` at saturation when no request ever starts a second run and nothing is copied.

Why: ``runs_per_request`` <= 1.2 and ``kv_utilization`` >= 0.92 are both #10 targets. A run
grows only into memory nobody holds when it gets there, so one run per request needs free
memory kept beside growing requests; these bounds say how much, from a trace's true lengths.

- ``free_growth``: every running request's remaining growth lies free to its right (what
  admission by claims keeps). Over a saturated batch the per-step sums are sums over each
  request's life: a request of prompt P that generates G tokens is live P + j and has G - j
  left at its j-th step, so utilization <= sum(P G + G^2 / 2) / sum(P G + G^2).
- ``nested``: any order in memory, a request may sit in another's path if one of the two
  finishes before the other reaches it. Between adjacent running requests the free gap must
  then be at least the smaller of their remaining lengths at every step; the least total is
  an order that alternates long and short remainders (each short one bounds two gaps). The
  running batch is drawn as saturation holds it (each request weighted by its life, at a
  uniform point in it), ``--draws`` times.

Both ignore prefill, the watermark and page tails, so real one-run placement does worse.

    python tools/one_run_bound.py --trace alpaca-vicuna --max-new-tokens 512
    python tools/one_run_bound.py --trace servegen-r1 --max-requests 3000 --max-new-tokens 32768
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.traces import load_trace  # noqa: E402


def free_growth_bound(lengths: Sequence[tuple[int, int]]) -> float:
    """Utilization when the remaining growth of every running request is kept free."""
    live = sum(p * g + g * g / 2 for p, g in lengths)
    remaining = sum(g * g / 2 for _, g in lengths)
    return live / (live + remaining)


def nested_bound(lengths: Sequence[tuple[int, int]], num_running: int, draws: int, seed: int) -> float:
    """Mean over ``draws`` saturated batches of live / (live + the least free gaps)."""
    rng = random.Random(seed)
    weights = [g for _, g in lengths]
    total = 0.0
    for _ in range(draws):
        live, remaining = 0, []
        for p, g in rng.choices(lengths, weights=weights, k=num_running):
            j = rng.randrange(g)
            live += p + j
            remaining.append(g - j)
        remaining.sort()
        gaps = 2 * sum(remaining[: num_running // 2])
        total += live / (live + gaps)
    return total / draws


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="alpaca-vicuna")
    ap.add_argument("--max-requests", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="ServeGen sampling seed, and the draws'")
    ap.add_argument("--running", type=int, default=870,
                    help="requests running at saturation (870: Alpaca on the derived MLU370-X4)")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args(argv)
    if ns.running < 2 or ns.draws < 1:
        ap.error(f"--running must be >= 2 and --draws >= 1 (got {ns.running}, {ns.draws})")
    trace = load_trace(ns.trace, seed=ns.seed, max_requests=ns.max_requests, max_new_tokens=ns.max_new_tokens)
    lengths = [(r.prompt_tokens, max(1, r.output_tokens)) for r in trace.requests]
    result = {"trace": trace.name, "requests": len(lengths), "free_growth": round(free_growth_bound(lengths), 4),
              "nested": round(nested_bound(lengths, ns.running, ns.draws, ns.seed), 4)}
    print(f"{trace.name} ({len(lengths)} requests): one run each, no copies, exact lengths: "
          f"kv_utilization <= {result['free_growth']:.3f} keeping remaining growth free, "
          f"<= {result['nested']:.3f} with any nesting ({ns.running} running, {ns.draws} draws)")
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
