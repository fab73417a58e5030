"""Every decoder family on CUDA in fp16: the artifact ``optimize --device cuda`` builds, greedy ids
against transformers fp32 on the CPU.

Two halves, because the GPU machine's transformers is older than the exporter's and has no hub:

* ``prepare`` (CPU, where lmforge is installed): converts ``tiny:<family>`` for every registered
  decoder into ``DIR/<family>`` and stores transformers' eager fp32 greedy ids and the top-1/top-2
  logit margin at every step for fixed prompts of 8, 24, 40 and 64 tokens (past the tiny sliding
  window of 16) in ``DIR/<family>/gpu_reference.json``;
* ``run`` (the GPU machine, onnxruntime-gpu staged): optimizes each to fp16 for CUDA (shared-buffer
  KV with the step model and CUDA graphs where every attention fuses to GroupQueryAttention, else
  concat), generates the same prompts in one batch through ``runtime.Engine`` on CUDA, and reports
  per family: prompts exact, and for each divergence its step and the reference's margin there (a
  margin below the fp16 policy's near-tie bound is a near-tie, not a drift).

Writes ``OUT/gpu_families.json`` and prints a table::

    PYTHONPATH=. .venv/bin/python bench/gpu_families.py prepare --dir artifacts/families
    export PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD
    python3 bench/gpu_families.py run --dir artifacts/families --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT_LENS = (8, 24, 40, 64)
NEW_TOKENS = 16
NEAR_TIE = 0.1  # fp16: a reference top-1/top-2 margin below this is a near-tie (parity/policy.py: fp16 tie_threshold)


def prepare(folder: Path) -> None:
    import torch

    from exporters.convert import convert
    from exporters.sources import load_source
    from exporters.specs import ModelKind, all_specs

    folder.mkdir(parents=True, exist_ok=True)
    for spec in all_specs():
        if spec.kind is not ModelKind.DECODER:
            continue
        out = folder / spec.name
        if not (out / "manifest.json").is_file():
            convert(f"tiny:{spec.name}", out, force=True, progress=False)
        model = load_source(f"tiny:{spec.name}").model
        prompts, ids, margins = [], [], []
        for n in PROMPT_LENS:
            prompt = torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, output_scores=True, return_dict_in_generate=True)
            prompts.append(prompt[0].tolist())
            ids.append(gen.sequences[0, n:].tolist())
            margins.append([float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in gen.scores])
        (out / "gpu_reference.json").write_text(json.dumps({"prompts": prompts, "ids": ids, "margins": margins}))
        print(spec.name, "prepared", flush=True)


def _compare(got: list[list[int]], ref: dict[str, Any]) -> dict[str, Any]:
    exact, near, drift = 0, [], []
    for g, want, margin in zip(got, ref["ids"], ref["margins"]):
        if g == want:
            exact += 1
            continue
        step = next((i for i, (a, b) in enumerate(zip(g, want)) if a != b), min(len(g), len(want)))
        m = margin[step] if step < len(margin) else None
        (near if m is not None and m < NEAR_TIE else drift).append({"step": step, "margin": m})
    return {"exact": exact, "prompts": len(got), "near_ties": near, "drifts": drift}


def run(folder: Path, out_dir: Path) -> None:
    import onnxruntime

    from passes.pipeline import optimize_artifact
    from runtime.engine import Engine

    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()
    rows: list[dict[str, Any]] = []
    for src in sorted(p for p in folder.iterdir() if (p / "gpu_reference.json").is_file()):
        row: dict[str, Any] = {"family": src.name}
        started = time.perf_counter()
        try:
            ref = json.loads((src / "gpu_reference.json").read_text())
            dst = Path("/tmp/lmf-families") / f"{src.name}-fp16"
            report = optimize_artifact(src, dst, "cuda", "fp16", force=True, progress=False)
            row["kv_mode"] = "shared-buffer" if any(p["name"] == "shared-buffer-kv" for p in report.passes) \
                else "concat"
            row["attention"] = {k: v for k, v in report.ops.items() if "Attention" in k}
            engine = Engine.load(dst, "cuda")
            try:
                got = engine.generate_ids(ref["prompts"], max_new_tokens=NEW_TOKENS)
            finally:
                engine.close()
            row.update(_compare(got, ref))
        except Exception as exc:  # noqa: BLE001 - one family's failure is recorded, the rest go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_families.json").write_text(json.dumps({"ort": onnxruntime.__version__, "rows": rows}, indent=1))
    print(f"\n| family | kv mode | exact of {len(PROMPT_LENS)} | near-ties (step, margin) | drifts |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['family']} | **failed** {r['error'][:100]} | | | |")
            continue
        ties = ", ".join(f"({t['step']}, {t['margin']:.3f})" for t in r["near_ties"]) or "—"
        drifts = ", ".join(f"({t['step']}, {t['margin']})" for t in r["drifts"]) or "—"
        print(f"| {r['family']} | {r['kv_mode']} | {r['exact']} | {ties} | {drifts} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("prepare", "run"))
    parser.add_argument("--dir", type=Path, required=True, help="folder of the tiny family artifacts")
    parser.add_argument("--out", type=Path, default=Path("."), help="run: where gpu_families.json goes")
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(args.dir)
    else:
        run(args.dir, args.out)


if __name__ == "__main__":
    main()
