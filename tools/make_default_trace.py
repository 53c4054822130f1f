"""Regenerate the bundled default trace ``odma_mlu/data/default_trace.jsonl``.

Why this sample: ``odma-mlu bench`` with no arguments must show the point of ODMA on a fresh
machine, so it needs real prompts with the true number of tokens a 7B model generated for
them (bounded by max_new_tokens=512, mostly far below it). The Alpaca/Vicuna-7B lengths file
is exactly that, and it keeps the prompt text for a text-based length predictor.

Why only the predictor's held-out records: the default predictor is trained on the same
file; drawing the sample from ``split_of(id) == "test"`` (the hash split the predictor
itself never trains or calibrates on) keeps the bench from scoring a predictor on its own
training data.

Deterministic: a pure function of the source file, ``n_requests`` and ``seed``. Records are
copied verbatim (all fields) in their source order.

    .venv/bin/python tools/make_default_trace.py [--source PATH] [--out PATH] [-n 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from emulator.traces import DEFAULT_TRACE_PATH, NAMED_TRACES, default_shared_dir  # noqa: E402
from odma_mlu.errors import DataFormatError  # noqa: E402
from odma_mlu.predictor.data import split_of  # noqa: E402

DEFAULT_SAMPLE_REQUESTS = 1400
DEFAULT_SAMPLE_SEED = 0


def make_default_sample(source: Path | None = None, out: Path = DEFAULT_TRACE_PATH,
                        n_requests: int = DEFAULT_SAMPLE_REQUESTS, seed: int = DEFAULT_SAMPLE_SEED) -> Path:
    """Write ``n_requests`` held-out lengths records of ``source`` (default: the shared
    alpaca-vicuna file) to ``out`` and return ``out``."""
    source = source or default_shared_dir() / NAMED_TRACES["alpaca-vicuna"]
    if not source.is_file():
        raise DataFormatError(f"source lengths file not found at {source}; set ODMA_SHARED_DATA or pass --source")
    held_out: list[str] = []
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "id" not in record:
                raise DataFormatError(f"{source}:{lineno}: missing field 'id' (needed for the held-out split)")
            if split_of(str(record["id"])) == "test":
                held_out.append(line.rstrip("\n"))
    if len(held_out) < n_requests:
        raise DataFormatError(f"{source}: only {len(held_out)} held-out records, fewer than n_requests={n_requests}")
    keep = sorted(random.Random(seed).sample(range(len(held_out)), n_requests))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(held_out[i] + "\n" for i in keep), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_TRACE_PATH)
    p.add_argument("-n", "--n-requests", type=int, default=DEFAULT_SAMPLE_REQUESTS)
    p.add_argument("--seed", type=int, default=DEFAULT_SAMPLE_SEED)
    ns = p.parse_args(argv)
    path = make_default_sample(ns.source, ns.out, ns.n_requests, ns.seed)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
