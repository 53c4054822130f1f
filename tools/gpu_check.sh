#!/usr/bin/env bash
# One command, a few minutes, on a machine with a CUDA GPU: the engine's GPU proof.
#   tools/gpu_check.sh [OUT_DIR]        (default out/gpu_check-<host>-<date>)
# 1. a real HBM profile:   odma-mlu profile-bandwidth --backend cuda --quick
# 2. emulator fidelity:    odma-mlu validate-emulator on CUDA with that profile (small random Qwen2)
# 3. 7B-shaped random-weight Qwen2, fp16: decode step at batch 1, 64, 256, engine eager and with
#    CUDA graphs, next to the roofline (weight + KV bytes / measured bandwidth) and transformers generate
# 4. the CUDA tests: graph capture, preemption by swap (tests/test_graph_runner.py tests/test_swap.py -m cuda)
# Results land in OUT_DIR (profile YAML, JSON, logs). Status: written, NOT yet run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-out/gpu_check-$(hostname)-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "== 1/4 bandwidth profile" | tee "$OUT/log.txt"
timeout 300 "$PY" -m odma_mlu.cli profile-bandwidth --backend cuda --quick --out "$OUT/cuda_profile.yaml" \
    --plot "$OUT/cuda_profile.png" 2>&1 | tee -a "$OUT/log.txt"
echo "== 2/4 validate-emulator on CUDA" | tee -a "$OUT/log.txt"
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from tiny_model import make_tiny_qwen2; \
make_tiny_qwen2('$OUT/val_model', num_layers=4, hidden=1024, heads=16, kv_heads=4, intermediate=2816, dtype='float16')"
timeout 600 "$PY" -m odma_mlu.cli validate-emulator --model "$OUT/val_model" --profile "$OUT/cuda_profile.yaml" \
    --backend cuda --json "$OUT/validate_emulator.json" 2>&1 | tee -a "$OUT/log.txt" || echo "validate-emulator: non-zero exit (FAIL verdict or error), see log" | tee -a "$OUT/log.txt"
echo "== 3/4 7B-shaped decode step: engine eager / graphs / roofline / transformers" | tee -a "$OUT/log.txt"
timeout 900 "$PY" tools/gpu_decode_bench.py --backend cuda --profile "$OUT/cuda_profile.yaml" --batches 1,64,256 \
    --context 512 --steps 20 --json "$OUT/decode_7b.json" 2>&1 | tee -a "$OUT/log.txt"
echo "== 4/4 CUDA graph and swap greedy tests" | tee -a "$OUT/log.txt"
timeout 300 "$PY" -m pytest -q tests/test_graph_runner.py tests/test_swap.py -m cuda 2>&1 | tee -a "$OUT/log.txt" || true
echo "results in $OUT"
