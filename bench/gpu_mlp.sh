#!/usr/bin/env bash
# The SwiGLU gate on the lent GPU: the 1B shape's decode step (batch 1 and 16), kernel by kernel,
# before and after gate|up became one GEMV and the gate one lmforge.SiluMul launch.
#
# Run from the repo root on the GPU machine after `bash bench/gpu_http.sh tests` (kernels built)
# and `bash bench/gpu_http.sh build` (the fp32 source and the fused fp16 artifact), in one process
# per case, alternated:
#   before      the artifact as built without the fusion (separate gate and up GEMVs, ONNX gate nodes)
#   fused-gemv  gate|up as one GEMV, the gate as ONNX nodes (LMFORGE_KERNELS_SILU=0)
#   silu-mul    gate|up as one GEMV, the gate as lmforge.SiluMul (the default with kernels built)
# CASES picks among them (default all three), ROUNDS names the rounds (default "1 2"), BATCH, NEW and
# REPEATS shorten a run. Writes OUT/gpu_profile-<label>.json (bench/gpu_profile.py) and prints a table last.
set -uo pipefail
export PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
SHAPE=${SHAPE:-llama-3.2-1b}
W=/tmp/lmf-serve/$SHAPE
ARGS="--batch ${BATCH:-1,16} --new-tokens ${NEW:-256} --repeats ${REPEATS:-3} --out $OUT"
mkdir -p "$OUT"
quiet() { grep -v -E "^(WARNING|INFO|USDT|STAGE|\[W)" | grep -v "^$"; }
for round in ${ROUNDS:-1 2}; do
  for case in ${CASES:-before fused-gemv silu-mul}; do
    case $case in
      before) python3 bench/gpu_profile.py --artifact "$W/serve-cuda-unfused" --unfused-from "$W/fp32" \
                --label "before-$round" $ARGS 2>&1 | quiet ;;
      fused-gemv) LMFORGE_KERNELS_SILU=0 python3 bench/gpu_profile.py --artifact "$W/serve-cuda" \
                    --label "fused-gemv-$round" $ARGS 2>&1 | quiet ;;
      silu-mul) python3 bench/gpu_profile.py --artifact "$W/serve-cuda" --label "silu-mul-$round" $ARGS 2>&1 | quiet ;;
    esac
  done
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = sorted(Path(sys.argv[1]).glob("gpu_profile-*.json"))
print(f"{'case':<14} {'batch':>5} {'tok/s':>8} {'step us':>8} {'kernels us':>10} {'idle us':>8} {'launches':>8} {'GB/s':>7}")
for path in rows:
    data = json.loads(path.read_text())
    for key, row in data.items():
        if key.startswith("batch"):
            print(f"{data['label']:<14} {key[6:]:>5} {row['decode_tok_s']:>8} {row['step_us']:>8} {row['kernel_us']:>10} "
                  f"{row['idle_us']:>8} {row['launches']:>8} {row['bandwidth_gb_s']:>7}")
PY
