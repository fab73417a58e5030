"""``lmforge inspect ARTIFACT``: the manifest as a readable table."""

from __future__ import annotations

import argparse
import json
from typing import Any

from runtime.artifact import Artifact

__all__ = ["register", "run", "render"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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


def _io_rows(tensors: list[dict[str, Any]]) -> list[str]:
    """IO rows, with per-layer KV tensors collapsed into one line each."""
    rows: list[str] = []
    kv_groups: dict[str, list[dict[str, Any]]] = {}
    for t in tensors:
        name = t["name"]
        parts = name.split(".")
        if len(parts) == 3 and parts[1].isdigit():
            kv_groups.setdefault(f"{parts[0]}.{{i}}.{parts[2]}", []).append(t)
            continue
        rows.append(f"    {name:<28} {t['dtype']:<8} {_shape(t['shape'])}")
    for pattern, group in kv_groups.items():
        first = group[0]
        rows.append(f"    {pattern:<28} {first['dtype']:<8} {_shape(first['shape'])}  × {len(group)} layers")
    return rows


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
    lines.append("inputs")
    lines += _io_rows(m["io"]["inputs"])
    lines.append("outputs")
    lines += _io_rows(m["io"]["outputs"])
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
