"""Device profiles: the schema, its validation, and loading by name or path.

A profile describes how a device's memory behaves under the access patterns an LLM
server makes::

    name: mlu370-x4
    memory_type: LPDDR5
    capacity_bytes: 23308 MiB
    peak_bandwidth: 307.2 GB/s
    sequential:            # N-byte chunks read back to back (neighbours adjacent)
      - {chunk_bytes: 64, bandwidth: 250 GB/s, source: derived, note: "..."}
    gather:                # N-byte chunks at random offsets
      - {chunk_bytes: 64, bandwidth: 90 GB/s, source: derived, note: "..."}
    compute_flops_per_s: {float16: 96 TFLOPS, float32: 24 TFLOPS}
    launch_overhead: 8 us
    attention_call_overhead: 20 us   # OPTIONAL: see below
    provenance: {kind: derived, sources: [...]}   # or kind: measured, tool, host, date
    host_link: {bandwidth: 25 GB/s, source: derived, note: "..."}   # OPTIONAL: see below
    decode_attention: gather   # OPTIONAL: gather (default) or in_place, see below
    matmul_rows:           # OPTIONAL: achieved FLOP/s of [M, K] x [K, N] against M (rows)
      float32:
        - {rows: 1, flops: 12 GFLOPS, source: measured}
        - {rows: 16, flops: 60 GFLOPS, source: measured}

``matmul_rows`` tells how far below its dense peak a device runs a matmul with few rows
(a decode step multiplies ``batch`` rows by each weight). Without it the cost model
assumes the dense peak at any M. The profiler measures it as models call matmuls
(``F.linear``, weight ``[out, in]``) with a cache-resident ``K = N`` weight, so it isolates
compute efficiency; weight streaming is the memory term.

``host_link`` is the device <-> host copy bandwidth (one direction), what swapping a
preempted request's KV to host memory and back costs. Without it the emulator does not
swap on that profile (every preemption recomputes).

``attention_call_overhead`` is the fixed time of one attention call over a view of the KV
arena (a decode group's, a view's, a split read's part's, a prefill's): its launch, the
kernel's own set-up and the view ops around it, beyond the bytes it reads and the FLOPs it
computes. The profiler times the engine's decode attention over a one-token view. At least
``launch_overhead``; without it a call costs one launch (derived profiles: unmeasured).

``decode_attention`` says how the decode attention kernel on this device reads KV runs:
``gather`` (the default, what ``odma_mlu/models/attention.py`` issues on every backend
today) copies each batched group's slots, padded to its longest member, into a buffer
that attention then reads, so those bytes are written and read once more; ``in_place``
prices a kernel that reads every run where it lies (vendor paged attention over block
tables, or a run-aware kernel). No backend here has such a kernel yet: ``in_place`` is a
what-if, and figures priced with it say so.

Curves must have strictly increasing, positive ``chunk_bytes``. Each point says whether it
was ``measured`` or ``derived`` and, if derived, why (``note``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from emulator.units import parse_quantity
from odma_mlu.errors import ProfileError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "device_profiles"
TOP_KEYS_REQUIRED = ("name", "memory_type", "capacity_bytes", "peak_bandwidth", "sequential", "gather",
                     "compute_flops_per_s", "launch_overhead", "provenance")
TOP_KEYS_OPTIONAL = ("schema_version", "description", "notes", "matmul_rows", "host_link", "decode_attention",
                     "attention_call_overhead")
DECODE_ATTENTION = ("gather", "in_place")
LINK_KEYS = ("bandwidth", "source", "note")
ROWS_POINT_KEYS = ("rows", "flops", "source", "note")
POINT_KEYS = ("chunk_bytes", "bandwidth", "source", "note")
SOURCES = ("measured", "derived")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class CurvePoint:
    chunk_bytes: float
    bandwidth_bytes_per_s: float
    source: str
    note: str = ""


@dataclass(frozen=True)
class BandwidthCurve:
    """Achieved read bandwidth against chunk size, interpolated log-linearly in chunk size."""

    points: tuple[CurvePoint, ...]

    def at(self, chunk_bytes: float) -> float:
        xs = [p.chunk_bytes for p in self.points]
        ys = [p.bandwidth_bytes_per_s for p in self.points]
        if chunk_bytes <= xs[0]:
            return ys[0]
        if chunk_bytes >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, chunk_bytes)
        x0, x1 = math.log(xs[i - 1]), math.log(xs[i])
        t = (math.log(chunk_bytes) - x0) / (x1 - x0)
        return ys[i - 1] + t * (ys[i] - ys[i - 1])


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_type: str
    capacity_bytes: int
    peak_bandwidth_bytes_per_s: float
    sequential: BandwidthCurve
    gather: BandwidthCurve
    compute_flops_per_s: Mapping[str, float]
    launch_overhead_s: float
    provenance: Mapping[str, Any]
    source_path: str = ""
    matmul_rows: Mapping[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    """Optional: per dtype, (rows M, achieved FLOP/s) points, M strictly increasing."""
    host_link_bandwidth_bytes_per_s: float | None = None
    """Optional: device <-> host copy bandwidth, one direction (None: not known, no swapping)."""
    decode_attention: str = "gather"
    """How decode attention reads KV runs: ``gather`` (what the code issues) or ``in_place``."""
    attention_call_overhead_s: float | None = None
    """Optional: the fixed seconds of one attention call, its launch included (None: one launch)."""

    @property
    def attention_call_s(self) -> float:
        """Seconds one attention call costs beyond its bytes and FLOPs (its launch included)."""
        return self.launch_overhead_s if self.attention_call_overhead_s is None else self.attention_call_overhead_s

    @property
    def stream_bandwidth_bytes_per_s(self) -> float:
        """Sustained sequential bandwidth of a long stream (weights, a long run): the
        sequential curve at its longest chunk. Not the curve's maximum: a CPU reads short
        chunks from cache-friendly kernels faster than its matmuls stream weights from DRAM."""
        return max(self.sequential.points, key=lambda p: p.chunk_bytes).bandwidth_bytes_per_s

    def locality(self, run_bytes: float) -> float:
        """Fraction of sequential bandwidth kept when runs of ``run_bytes`` are scattered.

        gather(N) / sequential(N) with both curves interpolated as in ``BandwidthCurve.at``,
        capped at 1, made non-decreasing in N: a longer run can always be read as several
        shorter ones, so it is never slower per byte. Continuous in N (not a step at each
        curve point), so reading more bytes never takes less time.
        """

        def ratio(n: float) -> float:
            return min(1.0, self.gather.at(n) / self.sequential.at(n))

        # Between two knots both curves are linear in log N, so their ratio is monotone there:
        # the running maximum is the best of the knots below N and the value at N itself.
        knots = sorted({p.chunk_bytes for p in self.gather.points} | {p.chunk_bytes for p in self.sequential.points})
        best = ratio(run_bytes)
        for k in knots:
            if k >= run_bytes:
                break
            best = max(best, ratio(k))
        return best

    def flops_for(self, dtype: str) -> float:
        if dtype not in self.compute_flops_per_s:
            raise ProfileError(f"profile {self.name!r} ({self.source_path}) has no compute peak for {dtype}; "
                               f"it lists {sorted(self.compute_flops_per_s)}")
        return self.compute_flops_per_s[dtype]

    def matmul_flops(self, dtype: str, rows: int) -> float:
        """Achieved FLOP/s of a matmul whose left operand has ``rows`` rows.

        From ``matmul_rows`` when the profile has a curve for ``dtype``, else the dense peak.
        Interpolated so the TIME of a fixed-size product (proportional to rows / FLOP/s) is
        linear in ``rows`` between measured points and never decreases with ``rows`` (a
        bigger batch never runs faster), and never above the dense peak (the roofline).
        """
        peak = self.flops_for(dtype)
        pts = self.matmul_rows.get(dtype)
        if not pts or rows <= 0:
            return peak
        # s(M) = M / flops(M): seconds per (2 K N) FLOPs; running max over the knots makes it
        # non-decreasing, linear interpolation keeps it so between knots.
        ms = [m for m, _ in pts]
        ss: list[float] = []
        for m, f in pts:
            ss.append(max(m / f, ss[-1] if ss else 0.0))
        if rows <= ms[0]:
            s = rows / pts[0][1]
        elif rows >= ms[-1]:
            s = max(ss[-1], rows / pts[-1][1])
        else:
            i = bisect.bisect_right(ms, rows)
            t = (rows - ms[i - 1]) / (ms[i] - ms[i - 1])
            s = ss[i - 1] + t * (ss[i] - ss[i - 1])
        s = max(s, rows / peak)
        return rows / s


def _matmul_rows(raw: Any, where: str, dtypes: Mapping[str, float]) -> dict[str, tuple[tuple[int, float], ...]]:
    """Validate the optional ``matmul_rows`` mapping: dtype -> [{rows, flops, source, note}]."""
    if not isinstance(raw, Mapping) or not raw:
        raise ProfileError(f"{where}: matmul_rows must map dtypes {list(DTYPES)} to lists of "
                           "{rows, flops, source, note} points")
    out: dict[str, tuple[tuple[int, float], ...]] = {}
    for dt, pts in raw.items():
        at = f"{where}: matmul_rows.{dt}"
        if dt not in DTYPES:
            raise ProfileError(f"{at}: unknown dtype {dt!r}; expected one of {list(DTYPES)}")
        if dt not in dtypes:
            raise ProfileError(f"{at}: compute_flops_per_s has no peak for {dt}; add it first")
        if not isinstance(pts, list) or len(pts) < 2:
            raise ProfileError(f"{at}: must be a list of at least 2 points {{rows, flops, source, note}}")
        rows_seen: list[tuple[int, float]] = []
        for i, pt in enumerate(pts):
            pat = f"{at}[{i}]"
            _check_point_keys(pt, pat, ROWS_POINT_KEYS)
            rows = pt["rows"]
            if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
                raise ProfileError(f"{pat}.rows: must be a positive integer, got {rows!r}")
            if rows_seen and rows <= rows_seen[-1][0]:
                raise ProfileError(f"{pat}.rows: must increase strictly; {rows} follows {rows_seen[-1][0]}")
            flops = parse_quantity(pt["flops"], "flops", f"{pat}.flops")
            if flops <= 0:
                raise ProfileError(f"{pat}.flops: must be positive, got {flops:g}")
            if pt["source"] not in SOURCES:
                raise ProfileError(f"{pat}.source: {pt['source']!r} is not one of {list(SOURCES)}")
            if pt["source"] == "derived" and not str(pt.get("note", "")).strip():
                raise ProfileError(f"{pat}.note: a derived point must say how it was derived")
            rows_seen.append((rows, flops))
        out[dt] = tuple(rows_seen)
    return out


def _check_point_keys(pt: Any, at: str, keys: tuple[str, ...]) -> None:
    """A curve point is a mapping of ``keys`` only, every one present but the last (``note``)."""
    if not isinstance(pt, Mapping):
        raise ProfileError(f"{at}: expected a mapping with keys {list(keys)}")
    unknown = sorted(set(pt) - set(keys))
    if unknown:
        raise ProfileError(f"{at}: unknown key(s) {unknown}; expected {list(keys)}")
    for k in keys[:-1]:
        if k not in pt:
            raise ProfileError(f"{at}: missing key '{k}'")


def _curve(raw: Any, key: str, where: str, peak: float) -> BandwidthCurve:
    if not isinstance(raw, list) or len(raw) < 2:
        raise ProfileError(f"{where}: key '{key}' must be a list of at least 2 points "
                           "({chunk_bytes, bandwidth, source, note})")
    points: list[CurvePoint] = []
    for i, pt in enumerate(raw):
        at = f"{where}: {key}[{i}]"
        _check_point_keys(pt, at, POINT_KEYS)
        chunk = parse_quantity(pt["chunk_bytes"], "bytes", f"{at}.chunk_bytes")
        bw = parse_quantity(pt["bandwidth"], "bandwidth", f"{at}.bandwidth")
        if chunk <= 0:
            raise ProfileError(f"{at}.chunk_bytes: must be positive, got {chunk:g}")
        if points and chunk <= points[-1].chunk_bytes:
            raise ProfileError(f"{at}.chunk_bytes: granularities must increase strictly; {chunk:g} follows "
                               f"{points[-1].chunk_bytes:g}")
        if bw <= 0:
            raise ProfileError(f"{at}.bandwidth: must be positive, got {bw:g} B/s")
        if bw > 1.10 * peak:
            raise ProfileError(f"{at}.bandwidth: {bw:.3g} B/s exceeds peak_bandwidth {peak:.3g} B/s by more than 10%")
        source = pt["source"]
        if source not in SOURCES:
            raise ProfileError(f"{at}.source: {source!r} is not one of {list(SOURCES)}")
        note = str(pt.get("note", ""))
        if source == "derived" and not note.strip():
            raise ProfileError(f"{at}.note: a derived point must say how it was derived")
        points.append(CurvePoint(chunk, bw, source, note))
    return BandwidthCurve(tuple(points))


def parse_profile(data: Any, where: str) -> DeviceProfile:
    """Validate a profile mapping; every error names ``where``, the key and what was expected."""
    if not isinstance(data, Mapping):
        raise ProfileError(f"{where}: a device profile must be a YAML mapping, got {type(data).__name__}")
    missing = [k for k in TOP_KEYS_REQUIRED if k not in data]
    if missing:
        raise ProfileError(f"{where}: missing key(s) {missing}; a profile needs {list(TOP_KEYS_REQUIRED)}")
    unknown = sorted(set(data) - set(TOP_KEYS_REQUIRED) - set(TOP_KEYS_OPTIONAL))
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {unknown}; valid keys are "
                           f"{list(TOP_KEYS_REQUIRED + TOP_KEYS_OPTIONAL)}")
    capacity = parse_quantity(data["capacity_bytes"], "bytes", f"{where}: capacity_bytes")
    if capacity <= 0:
        raise ProfileError(f"{where}: capacity_bytes must be positive, got {capacity:g}")
    peak = parse_quantity(data["peak_bandwidth"], "bandwidth", f"{where}: peak_bandwidth")
    if peak <= 0:
        raise ProfileError(f"{where}: peak_bandwidth must be positive, got {peak:g}")
    seq = _curve(data["sequential"], "sequential", where, peak)
    gat = _curve(data["gather"], "gather", where, peak)
    flops_raw = data["compute_flops_per_s"]
    if not isinstance(flops_raw, Mapping) or not flops_raw:
        raise ProfileError(f"{where}: compute_flops_per_s must map dtypes {list(DTYPES)} to peaks")
    flops: dict[str, float] = {}
    for dt, v in flops_raw.items():
        if dt not in DTYPES:
            raise ProfileError(f"{where}: compute_flops_per_s has unknown dtype {dt!r}; expected {list(DTYPES)}")
        f = parse_quantity(v, "flops", f"{where}: compute_flops_per_s.{dt}")
        if f <= 0:
            raise ProfileError(f"{where}: compute_flops_per_s.{dt} must be positive, got {f:g}")
        flops[dt] = f
    overhead = parse_quantity(data["launch_overhead"], "seconds", f"{where}: launch_overhead")
    if overhead < 0:
        raise ProfileError(f"{where}: launch_overhead must be >= 0, got {overhead:g}")
    call: float | None = None
    if "attention_call_overhead" in data:
        call = parse_quantity(data["attention_call_overhead"], "seconds", f"{where}: attention_call_overhead")
        if call < overhead:
            raise ProfileError(f"{where}: attention_call_overhead = {call:g} s is below launch_overhead "
                               f"({overhead:g} s); a call includes its launch")
    prov = data["provenance"]
    if not isinstance(prov, Mapping) or prov.get("kind") not in SOURCES:
        raise ProfileError(f"{where}: provenance must be a mapping with kind 'measured' or 'derived'")
    need = ("tool", "host", "date") if prov["kind"] == "measured" else ("sources",)
    lacking = [k for k in need if not prov.get(k)]
    if lacking:
        raise ProfileError(f"{where}: provenance of kind {prov['kind']!r} needs {list(need)}; missing {lacking}")
    rows = _matmul_rows(data["matmul_rows"], where, flops) if "matmul_rows" in data else {}
    link = _host_link(data["host_link"], where) if "host_link" in data else None
    attention = data.get("decode_attention", "gather")
    if attention not in DECODE_ATTENTION:
        raise ProfileError(f"{where}: decode_attention = {attention!r} is not allowed; choose one of "
                           f"{list(DECODE_ATTENTION)}")
    return DeviceProfile(
        name=str(data["name"]), memory_type=str(data["memory_type"]), capacity_bytes=int(capacity),
        peak_bandwidth_bytes_per_s=peak, sequential=seq, gather=gat, compute_flops_per_s=flops,
        launch_overhead_s=overhead, provenance=dict(prov), source_path=where, matmul_rows=rows,
        host_link_bandwidth_bytes_per_s=link, decode_attention=attention, attention_call_overhead_s=call,
    )


def _host_link(raw: Any, where: str) -> float:
    if not isinstance(raw, Mapping) or "bandwidth" not in raw:
        raise ProfileError(f"{where}: host_link must be a mapping with a bandwidth, e.g. "
                           "{bandwidth: 25 GB/s, source: derived, note: ...}")
    unknown = sorted(set(raw) - set(LINK_KEYS))
    if unknown:
        raise ProfileError(f"{where}: host_link has unknown key(s) {unknown}; valid keys are {list(LINK_KEYS)}")
    if raw.get("source") not in SOURCES:
        raise ProfileError(f"{where}: host_link.source must be one of {list(SOURCES)}, got {raw.get('source')!r}")
    if raw["source"] == "derived" and not raw.get("note"):
        raise ProfileError(f"{where}: a derived host_link needs a note saying where its bandwidth comes from")
    bw = parse_quantity(raw["bandwidth"], "bandwidth", f"{where}: host_link.bandwidth")
    if bw <= 0:
        raise ProfileError(f"{where}: host_link.bandwidth must be positive, got {bw:g}")
    return bw


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def resolve_profile_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ProfileError(f"device profile file {path} does not exist")
        return path
    candidate = PROFILE_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ProfileError(f"unknown device profile {name_or_path!r}; built-in profiles are {available_profiles()} "
                           "or pass a path to a YAML file")
    return candidate


def load_profile(name_or_path: str) -> DeviceProfile:
    path = resolve_profile_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: invalid YAML ({e})") from e
    return parse_profile(data, str(path))
