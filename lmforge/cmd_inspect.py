"""``lmforge inspect ARTIFACT``: the manifest as a readable table."""

from __future__ import annotations

import argparse
import json
from typing import Any

from runtime.artifact import Artifact

__all__ = ["register", "run", "render"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("inspect", help="show an artifact's manifest as a table")
    parser.add_argument("artifact", help="artifact folder")
    parser.add_argument("--json", action="store_true", help="print the raw manifest")
    parser.set_defaults(func=run)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _io_rows(tensors: list[dict[str, Any]], step_prefix: str | None = None) -> list[str]:
    """IO rows, with per-layer KV tensors collapsed into one line each, and the step model's
    own tensors (names under ``step_prefix``) into one line."""
    rows: list[str] = []
    kv_groups: dict[str, list[dict[str, Any]]] = {}
    step = [t for t in tensors if step_prefix and t["name"].startswith(step_prefix)]
    for t in tensors:
        name = t["name"]
        if step_prefix and name.startswith(step_prefix):
            continue
        parts = name.split(".")
        if len(parts) == 3 and parts[1].isdigit():
            kv_groups.setdefault(f"{parts[0]}.{{i}}.{parts[2]}", []).append(t)
            continue
        rows.append(f"    {name:<28} {t['dtype']:<8} {_shape(t['shape'])}")
    for pattern, group in kv_groups.items():
        first = group[0]
        rows.append(f"    {pattern:<28} {first['dtype']:<8} {_shape(first['shape'])}  × {len(group)} layers")
    if step:
        rows.append(f"    {(step_prefix or '') + '*':<28} {len(step)} tensors of the step model (`--json` lists them)")
    return rows


# Where a weight-only precision pays off on CUDA, by batch size (docs/benchmarks.md, "Quantized
# artifacts per batch bucket" and "Weight-only int8 and int4").
BATCH_GUIDANCE = {
    "int4": "on CUDA is faster than fp16 up to batch 4 and slower from batch 8; a server that runs "
            "large batches is faster on fp16",
    "int8": "on CUDA is no faster than fp16 at batch 1 and slower at batch 16; it saves memory, not time",
}


def render(artifact: Artifact) -> str:
    m = artifact.manifest
    arch = m["architecture"]
    src = m["source"]
    lines = [f"artifact      {artifact.path}"]
    lines.append(f"format        v{m['format_version']}  ({m.get('model_kind', 'decoder')})")
    lines.append(f"source        {src.get('ref')}  [{src.get('kind')}]  sha256 {str(src.get('sha256'))[:16]}…")
    lines.append(f"architecture  {arch.get('name')} (model_type {arch.get('hf_model_type')})")
    dims = ["layers", "heads", "kv_heads", "head_dim", "hidden", "vocab", "max_context"]
    lines.append("dims          " + "  ".join(f"{d}={arch[d]}" for d in dims if d in arch))
    lines.append(f"precision     {m['precision']}    device {m.get('device', 'any')}    kv_mode {m['kv_mode']}")
    if m.get("device") == "cuda" and m["precision"] in BATCH_GUIDANCE:
        lines.append(f"batch sizes   {m['precision']} {BATCH_GUIDANCE[m['precision']]}")
    step = m.get("step")
    prefix = step.get("prefix") if isinstance(step, dict) else None
    if prefix and isinstance(step, dict):
        lines.append(f"step model    format {step.get('format')}, id history of {step.get('window')} steps: "
                     "the decoder, then per-row sampling (temperature, top-k/p, min-p, penalties, "
                     "min-new-tokens, stops, seeds) and the next step's inputs, in model.onnx")
    lines.append("inputs")
    lines += _io_rows(m["io"]["inputs"], prefix)
    lines.append("outputs")
    lines += _io_rows(m["io"]["outputs"], prefix)
    passes = m.get("passes") or []
    if passes:
        lines.append("passes        " + ", ".join(f"{p['name']}×{p['count']}" for p in passes))
    else:
        lines.append("passes        none (unoptimized export)")
    lines.append("files")
    total = 0
    for name, info in m["files"].items():
        total += info["size"]
        lines.append(f"    {name:<36} {_size(info['size']):>10}")
    lines.append(f"    {'total':<36} {_size(total):>10}")
    tools = m.get("tools", {})
    if tools:
        lines.append("tools         " + "  ".join(f"{k} {v}" for k, v in tools.items()))
    export = m.get("export", {})
    if export:
        lines.append(
            f"export        opset {export.get('opset')}  ir {export.get('ir_version')}  "
            f"{export.get('seconds')} s  check max|Δ| {export.get('check_max_abs_diff')}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from runtime.artifact import load_artifact

    artifact = load_artifact(args.artifact)
    if args.json:
        print(json.dumps(artifact.manifest, indent=2))
    else:
        print(render(artifact))
    return 0
