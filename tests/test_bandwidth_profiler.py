"""The bandwidth profiler: its kernel reads what it claims, and --quick writes a valid profile and a plot."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emulator import bandwidth_profiler as bp
from emulator.profile import load_profile
from odma_mlu.backends import get_backend

REPO = Path(__file__).resolve().parent.parent


def test_llc_bytes_is_positive() -> None:
    assert bp.llc_bytes() >= 1024


def test_chunk_reader_reads_the_chunks_it_names() -> None:
    backend = get_backend("cpu")
    buffer = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB, each element distinct
    reader = bp.ChunkReader(backend, buffer, read_bytes=256 * 1024)
    for chunk_bytes in (64, 4096, 16384):
        for pattern in ("sequential", "gather"):
            reader.prepare(chunk_bytes, pattern)
            assert reader._idx is not None
            rows = reader._idx
            row_elems = reader._table.shape[1]
            # the bag sums add up to the sum of exactly the rows named by the index
            expect = buffer.view(-1, row_elems)[rows].sum()
            assert float(reader.run().sum()) == pytest.approx(float(expect), rel=1e-6)
            assert rows.numel() * row_elems * bp.ELEM_BYTES == reader.bytes_per_read(chunk_bytes)
            chunks = (rows // (chunk_bytes // (row_elems * bp.ELEM_BYTES))).unique()
            assert chunks.numel() * chunk_bytes == reader.bytes_per_read(chunk_bytes), "chunks must be distinct"
            if pattern == "sequential":
                assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + rows.numel()))
            else:
                assert not torch.equal(rows.sort().values, rows), "gather order should be shuffled"


def test_sequential_walks_the_buffer_cyclically() -> None:
    backend = get_backend("cpu")
    reader = bp.ChunkReader(backend, torch.zeros(1 << 18), read_bytes=256 * 1024)  # 1 MiB buffer, 4 reads
    starts = []
    for _ in range(5):
        reader.prepare(4096, "sequential")
        starts.append(int(reader._idx[0]))
    assert starts == [0, 64, 128, 192, 0]


def test_unknown_pattern() -> None:
    reader = bp.ChunkReader(get_backend("cpu"), torch.zeros(1 << 16), read_bytes=4096)
    with pytest.raises(ValueError, match="unknown access pattern 'strided'"):
        reader.prepare(64, "strided")


def test_quick_settings_stay_past_cache_and_small() -> None:
    s = bp.choose_settings(get_backend("cpu"), quick=True)
    assert 256 * 1024**2 <= s.buffer_bytes <= 1024**3
    assert s.chunk_sizes_bytes[0] == 64 and s.chunk_sizes_bytes[-1] == 4 * 1024**2
    full = bp.choose_settings(get_backend("cpu"), quick=False)
    assert full.buffer_bytes >= min(4 * bp.llc_bytes(), 256 * 1024**2)
    assert len(full.chunk_sizes_bytes) > len(s.chunk_sizes_bytes)


def test_quick_run_writes_valid_profile_and_plot(tmp_path: Path) -> None:
    out, plot = tmp_path / "p" / "quick.yaml", tmp_path / "img" / "quick.png"
    ns = argparse.Namespace(backend="cpu", quick=True, out=str(out), plot=str(plot), name="quick-test")
    t0 = time.perf_counter()
    assert bp.profile_bandwidth_main(ns) == 0
    assert time.perf_counter() - t0 < 30.0, "--quick must stay under 30 s"
    p = load_profile(str(out))
    assert p.name == "quick-test"
    assert p.provenance["kind"] == "measured" and p.provenance["quick"] is True
    for key in ("tool", "host", "date", "byte_counting"):
        assert p.provenance[key]
    assert all(pt.source == "measured" for pt in p.sequential.points + p.gather.points)
    assert [pt.chunk_bytes for pt in p.sequential.points] == [pt.chunk_bytes for pt in p.gather.points]
    assert "float32" in p.compute_flops_per_s and p.launch_overhead_s > 0
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert p.host_link_bandwidth_bytes_per_s is None  # a CPU has no host link: it never swaps in the emulator
    assert p.attention_call_s >= p.launch_overhead_s and p.attention_call_overhead_s is not None


def test_add_attention_call_to_a_profile(tmp_path: Path) -> None:
    """``--add attention_call_overhead`` measures the one key into an existing profile and keeps
    every other key; the call is timed through the engine's own decode attention."""
    from emulator.compute_profiler import measure_attention_call
    from odma_mlu.backends import get_backend

    backend = get_backend("cpu")
    call_s = measure_attention_call(backend, bp.choose_settings(backend, quick=True))
    assert 0 < call_s < 0.01
    path = tmp_path / "p.yaml"
    path.write_text((REPO / "device_profiles" / "h100-sxm.yaml").read_text())
    before = load_profile(str(path))
    assert before.attention_call_overhead_s is None
    assert bp.update_profile_main(["--add", "attention_call_overhead", str(path)]) == 0
    after = load_profile(str(path))
    assert after.attention_call_s >= after.launch_overhead_s == before.launch_overhead_s
    assert after.sequential == before.sequential and after.provenance["attention_call_overhead"]["tool"]
    with pytest.raises(SystemExit):
        bp.update_profile_main(["--add", "launch_overhead", str(path)])


def test_measured_host_link_reaches_the_profile() -> None:
    from dataclasses import replace

    from emulator.profile import parse_profile
    from emulator.profile_report import to_profile_dict
    from odma_mlu.backends import get_backend

    backend = get_backend("cpu")
    settings = bp.choose_settings(backend, quick=True)
    assert bp.measure_host_link(backend, settings) is None
    link = bp.HostLink(to_host_bytes_per_s=20e9, to_device_bytes_per_s=30e9, copy_bytes=256 * 2**20)
    assert link.swap_bytes_per_s == pytest.approx(24e9)  # out once and in once: 2 / (1/20 + 1/30)
    result = bp.ProfileResult(backend="cuda", description="test", settings=settings, llc_bytes=1, capacity_bytes=2**30,
                              stream_bytes_per_s=1e11, sequential_bytes_per_s={64: 1e11, 4096: 1e11},
                              gather_bytes_per_s={64: 5e10, 4096: 9e10},
                              flops_per_s={"float32": 1e12}, launch_overhead_s=1e-6)
    data = to_profile_dict(replace(result, host_link=link), "with-link")
    assert data["host_link"]["source"] == "measured" and "20.000 GB/s" in data["host_link"]["note"]
    assert parse_profile(data, "x.yaml").host_link_bandwidth_bytes_per_s == pytest.approx(24e9, rel=1e-3)
    assert "host_link" not in to_profile_dict(result, "no-link")
    assert "page-locked host memory" in data["host_link"]["note"]
    plain = to_profile_dict(replace(result, host_link=replace(link, page_locked=False)), "plain")
    assert "plain host memory" in plain["host_link"]["note"]


def test_standalone_script_help() -> None:
    r = subprocess.run([sys.executable, str(REPO / "tools" / "profile_bandwidth.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--quick" in r.stdout and "--backend" in r.stdout


def test_mlu_backend_error_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from odma_mlu.errors import BackendUnavailable

    monkeypatch.setitem(sys.modules, "torch_mlu", None)
    ns = argparse.Namespace(backend="mlu", quick=True, out=str(tmp_path / "x.yaml"), plot=None, name=None)
    with pytest.raises(BackendUnavailable, match="Cambricon's PyTorch container"):
        bp.profile_bandwidth_main(ns)
    assert not (tmp_path / "x.yaml").exists()


def test_no_device_api_outside_backends() -> None:
    src = (REPO / "emulator" / "bandwidth_profiler.py").read_text()
    for banned in ("torch.cuda", "torch.mlu", "torch_mlu"):
        assert banned not in src
