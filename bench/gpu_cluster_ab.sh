#!/usr/bin/env bash
# Build-time variants of the cluster sampling kernel against each other on the lent GPU: each variant
# built with its -D flags, checked and timed by the selftest (cluster against single-block; µs a
# launch), then decode tok/s through onnxruntime (bench/gpu_kernels.py --modes fused,
# LMFORGE_KERNELS_LIB=that build).
#
#   bash .gpu-wheels/p4/stage.sh >/dev/null && bash bench/gpu_cluster_ab.sh      (carry .gpu-wheels/p4, .whl)
#
# VARIANTS names them (default "p1 p3 p7"): pN is LMFORGE_CLUSTER_PIVOTS=N (the threshold search's pivots
# a cluster round), and each suffix after a "-" sets one more of sampling.cu's build switches, its value after the
# last "_" (p3-cluster_threads_256 builds LMFORGE_CLUSTER_THREADS=256, blocks of 256 threads); a name
# repeated is built once and run again (alternated rounds).
# REPEATS (default 2), SELFTEST=0 skips the selftests, DECODE=0 the decode runs. Results: docs/kernels.md.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/lmf-site /tmp/site /tmp/variants
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LMFORGE_CACHE=/tmp/lmf-cache
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/optimum-*.whl .whl/onnx_ir-*.whl .whl/gguf-*.whl 2>/dev/null
printf 'try:\n    import onnxruntime\n    onnxruntime.preload_dlls()\nexcept Exception:\n    pass\n' > /tmp/lmf-site/sitecustomize.py
export PYTHONPATH="/tmp/lmf-site:/tmp/gpu-site:/tmp/site:$PWD"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
round=0
for v in ${VARIANTS:-p1 p3 p7}; do
  round=$((round + 1))
  dir=/tmp/variants/$v
  if [ ! -f "$dir/liblmforge_kernels.so" ]; then
    stamp "build $v"
    python3 - "$v" "$dir" <<'PY' 2>&1 | tail -3
import os, subprocess, sys
from pathlib import Path
from runtime.kernels import build as b
name, out = sys.argv[1], Path(sys.argv[2])
pivots = name.split("-")[0].removeprefix("p")
defines = [f"-DLMFORGE_CLUSTER_PIVOTS={pivots}"] + [
    "-DLMFORGE_{}={}".format(*extra.upper().rsplit("_", 1)) for extra in name.split("-")[1:]]
arch = b.detect_arch(); nvcc = b.find_nvcc()
lib = out / "liblmforge_kernels.so"; out.mkdir(parents=True, exist_ok=True)
done = subprocess.run(b._command(nvcc, arch, lib, flags=(*b._FLAGS, *defines)), capture_output=True, text=True)
print("library", lib, defines, done.returncode, done.stderr[-400:])
if os.environ.get("SELFTEST", "1") != "0":  # (a quoted heredoc: the shell expands nothing here)
    done = subprocess.run(b._command(nvcc, arch, out / "selftest", b.SELFTEST_SOURCES,
                                     (*b.SELFTEST_FLAGS, *defines)), capture_output=True, text=True)
    print("selftest build", done.returncode, done.stderr[-400:])
PY
  fi
  if [ "${SELFTEST:-1}" != "0" ] && [ -x "$dir/selftest" ]; then
    timeout 120 "$dir/selftest" > "$OUT/selftest_${v}_$round.log" 2>&1
    echo "selftest $v exit $?"
    grep -E "^CHECK .*[1-9][0-9]* differ|FAIL|SELFTEST" "$OUT/selftest_${v}_$round.log" | grep -v " 0 differ" | tail -6
    grep -E "^selftest: .* clusters|^PROFILE .*rows 16" "$OUT/selftest_${v}_$round.log"  # PROFILE: a -profile_1 build
    grep -A10 "^SUMMARY us a launch, fp16" "$OUT/selftest_${v}_$round.log"
    grep -A10 "^SUMMARY us a launch, flat" "$OUT/selftest_${v}_$round.log"
  fi
  if [ "${DECODE:-1}" != "0" ]; then
    stamp "decode $v"
    LMFORGE_KERNELS_LIB=$dir/liblmforge_kernels.so timeout 400 python3 bench/gpu_kernels.py --modes fused \
      --repeats "${REPEATS:-2}" --out "$OUT/${v}_$round" 2>&1 | tail -8
  fi
done
stamp done
