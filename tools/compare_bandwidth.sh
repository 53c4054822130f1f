#!/usr/bin/env bash
# Cross-check our CPU sequential read bandwidth against two external tools, in ONE session
# (same machine state, back to back), all single-threaded:
#
#   1. odma-mlu profile-bandwidth --backend cpu --quick   (OMP_NUM_THREADS=1)
#   2. sysbench memory --memory-oper=read                 (reads 8-byte words; --threads=1)
#   3. mbw -t0 (memcpy)                                    (single-threaded by design)
#
# Byte counting, made equal:
#   - ours:     bytes READ / s (embedding_bag sums, writes <= 1/64 of that, not counted).
#   - sysbench: "MiB transferred" with --memory-oper=read is bytes READ / s. Same counting.
#               The block must exceed the LLC: with the default 1K (or 1M) block sysbench
#               re-reads one cache-resident block and reports cache bandwidth.
#   - mbw:      "Copy: X MiB/s" is N / t for a memcpy of N bytes, which READS N and WRITES N.
#               Read-only counting: N / t (as printed). Traffic counting: 2 N / t.
#   MiB/s are converted to GB/s (1 MiB/s = 1.048576e-3 GB/s).
#
# Usage: tools/compare_bandwidth.sh [OUT_DIR]   (needs: apt-get install -y mbw sysbench)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
ODMA=${ODMA:-.venv/bin/odma-mlu}
for tool in mbw sysbench; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y mbw sysbench" >&2; exit 2; }
done

echo "== $(date -u +%FT%TZ) on $(hostname), $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== 1. odma-mlu profile-bandwidth --backend cpu --quick (OMP_NUM_THREADS=1)"
OMP_NUM_THREADS=1 "$ODMA" profile-bandwidth --backend cpu --quick --name compare-quick \
  --out "$OUT/quick.yaml" --plot "$OUT/quick.png" | tee "$OUT/ours.txt"

echo "== 2. sysbench memory --memory-oper=read --memory-block-size=2G --memory-total-size=16G --threads=1"
sysbench memory --memory-oper=read --memory-access-mode=seq --memory-block-size=2G \
  --memory-total-size=16G --threads=1 run | tee "$OUT/sysbench.txt" | grep -E "transferred|total time"

echo "== 3. mbw -q -n 5 -t0 256   (memcpy of 256 MiB arrays)"
mbw -q -n 5 -t0 256 | tee "$OUT/mbw.txt" | grep AVG

"$PY" - "$OUT" <<'EOF'
import re, sys
from pathlib import Path
from emulator.profile import load_profile
out = Path(sys.argv[1])
p = load_profile(str(out / "quick.yaml"))
long_runs = [pt.bandwidth_bytes_per_s for pt in p.sequential.points if pt.chunk_bytes >= 64 * 1024]
ours_seq = sorted(long_runs)[len(long_runs) // 2] / 1e9   # median of the sequential curve, chunks >= 64 KiB
ours_max = p.stream_bandwidth_bytes_per_s / 1e9           # best sequential point (what the cost model uses)
ours_sum = float(re.search(r"stream \(buffer.sum.*?: ([0-9.]+) GB/s", (out / "ours.txt").read_text()).group(1))
sb = float(re.search(r"\(([0-9.]+) MiB/sec\)", (out / "sysbench.txt").read_text()).group(1)) * 1.048576e-3
mbw = float(re.search(r"AVG.*Copy: ([0-9.]+) MiB/s", (out / "mbw.txt").read_text()).group(1)) * 1.048576e-3
ours = [("stream buffer.sum()", ours_sum), ("seq curve median >=64KiB", ours_seq), ("seq curve max", ours_max)]
theirs = [("sysbench read", sb), ("mbw memcpy N/t (read)", mbw), ("mbw memcpy 2N/t (moved)", 2 * mbw)]
print("\nall figures in GB/s (1e9 B/s); cells are ours / theirs")
print(f"{'':<26}" + "".join(f"{n:>26}" for n, _ in theirs))
print(f"{'':<26}" + "".join(f"{v:>26.2f}" for _, v in theirs))
for name, v in ours:
    print(f"{name + f' {v:.2f}':<26}" + "".join(f"{v / t:>26.2f}" for _, t in theirs))
ratio = ours_sum / sb
ok = 0.5 <= ratio <= 2.0
print(f"acceptance: ours (plain sequential stream, bytes read) / sysbench (sequential read, bytes read) = "
      f"{ratio:.2f} -> {'PASS' if ok else 'FAIL'} (must be within a factor of 2)")
sys.exit(0 if ok else 1)
EOF
