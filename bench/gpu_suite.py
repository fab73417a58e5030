"""GPU parity and decode speed of ``runtime.Engine`` on the CUDA execution provider.

Run on the lent GPU machine (see ``bench/README.md``), from the repo root with onnxruntime-gpu
on ``PYTHONPATH``::

    python3 bench/gpu_suite.py convert --gguf PATH --work /tmp/lmf      # artifacts (CPU work)
    python3 bench/gpu_suite.py run --gguf PATH --work /tmp/lmf --out $OUT

``run`` checks greedy parity of the CUDA engine against transformers (PyTorch fp32, CPU) on
SmolLM2-135M real weights at batch 1 and as one left-padded batch, then times decode at batch 1
and 8 (128-token prompt, 256 new tokens, greedy, EOS masked so every run is full length; one
warm-up, median of three) for SmolLM2-135M and a random-weight Llama-3.2-1B shape, and splits
decode time into time inside ``InferenceSession.run_with_iobinding`` (decoder, sampler, compaction)
and time outside it (Python bookkeeping, host reads).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("gpu_suite")
DEVICE = "cuda"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Une recette simple pour faire du pain :",
    "List three prime numbers greater than 100:",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 17 * 23?\nA:",
]


def convert_all(gguf: Path, work: Path) -> dict[str, Any]:
    from exporters.convert import convert

    timings = {}
    for name, source, ctx in (("smollm2", str(gguf), 2048), ("llama1b", "random:llama-3.2-1b", 2048)):
        t0 = time.perf_counter()
        convert(source, work / name, force=True, max_context=ctx, progress=False)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"converted {name} in {timings[name]} s", flush=True)
    return timings


def parity(gguf: Path, art: Path) -> dict[str, Any]:
    import torch

    from exporters.sources import load_source
    from runtime import Engine

    loaded = load_source(str(gguf))
    engine = Engine.load(art, device=DEVICE, verify_hashes=False)
    eos = set(engine.eos_token_ids)
    report: dict[str, Any] = {"prompts": []}
    prompt_ids = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    refs = []
    for ids in prompt_ids:
        with torch.no_grad():
            out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=32, do_sample=False, pad_token_id=engine.pad_token_id)
        ref = out[0, len(ids):].tolist()
        refs.append(ref)
    single = [engine.generate_ids([ids], max_new_tokens=32)[0] for ids in prompt_ids]
    batched = engine.generate_ids(prompt_ids, max_new_tokens=32)
    for prompt, ref, one, many in zip(PROMPTS, refs, single, batched):
        # transformers stops at EOS too; compare up to and including it
        report["prompts"].append({
            "prompt": prompt, "ref_len": len(ref), "cuda_equal_ref": one == ref, "batched_equal_single": many == one,
        })
    report["all_equal"] = all(p["cuda_equal_ref"] for p in report["prompts"])
    report["batch_equal"] = all(p["batched_equal_single"] for p in report["prompts"])
    report["eos"] = sorted(eos)
    return report


class RunTimer:
    """Wraps ``InferenceSession.run_with_iobinding`` to sum the time spent inside ORT per session."""

    def __init__(self) -> None:
        import onnxruntime as ort

        self.totals: dict[int, float] = defaultdict(float)
        self.calls: dict[int, int] = defaultdict(int)
        self._orig = ort.InferenceSession.run_with_iobinding
        timer = self

        def wrapped(session: Any, binding: Any, run_options: Any = None) -> Any:
            t0 = time.perf_counter()
            try:
                return timer._orig(session, binding, run_options)
            finally:
                timer.totals[id(session)] += time.perf_counter() - t0
                timer.calls[id(session)] += 1

        ort.InferenceSession.run_with_iobinding = wrapped  # type: ignore[method-assign]

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


def bench_model(
    art: Path, batches: list[int], prompt_len: int, new_tokens: int, timer: RunTimer
) -> list[dict[str, Any]]:
    from runtime import Engine, SamplingParams

    engine = Engine.load(art, device=DEVICE, verify_hashes=False)
    rng = np.random.default_rng(0)
    sessions = {id(engine.backend.session): "decoder"}
    rows = []
    for batch in batches:
        prompts = [rng.integers(3, 250, prompt_len).tolist() for _ in range(batch)]
        params = SamplingParams(min_new_tokens=new_tokens)  # greedy, EOS masked: full-length runs
        engine.generate_results(prompts, max_new_tokens=new_tokens, sampling=params)  # warm-up
        runs = []
        for _ in range(3):
            timer.reset()
            t0 = time.perf_counter()
            results = engine.generate_results(prompts, max_new_tokens=new_tokens, sampling=params)
            wall = time.perf_counter() - t0
            inside = {sessions.get(k, "other"): v for k, v in timer.totals.items()}
            ttft = statistics.median(r.ttft_s for r in results)
            decode_s = wall - ttft
            runs.append({
                "wall_s": wall, "ttft_s": ttft,
                "decode_tok_s_per_row": statistics.median(r.decode_tokens_per_s for r in results),
                "batch_tok_s": batch * (new_tokens - 1) / decode_s,
                "inside_run_s": inside, "outside_run_share": 1 - sum(inside.values()) / wall,
                "new_tokens": [r.new_tokens for r in results][:2],
            })
        best = sorted(runs, key=lambda r: r["wall_s"])[1]  # the median run
        rows.append({"artifact": art.name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, **best})
        print(f"{art.name:>8} batch {batch:>2}: {best['decode_tok_s_per_row']:8.1f} tok/s/row  "
              f"{best['batch_tok_s']:8.1f} tok/s total  ttft {best['ttft_s']*1e3:6.1f} ms  "
              f"outside ORT run {best['outside_run_share']*100:4.1f}%  inside {best['inside_run_s']}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=["convert", "run", "all"])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmf"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda", help="cpu for a dry run")
    parser.add_argument("--models", default="smollm2,llama1b")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    logging.basicConfig(level=logging.WARNING)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)
    results: dict[str, Any] = {"onnxruntime": ort.__version__}
    if args.step in ("convert", "all"):
        results["convert_s"] = convert_all(args.gguf, args.work)
    if args.step in ("run", "all"):
        results["parity"] = parity(args.gguf, args.work / "smollm2")
        print("parity:", json.dumps(results["parity"], indent=1), flush=True)
        timer = RunTimer()
        batches = [int(b) for b in args.batches.split(",")]
        results["bench"] = []
        for name in args.models.split(","):
            results["bench"] += bench_model(args.work / name, batches, 128, args.new_tokens, timer)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"gpu_{args.step}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
