#!/usr/bin/env bash
# The server against its own engine on the lent GPU, and time to first token against onnxruntime-genai.
#
# Run from the repo root on the GPU machine after staging onnxruntime-gpu (+ genai) into
# /tmp/gpu-site and the server's wheels (.whl/, carried) into /tmp/site:
#
#   bash bench/gpu_http.sh build      # the 1B-shape fp16 shared-buffer artifact
#   bash bench/gpu_http.sh tests      # the CUDA tests (test_gpu.py, test_kernels.py), kernels built first
#   bash bench/gpu_http.sh ttft       # bench/gpu_ttft.py: batch-1 TTFT in phases, against genai
#   bash bench/gpu_http.sh serve      # lmforge bench-serve --compare-engine: greedy, then half sampled
#   bash bench/gpu_http.sh ray        # bench/ray_replicas.py --mode vs-serve (ray staged in /tmp/ray-site)
#
# GENAI= (empty) skips genai in ttft; MIXES, REQUESTS, WARMUP shorten serve, PREFILL=N gives it a prompt-token
# budget per step boundary (--prefill-tokens); ROUNDS sets ray's rounds, RAY_ROWS its rows (0,1,2,3).
# Each step writes under $OUT (the tables docs/serving.md and docs/benchmarks.md show).
set -uo pipefail
export PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
SHAPE=${SHAPE:-llama-3.2-1b}
ART=/tmp/lmf-serve/$SHAPE/serve-cuda
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"

case "${1:-}" in
  build)
    python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from gpu_serving import build; \
print(build('$SHAPE', Path('/tmp/lmf-serve'), 'cuda'))" 2>&1 | tail -3
    ;;
  ttft)
    python3 bench/gpu_ttft.py --artifact "$ART" --shape "$SHAPE" ${GENAI---genai} --profile --sampler --lengths ${LENGTHS:-2,32,2,32} --out "$OUT" 2>&1 \
      | grep -v -E "^(WARNING|INFO)" | tail -45
    ;;
  tests)
    export PATH="$PATH:/usr/local/cuda/bin"
    python3 -m lmforge kernels build 2>&1 | tail -1
    python3 -m pytest -q -p no:cacheprovider -rs --timeout=120 tests/runtime/test_gpu.py tests/runtime/test_kernels.py \
      2>&1 | tee "$OUT/gpu_tests.log" | tail -25
    ;;
  ray)
    PYTHONPATH=/tmp/gpu-site:/tmp/site:/tmp/ray-site:$PWD PATH=/tmp/ray-site/bin:$PATH \
      python3 bench/ray_replicas.py "$ART" --device cuda --mode vs-serve --rounds "${ROUNDS:-3}" --concurrency 32 \
      --requests "${REQUESTS:-512}" --warmup "${WARMUP:-64}" --new-tokens 128 --prompt-len 128 --max-batch 64 \
      ${RAY_ROWS:+--rows "$RAY_ROWS"} --json "$OUT/ray_gpu.json" 2>&1 | grep -v -E "^\(|INFO|WARNING" | tail -20
    ;;
  serve)
    for mix in ${MIXES:-greedy:1 greedy:1,sampled:1}; do
      name=$(echo "$mix" | tr ':,' '__')
      python3 -m lmforge bench-serve "$ART" --device cuda --max-batch 64 --max-queue 1024 \
        --concurrency 16,64 --requests "${REQUESTS:-256}" --warmup "${WARMUP:-64}" --new-tokens 128 --prompt-len 128 --mix "$mix" \
        --api-workers "${API_WORKERS:-1}" ${PREFILL:+--prefill-tokens "$PREFILL"} --compare-engine \
        --json "$OUT/http_$name${PREFILL:+_p$PREFILL}.json" 2>&1 \
        | grep -E "tok/s|HTTP/engine|Error|error" | tail -12
    done
    ;;
  *)
    echo "usage: bash bench/gpu_http.sh build|tests|ttft|serve|ray" >&2
    exit 2
    ;;
esac
