#!/usr/bin/env bash
# lmforge's kernels on the lent GPU in one call, after staging onnxruntime-gpu (parts p0..p3 in
# calls of their own, back to back; this one runs the last part first):
#
#   bash .gpu-wheels/p4/stage.sh >/dev/null && bash bench/gpu_kernels.sh
#   (carry: .gpu-wheels/p4, .kernels-carry, .whl; timeout 600)
#
# 1. `lmforge kernels build` with the machine's nvcc (a library built elsewhere for sm_90, carried
#    in .kernels-carry/, is the fallback when that build fails);
# 2. `lmforge kernels selftest`: the kernel alone, without onnxruntime (checks, then µs a launch);
# 3. a probe of the op inside onnxruntime with a watchdog; when it does not finish, again with
#    CUDA_MODULE_LOADING=EAGER, then with the CUDA runtime linked dynamically
#    (LMFORGE_KERNELS_CUDART=shared); the variant that passes serves the rest;
# 4. the kernel tests (test_kernels.py, the sampler tests against the fused op, the op in a
#    captured CUDA graph, the engine); 5. bench/gpu_kernels.py (decode tok/s, fused vs ONNX).
# Each stage has its own time limit and the next runs whatever the last did.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/lmf-site /tmp/site
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LMFORGE_CACHE=/tmp/lmf-cache
export LMFORGE_KERNELS=1
# optimum (random: weights need its task table), from the carried wheels of .whl/
ls .whl/optimum-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/optimum-*.whl
# every Python process finds the CUDA libraries of the image's nvidia-* wheels (onnxruntime >= 1.21)
printf 'try:\n    import onnxruntime\n    onnxruntime.preload_dlls()\nexcept Exception:\n    pass\n' > /tmp/lmf-site/sitecustomize.py
export PYTHONPATH="/tmp/lmf-site:/tmp/gpu-site:/tmp/site:$PWD"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
command -v nvcc && nvcc --version | tail -1
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

stamp "kernels build"
if ! timeout 240 python3 -m lmforge kernels build 2>&1 | tee "$OUT/build.log"; then
  echo "build failed; using the carried library" | tee -a "$OUT/build.log"
  export LMFORGE_KERNELS_LIB="$PWD/.kernels-carry/liblmforge_kernels.so"
fi

stamp "selftest (the kernel without onnxruntime)"
timeout "${SELFTEST_S:-90}" python3 -m lmforge kernels selftest --timeout "${SELFTEST_HANG_S:-45}" 2>&1 \
  | tee "$OUT/selftest.log" | grep -v "^  launch" | tail -25
tail -2 "$OUT/selftest.log" | grep -q "TIMEOUT" && tail -4 "$OUT/selftest.log"

export LMFORGE_KERNELS_TRACE=1  # the op says on stderr how far each call got (probes only)
stamp "probe (the op inside onnxruntime)"
PROBE_WATCHDOG_S=${PROBE_S:-30} timeout $(( ${PROBE_S:-30} + 15 )) python3 bench/gpu_kernels.py --probe 2>&1 \
  | tee "$OUT/probe.log" | tail -14
if ! grep -q "PROBE OK" "$OUT/probe.log"; then
  stamp "probe again, CUDA modules loaded eagerly"
  CUDA_MODULE_LOADING=EAGER PROBE_WATCHDOG_S=${PROBE_S:-30} timeout $(( ${PROBE_S:-30} + 15 )) \
    python3 bench/gpu_kernels.py --probe 2>&1 | tee /tmp/probe-eager.log | tail -14
  { echo "== CUDA_MODULE_LOADING=EAGER"; cat /tmp/probe-eager.log; } >> "$OUT/probe.log"
  grep -q "PROBE OK" /tmp/probe-eager.log && export CUDA_MODULE_LOADING=EAGER
fi
if ! grep -q "PROBE OK" "$OUT/probe.log"; then
  stamp "probe again, CUDA runtime linked dynamically"
  LMFORGE_KERNELS_CUDART=shared timeout 120 python3 -m lmforge kernels build 2>&1 | tee -a "$OUT/build.log"
  export LMFORGE_KERNELS_CUDART=shared
  PROBE_WATCHDOG_S=${PROBE_S:-30} timeout $(( ${PROBE_S:-30} + 15 )) python3 bench/gpu_kernels.py --probe 2>&1 \
    | tee /tmp/probe-shared.log | tail -14
  { echo "== LMFORGE_KERNELS_CUDART=shared"; cat /tmp/probe-shared.log; } >> "$OUT/probe.log"
  grep -q "PROBE OK" /tmp/probe-shared.log || stamp "the op does not finish inside onnxruntime either way"
fi

unset LMFORGE_KERNELS_TRACE
stamp "GPU tests"
timeout "${TESTS_S:-200}" python3 -m pytest -v -p no:cacheprovider -rs --maxfail=3 --timeout=60 --durations=15 \
  tests/runtime/test_kernels.py 2>&1 | tee "$OUT/tests.log" | grep -v "^SKIPPED\|PASSED" | tail -40

stamp "bench"
timeout "${BENCH_S:-240}" python3 bench/gpu_kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -30
stamp "done"
