"""Compute-side measurements for a device profile: dense matmul peaks per dtype, the
matmul rate against the number of rows (``matmul_rows``), and the launch overhead."""

from __future__ import annotations

import statistics
import sys
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from odma_mlu.backends import Backend

if TYPE_CHECKING:
    from typing import Callable

    from emulator.bandwidth_profiler import ProfilerSettings


def median_time_s(backend: Backend, run: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median of ``repeats`` timings of ``run`` on the backend's own timer, after warm-up."""
    times_s: list[float] = []
    for i in range(warmup + repeats):
        timer = backend.timer()
        timer.start()
        run()
        elapsed_s = timer.stop()
        if i >= warmup:
            times_s.append(elapsed_s)
    return statistics.median(times_s)


def measure_flops(backend: Backend, settings: ProfilerSettings) -> dict[str, float]:
    """Dense square matmul FLOP/s per supported dtype (2 n^3 FLOPs per product)."""
    out: dict[str, float] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        if not backend.supports_dtype(dtype):
            continue
        n = settings.matmul_n if dtype == torch.float32 else settings.half_matmul_n
        try:
            a = torch.randn(n, n, device=backend.device).to(dtype)
            b = torch.randn(n, n, device=backend.device).to(dtype)
            t_s = median_time_s(backend, lambda: torch.mm(a, b), max(3, settings.repeats // 2), 1)
        except RuntimeError as e:  # a dtype the backend lists but whose matmul kernel is missing
            print(f"note: no {name} matmul on {backend.describe()} ({e}); skipped", file=sys.stderr)
            continue
        out[name] = 2.0 * n**3 / t_s
    return out


MATMUL_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def measure_matmul_rows(backend: Backend, settings: ProfilerSettings) -> dict[str, dict[int, float]]:
    """Achieved FLOP/s of ``F.linear([M, n], [n, n])`` against M rows (profile key ``matmul_rows``).

    ``F.linear`` (weight stored ``[out, in]``, multiplied transposed) is how models call
    their matmuls; on this project's CPU host it runs up to 2x slower at few rows than
    ``torch.mm`` with a ``[in, out]`` weight, so measuring ``mm`` overstated the rate.

    ``n`` is the dense-peak size (matmul_n / half_matmul_n), so the largest M approaches the
    dense peak. The same weight is multiplied every time, so it stays cache-resident where
    it fits: this isolates how efficiently the device computes with few rows (decode
    batches, the g query heads of one KV head in attention); the cost model adds weight
    streaming from memory as a separate term. Repeats are round-robin over M (a burst of
    load from another process spreads over all points), median per point; small products
    are timed as a burst of back-to-back calls so the timer's resolution does not matter.
    """
    out: dict[str, dict[int, float]] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        if not backend.supports_dtype(dtype):
            continue
        n = settings.matmul_n if dtype == torch.float32 else settings.half_matmul_n
        rows = [m for m in MATMUL_ROWS if m <= n]
        try:
            w = torch.randn(n, n, device=backend.device).to(dtype)
            xs = {m: torch.randn(m, n, device=backend.device).to(dtype) for m in rows}
            F.linear(xs[rows[0]], w)
        except RuntimeError as e:
            print(f"note: no {name} matmul on {backend.describe()} ({e}); skipped", file=sys.stderr)
            continue
        inner = {m: max(1, min(64, n // m // 4)) for m in rows}
        times: dict[int, list[float]] = {m: [] for m in rows}
        for r in range(1 + max(5, settings.repeats)):
            for m in rows:
                x = xs[m]
                timer = backend.timer()
                timer.start()
                for _ in range(inner[m]):
                    F.linear(x, w)  # as models call it: weight [out, in], x @ w.T
                elapsed = timer.stop()
                if r > 0:
                    times[m].append(elapsed / inner[m])
        out[name] = {m: 2.0 * m * n * n / statistics.median(ts) for m, ts in times.items()}
    return out


def measure_launch_overhead(backend: Backend, settings: ProfilerSettings) -> float:
    """Seconds per tiny op (an in-place add on one element), averaged over a burst."""
    x = torch.zeros(1, device=backend.device)

    def burst() -> None:
        for _ in range(settings.launch_ops):
            x.add_(1.0)

    return median_time_s(backend, burst, 5, 1) / settings.launch_ops


ATTENTION_CALL_HEADS = (28, 4, 128)
"""Query heads, KV heads and head dim of the timed attention call: the 7B target's."""


def measure_attention_call(backend: Backend, settings: ProfilerSettings) -> float:
    """Seconds of one decode attention call as the engine makes it (``models/attention.py``
    ``decode_attention`` over a view of an arena-shaped [slots, kv, D] K and V) over a
    one-token run, so its bytes and FLOPs are negligible: its launch, the kernel's own set-up
    and the view ops around it (profile key ``attention_call_overhead``). Averaged over a
    burst; at least ``launch_overhead`` is for the caller to enforce."""
    from odma_mlu.models.attention import DecodeGroup, decode_attention, read_group_kv

    heads, kv_heads, dim = ATTENTION_CALL_HEADS
    dtype = torch.float32 if backend.device.type == "cpu" else torch.float16
    k = torch.randn(1024, kv_heads, dim, device=backend.device).to(dtype)
    v = torch.randn(1024, kv_heads, dim, device=backend.device).to(dtype)
    q = torch.randn(1, heads, dim, device=backend.device).to(dtype)
    group = DecodeGroup(first_row=0, num_seqs=1, span_tokens=1, length_mask=None, view_start=512, gather_offset=None)
    calls = max(20, settings.launch_ops // 5)

    def burst() -> None:
        for _ in range(calls):
            decode_attention(q, read_group_kv(k, None, group), read_group_kv(v, None, group), group, dim ** -0.5)

    return median_time_s(backend, burst, 5, 1) / calls
