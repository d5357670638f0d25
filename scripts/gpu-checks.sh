#!/usr/bin/env bash
# The GPU checks and benchmarks of the engine, end to end, for a bare CUDA machine (torch, transformers,
# safetensors, triton, pytest; no install of this repo). Each step has its own time limit and a failing
# step does not stop the next, so one run gives every answer it can.
#
#   bash scripts/gpu-checks.sh [phase] [outdir]
#     phase 1: CUDA tests (Triton kernels compiled for the GPU, CUDA-graph decode, sampler without host
#              syncs), the fp32 fidelity check, batches 1/8/64, the paged-attention micro-benchmark
#     phase 2: batches 32/128, the 32k-token prompt, ringattn on a 16k block, the sampler benchmark
#     all:     both (about 9 minutes on an H200)
#   outdir (default bench/results/gpu): gpu.log and one JSON per benchmark.
#
# With the device tool: run with command `bash scripts/gpu-checks.sh 1 "$OUT"` (timeout_s 330), then
# `bash scripts/gpu-checks.sh 2 "$OUT"` (timeout_s 300).
set -u
phase="${1:-all}"
out="${2:-bench/results/gpu}"
mkdir -p "$out"
log="$out/gpu.log"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

step() {  # step SECONDS NAME COMMAND...: run with a limit, log its output, report its status
  local limit="$1" name="$2"
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$log"
}

if [[ "$phase" == 1 || "$phase" == all ]]; then
  step 15 environment bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; \
    $py -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'"
  step 110 cuda-tests $py scripts/pytest_checkout.py tests/engine/test_paged_attention.py tests/engine/test_gpu_step.py \
    tests/engine/test_sampler_batched.py
  step 50 bench-fidelity $py bench/engine_gpu.py --sections fidelity --out "$out/engine_gpu_fidelity.json"
  step 120 bench-batches $py bench/engine_gpu.py --sections batches --batches 1 8 64 \
    --out "$out/engine_gpu_batches.json"
  step 35 bench-paged-attention $py bench/paged_attention.py --out "$out/paged_attention.json"
fi
if [[ "$phase" == 2 || "$phase" == all ]]; then
  step 110 bench-batches-more $py bench/engine_gpu.py --sections batches --batches 32 128 \
    --out "$out/engine_gpu_batches_more.json"
  step 110 bench-long $py bench/engine_gpu.py --sections long ringattn --out "$out/engine_gpu_long.json"
  step 60 bench-sampler $py bench/sampler.py --device cuda --compile
fi
