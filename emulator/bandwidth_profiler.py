"""Measure a device's read bandwidth against access granularity and write a device profile.

Two curves, one kernel. The buffer is viewed as ``[rows, row_elems]`` and read with
``embedding_bag(mode="sum")``: it gathers the rows named by an index tensor and sums them
into a few bags, so it READS the selected bytes and writes almost nothing (the bag sums are
<= 1/64 of the bytes read). An N-byte chunk is ``N / row_bytes`` consecutive rows, so:

* ``sequential``: chunks with consecutive ids (back to back), each measurement starting
  where the previous one ended, cycling through the buffer;
* ``gather``: the same number of chunks, one at a random offset in each of ``k`` equal
  strata of the buffer (distinct, spread over all of it), visited in random order.

Because the kernel, the byte count and the output size are identical, gather/sequential
isolates the cost of random placement. A plain ``buffer.sum()`` over the whole buffer gives
the long-stream figure. Bandwidths count bytes READ only (never the small writes).

Why embedding_bag and not ``index_select``: index_select materialises its output, so every
byte read is also written, and on a CPU the fresh output pages cost more than the reads.

On an accelerator the run also times the host link (``host_link`` in the profile): a
contiguous copy of ``read_bytes`` device -> host and host -> device with ``.to()``, as the
engine swaps a preempted request's KV (kvcache/arena.py). On a CPU there is no link (a swap
is a copy within host memory) and the profile gets none.

The buffer is several times the last-level cache (>= 4x LLC, >= 256 MiB on CPU; >= 1 GiB on
accelerators) so reads come from memory. Only ``odma_mlu.backends`` touches device APIs:
this module uses the Backend interface (device, timer, synchronize, mem_get_info).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import socket
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from odma_mlu.backends import Backend, get_backend
from odma_mlu.errors import ConfigError

KiB, MiB, GiB = 1024, 1024**2, 1024**3
ELEM_BYTES = 4  # the buffer is float32: embedding_bag(sum) supports it on every backend
ROW_CAP_BYTES = 4 * KiB  # longer chunks are several consecutive rows (very wide rows run slower on CPU)
OUTPUT_FRACTION = 64  # bag sums are at most 1/64 of the bytes read
from emulator.compute_profiler import (measure_attention_call, measure_flops, measure_launch_overhead,  # noqa: E402
                                       measure_matmul_rows, median_time_s)
from emulator.profile_report import (TOOL, attention_call_text, describe_host, format_table,  # noqa: E402
                                     matmul_rows_dict, to_profile_dict, write_plot)


@dataclass(frozen=True)
class ProfilerSettings:
    """How much to measure. ``quick`` trades accuracy for a run under 30 s on 2 cores."""

    buffer_bytes: int
    read_bytes: int  # bytes read per timed measurement
    chunk_sizes_bytes: tuple[int, ...]
    repeats: int
    warmup: int
    matmul_n: int
    half_matmul_n: int
    launch_ops: int
    quick: bool


@dataclass(frozen=True)
class ProfileResult:
    """What one run measured; ``to_profile_dict`` turns it into profile YAML."""

    backend: str
    description: str
    settings: ProfilerSettings
    llc_bytes: int
    capacity_bytes: int
    stream_bytes_per_s: float
    sequential_bytes_per_s: dict[int, float]
    gather_bytes_per_s: dict[int, float]
    flops_per_s: dict[str, float]
    launch_overhead_s: float
    threads: int = 1
    matmul_rows_flops: dict[str, dict[int, float]] = field(default_factory=dict)
    host_link: "HostLink | None" = None
    attention_call_s: float | None = None
    """One decode attention call's fixed seconds (``measure_attention_call``); None: not measured."""
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


@dataclass(frozen=True)
class HostLink:
    """Measured device <-> host copy bandwidth (bytes copied / s), each direction."""

    to_host_bytes_per_s: float
    to_device_bytes_per_s: float
    copy_bytes: int
    page_locked: bool = True
    """Timed against page-locked host memory, as the engine swaps (False: plain memory)."""

    @property
    def swap_bytes_per_s(self) -> float:
        """The one figure a profile keeps: a swap copies out once and back once, so the
        harmonic mean of the two directions prices the pair exactly."""
        return 2.0 / (1.0 / self.to_host_bytes_per_s + 1.0 / self.to_device_bytes_per_s)


def measure_host_link(backend: Backend, settings: ProfilerSettings) -> HostLink | None:
    """Time copies of ``read_bytes`` each way between the device and a host buffer; None on a
    CPU (no link). The host buffer is page-locked where the device allows it, as the
    engine's swap buffers are (``KVArena.swap_out``), else plain memory."""
    if backend.device.type == "cpu":
        return None
    n = settings.read_bytes
    on_device = torch.ones(n // ELEM_BYTES, dtype=torch.float32, device=backend.device)
    try:
        on_host, page_locked = torch.ones(n // ELEM_BYTES, dtype=torch.float32, pin_memory=True), True
    except RuntimeError:  # no page-locked allocator for this device
        on_host, page_locked = torch.ones(n // ELEM_BYTES, dtype=torch.float32), False
    out_s = median_time_s(backend, lambda: on_host.copy_(on_device), settings.repeats, settings.warmup)
    in_s = median_time_s(backend, lambda: on_device.copy_(on_host), settings.repeats, settings.warmup)
    return HostLink(n / out_s, n / in_s, n, page_locked)


def llc_bytes() -> int:
    """Size of the host's largest (last-level) cache, from sysfs; 32 MiB if unreadable."""
    best = 0
    for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            text = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": KiB, "M": MiB, "G": GiB}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 * MiB


def _pow2_range(lo: int, hi: int, step: int) -> tuple[int, ...]:
    sizes, n = [], lo
    while n <= hi:
        sizes.append(n)
        n *= step
    return tuple(sizes)


def choose_settings(backend: Backend, quick: bool) -> ProfilerSettings:
    """Buffer and sizes for ``backend``: >= 4x LLC on CPU, >= 1 GiB on an accelerator."""
    free_bytes = backend.mem_get_info().free_bytes
    on_cpu = backend.device.type == "cpu"
    if quick:
        # Still past the LLC where affordable (2x LLC, 256 MiB..1 GiB): a buffer that fits in
        # cache would report cache bandwidth, not memory bandwidth.
        buffer_bytes = 256 * MiB
        if on_cpu:
            want = 1 << (2 * llc_bytes() - 1).bit_length()
            buffer_bytes = max(256 * MiB, min(want, 1 * GiB, 1 << ((free_bytes // 4).bit_length() - 1)))
        read_bytes = 32 * MiB if on_cpu else 256 * MiB
        sizes = _pow2_range(64, 4 * MiB, 4)
        return ProfilerSettings(buffer_bytes, read_bytes, sizes, repeats=5, warmup=1, matmul_n=512,
                                half_matmul_n=256, launch_ops=200, quick=True)
    if on_cpu:
        want = max(4 * llc_bytes(), 256 * MiB)
        buffer_bytes = 1 << (want - 1).bit_length()  # round up to a power of two
        read_bytes = 256 * MiB
        matmul_n, half_n = 1024, 512
    else:
        buffer_bytes, read_bytes = 2 * GiB, 512 * MiB
        matmul_n, half_n = 8192, 8192
    if buffer_bytes > free_bytes // 3:
        floor = 256 * MiB if on_cpu else 1 * GiB
        if free_bytes // 3 < floor:
            raise ConfigError(f"profile-bandwidth needs a buffer of at least {floor // MiB} MiB but only "
                              f"{free_bytes // MiB} MiB are free on {backend.describe()}; free memory or use --quick")
        buffer_bytes = 1 << ((free_bytes // 3).bit_length() - 1)
        print(f"note: buffer reduced to {buffer_bytes // MiB} MiB (free memory {free_bytes // MiB} MiB)",
              file=sys.stderr)
    return ProfilerSettings(buffer_bytes, min(read_bytes, buffer_bytes // 4), _pow2_range(64, 4 * MiB, 2),
                            repeats=9, warmup=1, matmul_n=matmul_n, half_matmul_n=half_n, launch_ops=1000,
                            quick=False)


class ChunkReader:
    """Reads ``read_bytes`` as N-byte chunks of a big buffer, sequentially or scattered."""

    def __init__(self, backend: Backend, buffer: torch.Tensor, read_bytes: int) -> None:
        self.backend = backend
        self.buffer = buffer
        self.buffer_bytes = buffer.numel() * ELEM_BYTES
        self.read_bytes = read_bytes
        self._idx: torch.Tensor | None = None
        self._cursor_bytes = 0
        self._table = buffer.view(1, -1)
        self._offsets: torch.Tensor | None = None

    def _layout(self, chunk_bytes: int) -> tuple[torch.Tensor, int, int, int]:
        row_bytes = min(chunk_bytes, ROW_CAP_BYTES)
        rows_per_chunk = chunk_bytes // row_bytes
        table = self.buffer.view(-1, row_bytes // ELEM_BYTES)
        num_chunks_total = table.shape[0] // rows_per_chunk
        num_chunks = max(1, min(self.read_bytes // chunk_bytes, num_chunks_total))
        return table, rows_per_chunk, num_chunks_total, num_chunks

    def prepare(self, chunk_bytes: int, pattern: str) -> None:
        """Build the index tensor for one timed read (outside the timed region)."""
        dev = self.backend.device
        table, rows_per_chunk, total, k = self._layout(chunk_bytes)
        if pattern == "sequential":
            # Walk the buffer cyclically rather than from a random base: a region comes back
            # only after the whole buffer (> LLC) was read, so it is no longer cached.
            base = (self._cursor_bytes // chunk_bytes) % total
            if base + k > total:
                base = 0
            chunk_ids = torch.arange(base, base + k, device=dev)
            self._cursor_bytes = (base + k) * chunk_bytes
        elif pattern == "gather":
            stride = total // k
            chunk_ids = torch.arange(k, device=dev) * stride + torch.randint(0, stride, (k,), device=dev)
            chunk_ids = chunk_ids[torch.randperm(k, device=dev)]
        else:
            raise ValueError(f"unknown access pattern {pattern!r}; expected 'sequential' or 'gather'")
        rows = chunk_ids[:, None] * rows_per_chunk + torch.arange(rows_per_chunk, device=dev)
        self._idx = rows.reshape(-1)
        n_rows = self._idx.numel()
        row_bytes = table.shape[1] * ELEM_BYTES
        bags = max(1, min(n_rows, self.read_bytes // OUTPUT_FRACTION // row_bytes))
        self._offsets = torch.arange(bags, device=dev) * (n_rows // bags)
        self._table = table

    def bytes_per_read(self, chunk_bytes: int) -> int:
        return self._layout(chunk_bytes)[3] * chunk_bytes

    def run(self) -> torch.Tensor:
        assert self._idx is not None and self._offsets is not None, "prepare() must run before run()"
        return F.embedding_bag(self._idx, self._table, self._offsets, mode="sum")


def measure_curves(backend: Backend, reader: ChunkReader, settings: ProfilerSettings,
                   progress: bool) -> tuple[dict[int, float], dict[int, float]]:
    """Sequential and gather bandwidth (bytes read / s) for every chunk size.

    Repeats are taken round-robin (every point once per round, then the next round) so a
    burst of load from another process spreads over all points instead of bending one.
    """
    steps = [(n, p) for n in settings.chunk_sizes_bytes for p in ("sequential", "gather")]
    times_s: dict[tuple[int, str], list[float]] = {step: [] for step in steps}
    rounds = settings.warmup + settings.repeats
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rounds * len(steps), desc="bandwidth", unit="pt", file=sys.stderr)
    for r in range(rounds):
        for chunk_bytes, pattern in steps:
            reader.prepare(chunk_bytes, pattern)
            timer = backend.timer()
            timer.start()
            reader.run()
            elapsed_s = timer.stop()
            if r >= settings.warmup:
                times_s[(chunk_bytes, pattern)].append(elapsed_s)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"round {r + 1}/{rounds} {chunk_bytes} B {pattern}")
    if bar is not None:
        bar.close()
    seq: dict[int, float] = {}
    gat: dict[int, float] = {}
    for (chunk_bytes, pattern), ts in times_s.items():
        bw = reader.bytes_per_read(chunk_bytes) / statistics.median(ts)
        (seq if pattern == "sequential" else gat)[chunk_bytes] = bw
    return seq, gat


def measure_stream(backend: Backend, buffer: torch.Tensor, settings: ProfilerSettings) -> float:
    """Whole-buffer ``sum()``: one long sequential read; bytes read / s."""
    t_s = median_time_s(backend, buffer.sum, settings.repeats, settings.warmup)
    return buffer.numel() * ELEM_BYTES / t_s


def run_profile(backend: Backend, quick: bool, progress: bool = True) -> ProfileResult:
    """Measure everything a profile needs on ``backend``."""
    settings = choose_settings(backend, quick)
    # ones, not empty: every page must be touched before timing so no read hits a page fault.
    buffer = torch.ones(settings.buffer_bytes // ELEM_BYTES, dtype=torch.float32, device=backend.device)
    reader = ChunkReader(backend, buffer, settings.read_bytes)
    stream = measure_stream(backend, buffer, settings)
    seq, gat = measure_curves(backend, reader, settings, progress)
    del reader, buffer
    backend.empty_cache()
    flops = measure_flops(backend, settings)
    launch_s = measure_launch_overhead(backend, settings)
    call_s = measure_attention_call(backend, settings)
    rows = measure_matmul_rows(backend, settings)
    link = measure_host_link(backend, settings)
    return ProfileResult(backend=backend.name, description=describe_host(backend), settings=settings,
                         llc_bytes=llc_bytes(), capacity_bytes=backend.mem_get_info().total_bytes,
                         stream_bytes_per_s=stream, sequential_bytes_per_s=seq, gather_bytes_per_s=gat,
                         flops_per_s=flops, launch_overhead_s=launch_s,
                         threads=torch.get_num_threads(), matmul_rows_flops=rows, host_link=link,
                         attention_call_s=call_s)


ADDABLE_KEYS = ("matmul_rows", "attention_call_overhead")


def update_profile_main(argv: list[str] | None = None) -> int:
    """Measure one key and add it to an existing profile, every other key kept.

    ``python -m emulator.bandwidth_profiler --add {matmul_rows,attention_call_overhead}
    PROFILE.yaml [--backend cpu]``: for profiles measured before the key existed. The run's
    date, thread count and host go into ``provenance.<key>``.
    """
    ap = argparse.ArgumentParser(prog="python -m emulator.bandwidth_profiler")
    ap.add_argument("--add", required=True, choices=ADDABLE_KEYS, help="the profile key to measure and add")
    ap.add_argument("profile", metavar="PROFILE.yaml")
    ap.add_argument("--backend", choices=("cpu", "cuda", "mlu"), default="cpu")
    ns = ap.parse_args(argv)
    from emulator.profile import parse_profile

    path = Path(ns.profile)
    text = path.read_text()
    data = yaml.safe_load(text)
    backend = get_backend(ns.backend)
    settings = choose_settings(backend, quick=False)
    provenance: dict[str, object] = {}
    if ns.add == "matmul_rows":
        rows = measure_matmul_rows(backend, settings)
        provenance["repeats"] = max(5, settings.repeats)
        data["matmul_rows"] = matmul_rows_dict(rows, settings)
        shown = "; ".join(dt + ": " + ", ".join(f"M={m} {f / 1e9:.1f}" for m, f in sorted(pts.items())) + " GFLOP/s"
                          for dt, pts in rows.items())
    else:
        launch_s = parse_profile(data, str(path)).launch_overhead_s
        data["attention_call_overhead"] = shown = attention_call_text(measure_attention_call(backend, settings), launch_s)
    data["provenance"][ns.add] = {
        "tool": f"{TOOL} --add {ns.add}", "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch_threads": torch.get_num_threads(), **provenance, "host": describe_host(backend)}
    parse_profile(data, str(path))
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=120))
    print(f"{ns.add}: {shown}")
    print(f"wrote {ns.add} into {path}")
    return 0


def default_name(backend: Backend) -> str:
    return f"{backend.name}-{socket.gethostname().split('.')[0]}"


def profile_bandwidth_main(ns: argparse.Namespace) -> int:
    """``odma-mlu profile-bandwidth``: measure, print a table, write the YAML and the plot."""
    backend = get_backend(ns.backend)
    name = ns.name or default_name(backend)
    out = Path(ns.out or f"{name}.yaml")
    plot = Path(ns.plot) if ns.plot else out.with_suffix(".png")
    print(f"profiling {backend.describe()} ({'quick' if ns.quick else 'full'} run)", file=sys.stderr)
    result = run_profile(backend, quick=bool(ns.quick), progress=not ns.quick)
    data = to_profile_dict(result, name)
    from emulator.profile import parse_profile

    parse_profile(data, str(out))  # never write a profile the loader would reject
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = f"OMP_NUM_THREADS={result.threads} " if backend.device.type == "cpu" else ""
    header = (f"# Device profile measured by {TOOL}\n"
              f"# Bandwidths count bytes READ only. Regenerate with:\n#   {threads}odma-mlu profile-bandwidth "
              f"--backend {ns.backend}{' --quick' if ns.quick else ''} --name {name} --out {out} --plot {plot}\n")
    out.write_text(header + yaml.safe_dump(data, sort_keys=False, width=120))
    write_plot(result, name, plot)
    print(format_table(result))
    print(f"wrote {out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(update_profile_main())
