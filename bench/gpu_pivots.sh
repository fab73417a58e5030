#!/usr/bin/env bash
# The cluster kernel's top-p threshold search with 1 (bisection), 3 or 7 pivots a round, on the lent GPU:
# each variant built with -DLMFORGE_CLUSTER_PIVOTS=P, checked by the selftest (cluster against single-block),
# then decode tok/s through onnxruntime (bench/gpu_kernels.py --modes fused, LMFORGE_KERNELS_LIB=that build).
#
#   bash .gpu-wheels/p4/stage.sh >/dev/null && bash bench/gpu_pivots.sh      (carry .gpu-wheels/p4, .whl)
#
# PIVOTS (default "1 3 7"), REPEATS (default 2), SELFTEST=0 skips the selftests. Results: docs/kernels.md.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/lmf-site /tmp/site /tmp/pivots
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LMFORGE_CACHE=/tmp/lmf-cache
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/optimum-*.whl .whl/onnx_ir-*.whl .whl/gguf-*.whl 2>/dev/null
printf 'try:\n    import onnxruntime\n    onnxruntime.preload_dlls()\nexcept Exception:\n    pass\n' > /tmp/lmf-site/sitecustomize.py
export PYTHONPATH="/tmp/lmf-site:/tmp/gpu-site:/tmp/site:$PWD"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
for p in ${PIVOTS:-1 3 7}; do
  stamp "build P=$p"
  python3 - "$p" <<'PY' 2>&1 | tail -3
import os, subprocess, sys
from pathlib import Path
from runtime.kernels import build as b
p = sys.argv[1]
arch = b.detect_arch(); nvcc = b.find_nvcc()
flags = (*b._FLAGS, f"-DLMFORGE_CLUSTER_PIVOTS={p}")
lib = Path(f"/tmp/pivots/p{p}/liblmforge_kernels.so"); lib.parent.mkdir(parents=True, exist_ok=True)
done = subprocess.run(b._command(nvcc, arch, lib, flags=flags), capture_output=True, text=True)
print("library", lib, done.returncode, done.stderr[-400:])
if os.environ.get("SELFTEST", "1") != "0":  # (a quoted heredoc: the shell expands nothing here)
    exe = lib.parent / "selftest"
    done = subprocess.run(b._command(nvcc, arch, exe, (b.SELFTEST,), ("-std=c++17", "-O3", "-cudart", "static",
                          f"-DLMFORGE_CLUSTER_PIVOTS={p}")), capture_output=True, text=True)
    print("selftest build", done.returncode, done.stderr[-400:])
PY
  if [ "${SELFTEST:-1}" != "0" ] && [ -x /tmp/pivots/p$p/selftest ]; then
    timeout 120 /tmp/pivots/p$p/selftest > "$OUT/selftest_p$p.log" 2>&1
    grep -E "^CHECK .*[1-9][0-9]* differ|FAIL|SELFTEST" "$OUT/selftest_p$p.log" | grep -v " 0 differ" | tail -6
    grep -A20 "^SUMMARY" "$OUT/selftest_p$p.log" | grep -E "SUMMARY|top-p|min-p" | head -9
  fi
  stamp "decode P=$p"
  LMFORGE_KERNELS_LIB=/tmp/pivots/p$p/liblmforge_kernels.so timeout 400 python3 bench/gpu_kernels.py --modes fused \
    --repeats "${REPEATS:-2}" --out "$OUT/p$p" 2>&1 | tail -8
done
stamp done
