#!/usr/bin/env bash
# One device call of issue #11's and #12's GPU evidence, after stage-wheels.sh (see bench/README.md):
#   bash bench/gpu_serving_run.sh tests|smollm2|genai|genai1b|verify|http|http2|http3|burst|quick|ab|ahead|attention|buckets|llama1b|topk|b1|b1old|pyspy|seg|oldnew|probe|gaps|kvsize|tail|parted1b|graphab|graphvar|b1fresh|backendprobe
# Each stage writes its log and JSON under $OUT and is bounded by `timeout`. `http` needs the
# server's wheels (.whl/, installed into /tmp/site) and the smollm2 stage's artifact.
set -u
export PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LMF=(python3 -c "import onnxruntime as o, sys; o.preload_dlls(); from lmforge.cli import main; sys.exit(main(sys.argv[1:]))")
PY=(python3 -c "import onnxruntime as o, runpy, sys; o.preload_dlls(); sys.argv=sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
for stage in "$@"; do
  case $stage in
    tests) timeout 200 python3 -c "import onnxruntime as o, sys; o.preload_dlls(); import pytest; sys.exit(pytest.main(['-q', '-m', 'gpu', 'tests/runtime/test_gpu.py', '-p', 'no:cacheprovider', '-o', 'faulthandler_timeout=150']))" 2>&1 | grep -v W:onnxruntime | tee $OUT/gpu_tests.log | tail -5 ;;
    smollm2) timeout 560 "${PY[@]}" bench/gpu_serving.py --shapes smollm2-135m --out $OUT --repeats 2 2>&1 | grep -v W:onnxruntime | tee $OUT/serving_smollm2.log | tail -20 ;;
    quick) timeout 300 "${PY[@]}" bench/gpu_serving.py --shapes smollm2-135m --out $OUT --repeats 3 --quick 2>&1 | grep -v W:onnxruntime | tee $OUT/quick_smollm2.log | tail -12
           timeout 200 "${PY[@]}" bench/gpu_profile.py --artifacts /tmp/lmf-serve/smollm2-135m/serve-cuda --kinds greedy,temperature --out $OUT 2>&1 | grep -v W:onnxruntime | tee $OUT/profile.log | grep -E "wall|µs" | head -40 ;;
    ab) # the sampling table and profile of this tree's step model against a baseline tree's (.baseline/,
        # carried: `git archive BASE runtime passes exporters lmforge parity | tar -x -C .baseline`), one machine
        timeout 200 python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import gpu_serving as g; print(g.build('smollm2-135m', Path('/tmp/lmf-serve'), 'cuda'))" 2>&1 | tail -1
        [ -d .baseline ] && (cd .baseline && timeout 200 env PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD python3 -c "from passes.pipeline import optimize_artifact as o; o('/tmp/lmf-serve/smollm2-135m/fp32', '/tmp/lmf-base/smollm2', device='cuda', precision='fp16', kv_mode='shared-buffer', force=True, progress=False)" 2>&1 | tail -2)
        for side in new base; do
          art=/tmp/lmf-serve/smollm2-135m/serve-cuda; [ $side = base ] && art=/tmp/lmf-base/smollm2
          [ -d $art ] || continue
          timeout 240 "${PY[@]}" bench/gpu_serving.py --shapes smollm2-135m --artifact $art --tag $side --out $OUT --repeats 3 --quick 2>&1 | grep -v W:onnxruntime | tee $OUT/quick_$side.log | tail -12
          mkdir -p $OUT/profile_$side; timeout 150 "${PY[@]}" bench/gpu_profile.py --artifacts $art --kinds greedy,temperature,top-p --out $OUT/profile_$side 2>&1 | grep -v W:onnxruntime > $OUT/profile_$side.log; grep wall $OUT/profile_$side.log
        done ;;
    ahead) # the engine's step launched ahead against none, one machine (after the smollm2 artifact is built)
        timeout 200 python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import gpu_serving as g; print(g.build('smollm2-135m', Path('/tmp/lmf-serve'), 'cuda'))" 2>&1 | tail -1
        for side in ahead none; do
          flag=""; [ $side = none ] && flag=--no-launch-ahead
          timeout 200 "${PY[@]}" bench/gpu_serving.py --shapes smollm2-135m --tag $side $flag --out $OUT --repeats ${REPEATS:-2} --quick 2>&1 | grep -v W:onnxruntime | tee $OUT/quick_$side.log | tail -9
        done ;;
    topk) timeout 300 "${PY[@]}" bench/gpu_topk.py --out $OUT 2>&1 | grep -v W:onnxruntime | tee $OUT/topk.log | tail -3 ;;
    b1) # batch-1 greedy: this tree's engine with its switches, and where its loop thread's time goes
        timeout 400 python3 bench/gpu_b1.py --src . --tag new --variants --breakdown --out $OUT 2>&1 | grep -v W:onnxruntime | tee $OUT/b1_new.log | tail -40 ;;
    b1old) # the same on an older tree (.oldrt/, carried: `git archive 82d064a^ runtime passes exporters lmforge parity`)
        timeout 400 python3 bench/gpu_b1.py --src .oldrt --tag old --out $OUT 2>&1 | grep -v W:onnxruntime | tee $OUT/b1_old.log | tail -8 ;;
    pyspy) # a host profile of batch-1 decode (py-spy from .whl/, in /tmp/site/bin); raw folded stacks
        timeout 120 /tmp/site/bin/py-spy record --native --idle --threads -r 2000 -f raw -o $OUT/pyspy_b1.txt -- python3 bench/gpu_b1.py --src . --tag new --spin 15 2>&1 | tail -3 ;;
    seg) # the top-k / top-p candidates selected in parts of the row (SEGMENTS_MAX 16) against one selection,
         # after the b1 stage: the captured step alone, the engine's sampled decode, and the same seeded draws
        timeout 200 python3 -c "from runtime import sampler_graph as s; s.SEGMENTS_MAX = 16; from passes.pipeline import optimize_artifact as o; o('/tmp/b1-new/fp32', '/tmp/b1-seg/fp16', device='cuda', precision='fp16', kv_mode='shared-buffer', force=True, progress=False)" 2>&1 | tail -2
        for side in new seg; do
          timeout 100 "${PY[@]}" bench/gpu_replay.py /tmp/b1-$side/fp16 --steps 240 --out $OUT/replay_$side 2>&1 | grep -v W:onnxruntime | grep -E "top|greedy|temperature" | cut -c1-120
        done
        timeout 150 python3 bench/gpu_b1.py --artifact /tmp/b1-seg/fp16 --tag seg --sampled --compare /tmp/b1-new/fp16 --new-tokens 128 --reps 3 --out $OUT 2>&1 | grep -v W:onnxruntime | tee $OUT/b1_seg.log | tail -9
        timeout 120 python3 bench/gpu_b1.py --artifact /tmp/b1-new/fp16 --tag new2 --sampled --new-tokens 128 --reps 3 --out $OUT 2>&1 | grep -v W:onnxruntime | tee $OUT/b1_new2.log | tail -8 ;;
    oldnew) # the pre-engine runtime (.oldrt/, carried) against this tree at batch 1: rates, CUPTI kernels per step,
            # the sampling nodes alone per candidates' selection, and whether two engines draw the same ids
        timeout 200 python3 bench/gpu_b1.py --src . --tag new --batches 1,16 --new-tokens 128 --reps 3 --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|Error" | tail -3
        timeout 200 python3 bench/gpu_b1.py --src .oldrt --tag old --batches 1,16 --new-tokens 128 --reps 3 --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|Error" | tail -3
        for side in old new; do
          src=.; [ $side = old ] && src=.oldrt
          mkdir -p $OUT/prof_$side; LMFORGE_SRC=$src timeout 100 python3 bench/gpu_profile.py --artifacts /tmp/b1-$side/fp16 --steps 128 --out $OUT/prof_$side 2>&1 | grep -v W:onnxruntime > $OUT/prof_$side.log; grep -A8 wall $OUT/prof_$side.log
        done
        timeout 150 python3 bench/gpu_sampler.py --out $OUT 2>&1 | grep -v W:onnxruntime | cut -c1-250 | tail -24
        timeout 100 python3 bench/gpu_b1.py --artifact /tmp/b1-new/fp16 --tag det --compare /tmp/b1-new/fp16 --batches 1 --new-tokens 16 --reps 1 --out $OUT 2>&1 | grep -v W:onnxruntime | tail -1 ;;
    probe) # this tree at batch 1 and 16: greedy and sampled rates, the backend alone over a prefilled row,
           # seeded draws of one engine twice, the same with deterministic kernels, and the step alone per plan
        timeout 250 python3 bench/gpu_b1.py --src . --tag new --batches 1,16 --new-tokens 128 --reps 3 --sampled --probe --compare /tmp/b1-new/fp16 --out $OUT 2>&1 | grep -v W:onnxruntime | tee $OUT/b1_probe.log | grep -E "tok/s|probe|same|Error" | cut -c1-400
        timeout 120 python3 bench/gpu_b1.py --artifact /tmp/b1-new/fp16 --tag det --deterministic --batches 1 --new-tokens 128 --reps 3 --compare /tmp/b1-new/fp16 --out $OUT 2>&1 | grep -v W:onnxruntime | tee $OUT/b1_det.log | grep -E "tok/s|same|Error" | cut -c1-400
        timeout 100 "${PY[@]}" bench/gpu_replay.py /tmp/b1-new/fp16 --steps 240 --out $OUT/replay 2>&1 | grep -v W:onnxruntime | grep -E "plan" | cut -c1-130 ;;
    gaps) # where the GPU idles inside a batch-1 greedy step: CUPTI gaps by the activities around them, this tree
          # against the pre-engine runtime (.oldrt/, carried); and whether two identical greedy runs give the same logits
        timeout 200 python3 bench/gpu_b1.py --src . --tag new --batches 1 --new-tokens 128 --reps 2 --logits-repeat --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|logits|Error" | cut -c1-300
        timeout 200 python3 bench/gpu_b1.py --src .oldrt --tag old --batches 1 --new-tokens 128 --reps 2 --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|Error" | cut -c1-300
        for side in old new; do
          src=.; [ $side = old ] && src=.oldrt
          mkdir -p $OUT/gaps_$side; LMFORGE_SRC=$src timeout 100 python3 bench/gpu_profile.py --artifacts /tmp/b1-$side/fp16 --steps 128 --out $OUT/gaps_$side 2>&1 | grep -v W:onnxruntime > $OUT/gaps_$side.log; grep -A12 "idle between" $OUT/gaps_$side.log | cut -c1-160
        done ;;
    kvsize) # batch-1 greedy against the KV pool's size (rows × positions): the rate and the backend alone
        for size in "16 8192" "1 8192" "16 1024" "1 1024"; do
          set -- $size
          timeout 200 python3 bench/gpu_b1.py --src . --tag kv$1x$2 --work /tmp/b1-new --max-batch $1 --max-context $2 --batches 1 --new-tokens 128 --reps 3 --probe --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|probe|Error" | cut -c1-200
        done ;;
    tail) # the same decoder with a bare ArgMax for its step tail (bench/gpu_greedy_tail.py) against the real step:
          # batch-1 greedy, the backend alone, and CUPTI gaps
        timeout 200 python3 bench/gpu_b1.py --src . --tag new --batches 1 --new-tokens 128 --reps 3 --probe --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|probe|Error" | cut -c1-200
        timeout 200 python3 bench/gpu_greedy_tail.py /tmp/b1-new/fp32 /tmp/b1-tail/fp16 2>&1 | tail -1
        timeout 150 python3 bench/gpu_b1.py --artifact /tmp/b1-tail/fp16 --tag tail --batches 1 --new-tokens 128 --reps 3 --probe --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|probe|Error" | cut -c1-200
        for side in tail new; do
          mkdir -p $OUT/gaps_$side; timeout 100 python3 bench/gpu_profile.py --artifacts /tmp/b1-$side/fp16 --steps 128 --out $OUT/gaps_$side 2>&1 | grep -v W:onnxruntime > $OUT/gaps_$side.log; grep -B1 -A6 "idle between" $OUT/gaps_$side.log | cut -c1-160
        done ;;
    parted1b) # the Llama-3.2-1B shape (128,256 logits): greedy and sampled decode, and the captured step alone with
              # top-p's 1,024 candidates selected in parts against one TopK
        timeout 330 python3 bench/gpu_b1.py --src . --tag 1b --shape llama-3.2-1b --work /tmp/b1-1b --batches 1,16 --new-tokens 128 --reps 2 --sampled --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|Error" | cut -c1-200
        timeout 150 "${PY[@]}" bench/gpu_replay.py /tmp/b1-1b/fp16 --steps 160 --out $OUT/replay_1b 2>&1 | grep -v W:onnxruntime | grep -E "plan" | cut -c1-130 ;;
    graphab) # this tree's step, the pre-engine runtime's composed step and the decoder alone (.diag/*.onnx, carried,
             # made on the CPU machine from the two trees' artifacts) in plain onnxruntime, over one weights file
        timeout 200 python3 bench/gpu_b1.py --src . --tag new --batches 1 --new-tokens 128 --reps 1 --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|Error" | cut -c1-200
        cp .diag/*.onnx /tmp/b1-new/fp16/
        timeout 200 python3 bench/gpu_graph_ab.py /tmp/b1-new/fp16/model.onnx /tmp/b1-new/fp16/new_step.onnx /tmp/b1-new/fp16/old_step.onnx /tmp/b1-new/fp16/decoder.onnx --out $OUT 2>&1 | grep -v W:onnxruntime | cut -c1-200 ;;
    graphvar) # what makes a captured step slower in plain onnxruntime: what ran in the process before it
        timeout 200 python3 bench/gpu_b1.py --src . --tag new --batches 1 --new-tokens 16 --reps 1 --out $OUT 2>&1 | grep -v W:onnxruntime | grep -E "Error" | cut -c1-200
        for v in ${VARIANTS:-fresh thread thread-replay shapes-first prefill-first bytes twice-alive rows16 pingpong engine-like fresh}; do
          timeout 60 python3 bench/gpu_graph_ab.py /tmp/b1-new/fp16/model.onnx --variant $v --replays 400 --out $OUT 2>&1 | grep -v W:onnxruntime | cut -c1-220
        done
        for env in CUDA_MODULE_LOADING=EAGER; do  # a process-wide CUDA setting against the second-session slowdown
          env $env timeout 60 python3 bench/gpu_graph_ab.py /tmp/b1-new/fp16/model.onnx --variant twice-alive --replays 400 --out $OUT 2>&1 | grep -v W:onnxruntime | sed "s/^/$env /" | cut -c1-240
        done ;;
    b1fresh) # batch-1 greedy of each tree in a process that only loads and decodes (artifacts built in another
             # process first), against the same in the process that built them; then small KV pools
        B="python3 bench/gpu_b1.py --batches 1 --new-tokens 128 --reps 3 --out $OUT"
        for tree in ${TREES:-new old}; do
          src=.; [ $tree = old ] && src=.oldrt
          timeout 250 $B --src $src --tag $tree 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|Error" | sed 's/^/built here: /'
          timeout 100 $B --src $src --tag $tree --artifact /tmp/b1-$tree/fp16 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|Error" | sed 's/^/fresh: /'
        done
        timeout 100 $B --src . --tag new --artifact /tmp/b1-new/fp16 --max-batch 1 --max-context 1024 2>&1 | grep -v W:onnxruntime | grep -E "tok/s|Error" | sed 's/^/fresh, 1 row x 1024: /' ;;
    backendprobe) # the slots backend's step without the engine, piece by piece (after graphvar or b1fresh built /tmp/b1-new)
        [ -f /tmp/b1-new/fp16/manifest.json ] || timeout 200 python3 bench/gpu_b1.py --src . --tag new --batches 1 --new-tokens 16 --reps 1 --out $OUT 2>&1 | grep -E "Error"
        for m in ${MODES:-backend bare nowriter noprefill backend}; do
          timeout 60 python3 bench/gpu_backend_probe.py /tmp/b1-new/fp16 --mode $m --out $OUT 2>&1 | grep -v W:onnxruntime | cut -c1-220
        done
        timeout 60 python3 bench/gpu_graph_ab.py /tmp/b1-new/fp16/model.onnx --variant fresh --replays 400 --out $OUT 2>&1 | grep -v W:onnxruntime | cut -c1-220 ;;
    attention) timeout 300 "${PY[@]}" bench/gpu_attention.py --artifacts /tmp/lmf-serve/smollm2-135m/serve-cuda --settings ",sdpa_kernel=1,sdpa_kernel=2,sdpa_kernel=16" --batches 1,16 --new-tokens 128 --out $OUT 2>&1 | grep -v W:onnxruntime | tee $OUT/attention.log | tail -4 ;;
    http2) for shape in ${SHAPES:-smollm2-135m llama-3.2-1b}; do
             timeout 280 python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import gpu_serving as g; print(g.build('$shape', Path('/tmp/lmf-serve'), 'cuda'))" 2>&1 | tail -1
             timeout 250 "${LMF[@]}" bench-serve /tmp/lmf-serve/$shape/serve-cuda --device cuda --max-batch 64 --max-queue 1024 --concurrency 16,64,16,64 --requests 256 --warmup 128 --compare-engine --json $OUT/http_$shape.json 2>&1 | grep -v W:onnxruntime | grep -E "concurrency|serve-cuda|error" | tail -8
           done ;;
    http3) timeout 200 python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import gpu_serving as g; print(g.build('smollm2-135m', Path('/tmp/lmf-serve'), 'cuda'))" 2>&1 | tail -1
           timeout 250 "${LMF[@]}" bench-serve /tmp/lmf-serve/smollm2-135m/serve-cuda --device cuda --max-batch 64 --max-queue 1024 --concurrency 16,64 --requests 256 --warmup 8 --compare-engine --json $OUT/http3_smollm2.json 2>&1 | grep -v W:onnxruntime | grep -E "concurrency|serve-cuda|error|captured" | tail -8 ;;
    buckets) timeout 300 "${PY[@]}" bench/gpu_serving.py --shapes llama-3.2-1b --out $OUT --repeats 2 --new-tokens 64 --buckets fp16,int4 2>&1 | grep -v W:onnxruntime | tee $OUT/buckets_1b.log | tail -4
             ORT_FPA_INTB_GEMM=1 timeout 200 "${PY[@]}" bench/gpu_serving.py --shapes llama-3.2-1b --out $OUT --repeats 2 --new-tokens 64 --buckets int4 2>&1 | grep -v W:onnxruntime | tee -a $OUT/buckets_1b.log | tail -2 ;;
    burst) for shape in ${SHAPES:-smollm2-135m llama-3.2-1b}; do
             timeout 280 "${PY[@]}" bench/gpu_serving.py --shapes $shape --out $OUT --repeats 2 --burst ${BURST:-} 2>&1 | grep -v W:onnxruntime | tee $OUT/burst_$shape.log | tail -9
           done ;;
    genai1b) for mode in "" "--sampled"; do
             timeout 250 "${PY[@]}" bench/genai_engine.py --build-from /tmp/lmf-serve/llama-3.2-1b/fp32 --work /tmp/genai-work --precision fp16 --device cuda --paged --concurrency 16,64 --prompt-len 128 --new-tokens 128 --repeats 3 $mode --json $OUT/genai_1b${mode/--/_}.json 2>&1 | grep -v W:onnxruntime | tail -6
           done ;;
    llama1b) timeout 500 "${PY[@]}" bench/gpu_serving.py --shapes llama-3.2-1b --out $OUT --repeats 2 --memory-requests 0 2>&1 | grep -v W:onnxruntime | tee $OUT/serving_1b.log | tail -20 ;;
    genai) for mode in "" "--sampled"; do
             timeout 200 "${PY[@]}" bench/genai_engine.py --build-from /tmp/lmf-serve/smollm2-135m/fp32 --work /tmp/genai-work --precision fp16 --device cuda --concurrency 16,64 --prompt-len 128 --new-tokens 128 $mode --json $OUT/genai_smollm2${mode/--/_}.json 2>&1 | grep -v W:onnxruntime | tail -8
           done ;;
    verify) cat .gguf-parts/g3 >/dev/null 2>&1 && cp .gguf-parts/g3 /tmp/gg/ ; cat /tmp/gg/g0 /tmp/gg/g1 /tmp/gg/g2 /tmp/gg/g3 > /tmp/gg/smol.gguf
            echo "$(cat /tmp/gg/sha)  /tmp/gg/smol.gguf" | sha256sum -c - || exit 1
            timeout 400 sh -c "python3 -m lmforge -q convert /tmp/gg/smol.gguf -o /tmp/v/fp32 --force && python3 -m lmforge -q optimize /tmp/v/fp32 -o /tmp/v/fp16 --device cuda --precision fp16 --force && python3 -c \"import onnxruntime as o, sys; o.preload_dlls(); from lmforge.cli import main; sys.exit(main(['verify', '/tmp/v/fp16', '--device', 'cuda', '--json', '$OUT/verify_smollm2_fp16_cuda.json']))\"" 2>&1 | grep -v W:onnxruntime | tee $OUT/verify.log | tail -25 ;;
    http) ART=/tmp/lmf-serve/smollm2-135m/serve-cuda
          serve() { "${LMF[@]}" serve $ART --device cuda --port 8765 "$@" > $OUT/serve.log 2>&1 & S=$!
                    for i in $(seq 120); do python3 -c "import httpx; httpx.get('http://127.0.0.1:8765/ready').raise_for_status()" 2>/dev/null && break; sleep 0.5; done; }
          serve --max-batch 64 --max-queue 1024
          timeout 240 "${LMF[@]}" bench-serve http://127.0.0.1:8765 --concurrency 16,64 --requests 256 --warmup 8 --json $OUT/http_gpu.json 2>&1 | grep -v W:onnxruntime | tail -6
          kill -TERM $S; wait $S
          serve --max-batch 16 --max-queue 16
          timeout 120 "${LMF[@]}" bench-serve http://127.0.0.1:8765 --rates inf --requests 256 --new-tokens 64 --warmup 4 --json $OUT/http_gpu_saturated.json 2>&1 | grep -v W:onnxruntime | tail -4
          kill -TERM $S; wait $S
          timeout 240 "${LMF[@]}" bench-serve $ART --device cuda --max-batch 64 --max-queue 1024 --concurrency 16,64 --requests 256 --warmup 8 --compare-engine --json $OUT/http_inproc_gpu.json 2>&1 | grep -v W:onnxruntime | tail -8 ;;
  esac
done
