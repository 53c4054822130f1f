#!/usr/bin/env bash
# One command, under 8 minutes, on a machine with a CUDA GPU: the engine's GPU proof.
#   tools/gpu_check.sh [OUT_DIR]        (default out/gpu_check-<host>-<date>)
#   BACKEND=cpu tools/gpu_check.sh DIR  (smoke run of the script itself: tiny shapes, ~1 minute;
#                                        tests/test_gpu_check.py runs it, marked slow)
# 1. a real HBM profile:   odma-mlu profile-bandwidth --backend cuda --quick
# 2. emulator fidelity:    odma-mlu validate-emulator on CUDA with that profile (small random Qwen2)
# 3. 7B-shaped random-weight Qwen2, fp16: decode step at batch 1, 64, 256, engine eager and with
#    CUDA graphs, next to the roofline (weight + KV bytes / measured bandwidth) and transformers generate
# 4. the CUDA tests: graph capture, preemption by swap, the flash kernel's log-sum-exp for split reads
#    (tests/test_graph_runner.py tests/test_swap.py tests/test_split_reads.py -m cuda)
# Results land in OUT_DIR (profile YAML, JSON, logs). Each step has its own time limit and a
# failed step does not stop the next; the limits add up to 450 s, so one device call of 600 s
# holds the whole script (a lent GPU has ~15 minutes in all, machine start included).
# Status: the CPU smoke runs in the slow tests; NOT yet run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BACKEND=${BACKEND:-cuda}
OUT=${1:-out/gpu_check-$(hostname)-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
if [ "$BACKEND" = cuda ]; then
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")' || exit 2
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    VAL_SHAPE="num_layers=4, hidden=1024, heads=16, kv_heads=4, intermediate=2816"
    DECODE="--shape deepseek-r1-distill-qwen-7b --batches 1,64,256 --context 512 --steps 20"
elif [ "$BACKEND" = cpu ]; then
    VAL_SHAPE="num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256"
    DECODE="--shape tiny --batches 1,4 --context 64 --steps 3"
else
    echo "BACKEND=$BACKEND: allowed values are cuda (the check) and cpu (smoke run of this script)" >&2
    exit 2
fi
status=0
step() {  # step LIMIT_S NAME COMMAND...: run with a time limit, log, remember a failure
    local limit=$1 name=$2; shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')" | tee -a "$OUT/log.txt"
        status=1
    fi
}
: > "$OUT/log.txt"
step 90 "1/4 bandwidth profile" "$PY" -m odma_mlu.cli profile-bandwidth --backend "$BACKEND" --quick \
    --out "$OUT/profile.yaml" --plot "$OUT/profile.png"
step 30 "2/4 small random fp16 Qwen2" "$PY" -c "import sys; sys.path.insert(0, 'tests'); \
from tiny_model import make_tiny_qwen2; make_tiny_qwen2('$OUT/val_model', $VAL_SHAPE, dtype='float16')"
# validate-emulator exits non-zero on a FAIL verdict: the log and JSON say which cases missed.
step 120 "2/4 validate-emulator" "$PY" -m odma_mlu.cli validate-emulator --model "$OUT/val_model" \
    --profile "$OUT/profile.yaml" --backend "$BACKEND" --json "$OUT/validate_emulator.json"
step 150 "3/4 decode step: engine eager / graphs / roofline / transformers" "$PY" tools/gpu_decode_bench.py \
    --backend "$BACKEND" --profile "$OUT/profile.yaml" $DECODE --json "$OUT/decode.json"
if [ "$BACKEND" = cuda ]; then
    step 60 "4/4 CUDA graph, swap and split-read tests" "$PY" -m pytest -q tests/test_graph_runner.py \
        tests/test_swap.py tests/test_split_reads.py -m cuda
fi
echo "results in $OUT (exit $status: 0 when every step finished without error)"
exit $status
