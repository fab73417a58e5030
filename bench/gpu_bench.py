"""GPU: ``lmforge bench`` against its peers on random-weight real shapes, end to end on the lent GPU.

Run from the repo root on the GPU machine (no network there; onnxruntime-gpu and
onnxruntime-genai-cuda staged in /tmp/gpu-site, lmforge's pure-Python wheels in /tmp/site)::

    export PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD HF_HUB_OFFLINE=1
    python3 bench/gpu_bench.py --shapes smollm2-135m --out $OUT
    python3 bench/gpu_bench.py --shapes llama-3.2-1b --out $OUT

Per shape, each stage failing soft (its error is recorded, the script moves on):

1. **convert** ``random:<shape>`` (``exporters.convert``; random weights of the real config, fixed
   seed, so every runtime runs the same weights) into ``WORK/<shape>/fp32``, reused when present;
2. **optimize** it for CUDA at each of ``--precisions`` (``passes.pipeline.optimize_artifact``:
   fused, shared-buffer KV) into ``WORK/<shape>/<precision>``, reused when present;
3. **bench** every artifact that exists plus ``--peers`` with :func:`lmforge.benchmark.harness.run_bench`
   (the code behind ``lmforge bench``) at ``--batches`` (1,16), prompt 128, 256 new tokens, one
   warm-up then the median of ``--repeats`` alternating rounds. lmforge runs with CUDA graphs on
   shared-buffer artifacts; genai builds its own fp16 model from the same weights (``WORK/bench``).

Writes ``OUT/gpu_bench-<shape>.json`` (the full bench report + stage log), ``.png`` (tokens/s per
runtime and batch) and ``.txt`` (the table), and prints the tables last. ``--device cpu
--shapes tiny:llama --precisions int8 --batches 1,2 --prompt-len 8 --new-tokens 8 --peers hf,genai
--genai-precision int8`` is a dry run on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRECISIONS = ("fp16", "int8", "int4")


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}"


def _source(shape: str) -> str:
    return shape if ":" in shape else f"random:{shape}"


def _slug(shape: str) -> str:
    return shape.replace(":", "-").replace("/", "-")


def convert_stage(shape: str, work: Path, max_context: int) -> Path:
    from exporters.convert import convert

    out = work / _slug(shape) / "fp32"
    if (out / "manifest.json").is_file():
        return out
    return Path(convert(_source(shape), out, force=True, max_context=max_context, progress=False))


def optimize_stage(fp32: Path, precision: str, device: str) -> tuple[Path, dict[str, Any]]:
    """``precision`` is fp16/int8/int4, or int8+head/int4+head: the lm head quantized too."""
    from passes.pipeline import optimize_artifact

    base, _, extra = precision.partition("+")
    out = fp32.parent / precision.replace("+", "-")
    if (out / "manifest.json").is_file():
        return out, {"reused": True}
    report = optimize_artifact(fp32, out, device=device, precision=base, force=True, progress=False,
                               quantize_lm_head=extra == "head")
    return out, {"ops": report.ops}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b",
                        help="exporters.shapes names (random weights), or any source with a ':' (tiny:llama)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="optimized artifacts to make and bench (int8+head / int4+head: lm head quantized too)")
    parser.add_argument("--with-fp32", action="store_true", help="also bench the unfused fp32 concat artifact")
    parser.add_argument("--peers", default="hf,hf-compile,genai,genai-graph",
                        help="peers for the bench (add optimum with --peers-site), or none")
    parser.add_argument("--genai-precision", default="fp16", help="onnxruntime-genai builds, comma-separated")
    parser.add_argument("--peers-site", default=os.environ.get("LMFORGE_PEERS_SITE"),
                        help="site with optimum-onnx + transformers<4.58 (for the optimum peer)")
    parser.add_argument("--stages", default="convert,optimize,bench")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N layers of each shape (named <shape>-<N>l): per-layer speed "
                             "of a model too large to convert within one device call")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmf-bench"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "transformers", "onnxscript", "onnx_ir", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - the providers list says the rest
            print("preload_dlls:", _err(exc), flush=True)
    print("onnxruntime", ort.__version__, ort.get_available_providers(), flush=True)

    from lmforge.benchmark.harness import BenchConfig, render_table, run_bench
    from lmforge.benchmark.plot import plot_report
    from lmforge.cmd_bench import parse_batches, parse_peers

    stages = set(args.stages.split(","))
    peers, explicit = parse_peers(args.peers, args.device)
    t_start = time.perf_counter()
    tables: list[str] = []

    def stamp() -> str:
        return f"[{time.perf_counter() - t_start:6.0f}s]"

    shapes = [s for s in args.shapes.split(",") if s]
    if args.layers:
        from exporters.shapes import SHAPES

        for i, shape in enumerate(shapes):
            spec, overrides = SHAPES[shape]
            shapes[i] = f"{shape}-{args.layers}l"
            SHAPES[shapes[i]] = (spec, {**overrides, "num_hidden_layers": args.layers})
    for shape in shapes:
        log: dict[str, Any] = {"shape": shape, "source": _source(shape), "stages": {}}
        json_path = args.out / f"gpu_bench-{_slug(shape)}.json"

        def save(
            report: dict[str, Any] | None = None, *, json_path: Path = json_path, log: dict[str, Any] = log
        ) -> None:
            json_path.write_text(json.dumps({**log, "bench": report}, indent=2, default=str))

        fp32 = args.work / _slug(shape) / "fp32"
        if "convert" in stages:
            t0 = time.perf_counter()
            try:
                fp32 = convert_stage(shape, args.work, args.max_context)
                log["stages"]["convert"] = {"path": str(fp32), "seconds": round(time.perf_counter() - t0, 1)}
                print(f"{stamp()} {shape}: fp32 artifact {fp32}", flush=True)
            except Exception as exc:  # noqa: BLE001 - fail soft, per stage
                log["stages"]["convert"] = {"error": _err(exc), "traceback": traceback.format_exc()[-3000:]}
                print(f"{stamp()} {shape}: convert failed: {_err(exc)}", flush=True)
        save()
        artifacts: list[Path] = [fp32] if args.with_fp32 and (fp32 / "manifest.json").is_file() else []
        for precision in [p for p in args.precisions.split(",") if p]:
            key = f"optimize-{precision}"
            t0 = time.perf_counter()
            try:
                if "optimize" in stages:
                    path, info = optimize_stage(fp32, precision, args.device)
                else:
                    path, info = fp32.parent / precision.replace("+", "-"), {"skipped": True}
                if (path / "manifest.json").is_file():
                    artifacts.append(path)
                log["stages"][key] = {"path": str(path), "seconds": round(time.perf_counter() - t0, 1), **info}
                print(f"{stamp()} {shape}: {precision} artifact {path}", flush=True)
            except Exception as exc:  # noqa: BLE001
                log["stages"][key] = {"error": _err(exc), "traceback": traceback.format_exc()[-3000:]}
                print(f"{stamp()} {shape}: optimize {precision} failed: {_err(exc)}", flush=True)
            save()
        if "bench" not in stages:
            continue
        if not artifacts:
            log["stages"]["bench"] = {"error": "no artifact to bench (convert/optimize failed)"}
            save()
            print(f"{stamp()} {shape}: nothing to bench", flush=True)
            continue
        try:
            config = BenchConfig(
                artifacts=tuple(artifacts), device=args.device, batches=parse_batches(args.batches),
                prompt_len=args.prompt_len, new_tokens=args.new_tokens, peers=peers, peers_explicit=explicit,
                repeats=args.repeats, work=args.work / "bench",
                genai_precisions=tuple(p for p in args.genai_precision.split(",") if p),
                peers_site=args.peers_site, command=tuple(sys.argv),
            )
            t0 = time.perf_counter()
            report = run_bench(config)
            log["stages"]["bench"] = {"seconds": round(time.perf_counter() - t0, 1)}
            save(report)
            table = f"== {shape} ==\n" + render_table(report)
            (args.out / f"gpu_bench-{_slug(shape)}.txt").write_text(table + "\n")
            tables.append(table)
            print(f"{stamp()} {shape}: bench done\n{table}", flush=True)
            try:
                plot_report(report, args.out / f"gpu_bench-{_slug(shape)}.png")
            except Exception as exc:  # noqa: BLE001 - a plot is not worth failing the run
                print(f"{shape}: plot failed: {_err(exc)}", flush=True)
        except Exception as exc:  # noqa: BLE001
            log["stages"]["bench"] = {"error": _err(exc), "traceback": traceback.format_exc()[-3000:]}
            save()
            print(f"{stamp()} {shape}: bench failed: {_err(exc)}", flush=True)

    print("\n\n".join(tables) if tables else "no bench tables", flush=True)
    print(f"{stamp()} done; results in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
