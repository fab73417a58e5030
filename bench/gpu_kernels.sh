#!/usr/bin/env bash
# lmforge's kernels on the lent GPU in one call, after staging onnxruntime-gpu (parts p0..p3 in
# calls of their own, back to back; this one runs the last part first):
#
#   bash .gpu-wheels/p4/stage.sh && bash bench/gpu_kernels.sh   (carry: .gpu-wheels/p4, .kernels-carry, .whl)
#
# 1. `lmforge kernels build` with the machine's nvcc (a library built elsewhere for sm_90, carried
#    in .kernels-carry/, is the fallback when that build fails); 2. the kernel tests and the
#    sampler tests on the GPU; 3. bench/gpu_kernels.py (decode tok/s, fused against the ONNX
#    sampler). Each stage has its own time limit and the next runs whatever the last did.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/lmf-site /tmp/site
# optimum (random: weights need its task table), from the carried wheels of .whl/
ls .whl/optimum-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/optimum-*.whl
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LMFORGE_CACHE=/tmp/lmf-cache
# every Python process finds the CUDA libraries of the image's nvidia-* wheels (onnxruntime >= 1.21)
printf 'try:\n    import onnxruntime\n    onnxruntime.preload_dlls()\nexcept Exception:\n    pass\n' > /tmp/lmf-site/sitecustomize.py
export PYTHONPATH="/tmp/lmf-site:/tmp/gpu-site:/tmp/site:$PWD"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
command -v nvcc && nvcc --version | tail -2
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

stamp "kernels build"
if ! timeout 240 python3 -m lmforge kernels build 2>&1 | tee "$OUT/build.log"; then
  echo "build failed; using the carried library" | tee -a "$OUT/build.log"
fi
if ! python3 -c "from runtime.kernels import kernel_library as k; import sys; sys.exit(k() is None)"; then
  export LMFORGE_KERNELS_LIB="$PWD/.kernels-carry/liblmforge_kernels.so"
  echo "LMFORGE_KERNELS_LIB=$LMFORGE_KERNELS_LIB" | tee -a "$OUT/build.log"
fi
python3 -m lmforge kernels status

stamp "probe"
CUDA_LAUNCH_BLOCKING=${PROBE_BLOCKING:-0} timeout 90 python3 bench/gpu_kernels.py --probe 2>&1 | tee "$OUT/probe.log" | tail -20

stamp "GPU tests"
timeout "${TESTS_S:-220}" python3 -m pytest -v -p no:cacheprovider -rs --maxfail=3 --timeout=60 --durations=15 \
  tests/runtime/test_kernels.py 2>&1 | tee "$OUT/tests.log" | grep -v "^SKIPPED\|PASSED" | tail -40

stamp "bench"
timeout "${BENCH_S:-300}" python3 bench/gpu_kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
stamp "done"
