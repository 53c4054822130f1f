"""The traces of the hybrid (SSM + attention) benchmark, tools/bench_hybrid.py.

Both come from ShareGPT pairs (tokens = characters / 4, every request at t=0: offline):
``sharegpt`` as recorded, and ``drifting`` (AVMP's drift case): the first half keeps
ShareGPT's short prompts, the second half's prompts carry a conversation history (the
previous ``history_pairs`` prompts and responses), so the mix moves from state-bound (many
short requests) to KV-bound. FCFS order carries the drift.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from emulator.traces import Trace, default_shared_dir, load_trace

SHAREGPT_DEV = default_shared_dir() / "sharegpt" / "sharegpt_pairs_dev.jsonl"


def sharegpt_trace(path: Path = SHAREGPT_DEV, max_requests: int | None = None) -> Trace:
    """The first ``max_requests`` pairs of a ShareGPT pairs JSONL, as recorded."""
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT pairs file {path} not found; pass --data PATH to a *_pairs_*.jsonl")
    return replace(load_trace(path, max_requests=max_requests), name="sharegpt")


def drifting_trace(trace: Trace, history_pairs: int = 8, max_prompt_tokens: int = 8192) -> Trace:
    """Short prompts first, then long ones: each prompt of the second half carries the previous
    ``history_pairs`` pairs (prompt + response tokens) as history, capped at ``max_prompt_tokens``.
    A drifted prompt keeps its own text (the question asked) for the length predictor."""
    reqs = trace.requests
    half = len(reqs) // 2
    out = list(reqs[:half])
    for i in range(half, len(reqs)):
        history = sum(r.prompt_tokens + r.output_tokens for r in reqs[max(0, i - history_pairs):i])
        out.append(replace(reqs[i], prompt_tokens=min(max_prompt_tokens, reqs[i].prompt_tokens + history)))
    return replace(trace, name="drifting", requests=tuple(out))
