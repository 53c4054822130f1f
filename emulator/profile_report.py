"""The output side of the bandwidth profiler: the profile mapping, the table and the plot."""

from __future__ import annotations

import platform
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emulator.bandwidth_profiler import HostLink, ProfileResult, ProfilerSettings

from odma_mlu.backends import Backend

KiB, MiB = 1024, 1024**2
TOOL = "odma-mlu profile-bandwidth (emulator/bandwidth_profiler.py)"

def describe_host(backend: Backend) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{socket.gethostname()}: {backend.describe()}; host CPU {cpu}"


def _gbps(x: float) -> str:
    return f"{x / 1e9:.3f} GB/s"


def to_profile_dict(r: ProfileResult, name: str) -> dict:
    """The measured profile as a mapping that emulator.profile.parse_profile accepts."""
    s = r.settings
    peak = max([r.stream_bytes_per_s, *r.sequential_bytes_per_s.values(), *r.gather_bytes_per_s.values()])
    memory_type = {"cpu": "host DRAM", "cuda": "GPU memory (HBM/GDDR)", "mlu": "MLU memory (LPDDR5/HBM)"}
    note = (f"median of {s.repeats} reads of {s.read_bytes // MiB} MiB from a {s.buffer_bytes // MiB} MiB buffer")
    return {
        "name": name,
        "description": f"measured on {r.description}",
        "memory_type": memory_type.get(r.backend, r.backend),
        "capacity_bytes": f"{r.capacity_bytes // MiB} MiB",
        "peak_bandwidth": _gbps(peak),
        "sequential": [{"chunk_bytes": n, "bandwidth": _gbps(bw), "source": "measured"}
                       for n, bw in sorted(r.sequential_bytes_per_s.items())],
        "gather": [{"chunk_bytes": n, "bandwidth": _gbps(bw), "source": "measured"}
                   for n, bw in sorted(r.gather_bytes_per_s.items())],
        "compute_flops_per_s": {k: f"{v / 1e9:.2f} GFLOPS" for k, v in r.flops_per_s.items()},
        "launch_overhead": f"{r.launch_overhead_s * 1e6:.3f} us",
        **({"attention_call_overhead": attention_call_text(r.attention_call_s, r.launch_overhead_s)}
           if r.attention_call_s is not None else {}),
        **({"matmul_rows": matmul_rows_dict(r.matmul_rows_flops, r.settings)} if r.matmul_rows_flops else {}),
        **({"host_link": host_link_dict(r.host_link)} if r.host_link is not None else {}),
        "provenance": {
            "kind": "measured", "tool": TOOL, "host": r.description, "date": r.date,
            "backend": r.backend, "quick": s.quick,
            "kernel": "embedding_bag(mode=sum) over the buffer viewed as rows; sequential = consecutive chunk "
                      "ids, each read starting where the last ended (cycling through the buffer), gather = one random chunk per equal stratum, shuffled",
            "byte_counting": "bytes READ only; the kernel's bag sums (<= 1/64 of the bytes read) are not counted",
            "buffer_bytes": s.buffer_bytes, "read_bytes_per_measurement": s.read_bytes,
            "llc_bytes": r.llc_bytes, "torch_threads": r.threads, "repeats": s.repeats, "warmup": s.warmup,
            "stream_bandwidth": _gbps(r.stream_bytes_per_s) + " (buffer.sum() over the whole buffer)",
            "peak_bandwidth_rule": "max of the stream figure and every curve point",
            "points": note,
        },
    }


def attention_call_text(call_s: float, launch_s: float) -> str:
    """The ``attention_call_overhead`` entry: the measured call, never under one launch."""
    return f"{max(call_s, launch_s) * 1e6:.3f} us"


def host_link_dict(link: HostLink) -> dict:
    """The ``host_link`` entry: the swap-pair bandwidth, both directions in the note."""
    return {"bandwidth": _gbps(link.swap_bytes_per_s), "source": "measured",
            "note": f"harmonic mean of device->host {_gbps(link.to_host_bytes_per_s)} and host->device "
                    f"{_gbps(link.to_device_bytes_per_s)}: median copies of {link.copy_bytes // MiB} MiB "
                    + ("(page-locked host memory, as the engine swaps)" if link.page_locked
                       else "(plain host memory: the device offered no page-locked allocator)")}


def matmul_rows_dict(curves: dict[str, dict[int, float]], s: ProfilerSettings) -> dict[str, list[dict]]:
    """``matmul_rows`` profile entries from measured FLOP/s per dtype and row count."""
    out: dict[str, list[dict]] = {}
    for dt, pts in curves.items():
        n = s.matmul_n if dt == "float32" else s.half_matmul_n
        out[dt] = [{"rows": m, "flops": f"{f / 1e9:.2f} GFLOPS", "source": "measured",
                    "note": f"F.linear([{m}, {n}], [{n}, {n}]), cache-resident weight, median"} for m, f in sorted(pts.items())]
    return out


def format_table(r: ProfileResult) -> str:
    lines = [f"{'chunk':>10} {'sequential':>12} {'gather':>12} {'gather/seq':>10}"]
    for n in sorted(r.sequential_bytes_per_s):
        sq, ga = r.sequential_bytes_per_s[n], r.gather_bytes_per_s[n]
        size = f"{n // MiB} MiB" if n >= MiB else (f"{n // KiB} KiB" if n >= KiB else f"{n} B")
        lines.append(f"{size:>10} {sq / 1e9:>8.2f} GB/s {ga / 1e9:>8.2f} GB/s {ga / sq:>10.2f}")
    lines.append(f"stream (buffer.sum, {r.settings.buffer_bytes // MiB} MiB): {r.stream_bytes_per_s / 1e9:.2f} GB/s read")
    lines.append("matmul: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in r.flops_per_s.items()))
    lines.append(f"launch overhead: {r.launch_overhead_s * 1e6:.2f} us per tiny op; torch threads: {r.threads}")
    if r.attention_call_s is not None:
        lines.append(f"attention call: {r.attention_call_s * 1e6:.2f} us (decode attention over a one-token view)")
    if r.host_link is not None:
        lines.append(f"host link: {r.host_link.to_host_bytes_per_s / 1e9:.2f} GB/s to host, "
                     f"{r.host_link.to_device_bytes_per_s / 1e9:.2f} GB/s to device")
    for dt, pts in r.matmul_rows_flops.items():
        lines.append(f"matmul by rows ({dt}): " + ", ".join(f"M={m} {f / 1e9:.1f}" for m, f in sorted(pts.items()))
                     + " GFLOP/s")
    return "\n".join(lines)


def write_plot(r: ProfileResult, name: str, path: str | Path) -> None:
    """Bandwidth against chunk size (log x), both curves, the stream figure as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(r.sequential_bytes_per_s)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [r.sequential_bytes_per_s[n] / 1e9 for n in xs], "o-", label="sequential (adjacent chunks)")
    ax.plot(xs, [r.gather_bytes_per_s[n] / 1e9 for n in xs], "s-", label="gather (random offsets)")
    ax.axhline(r.stream_bytes_per_s / 1e9, color="gray", ls="--", label="stream: buffer.sum()")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (bytes)")
    ax.set_ylabel("read bandwidth (GB/s, bytes read only)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{name}: read bandwidth vs access granularity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
