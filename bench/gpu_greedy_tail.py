"""Build a diagnostic variant of a CUDA artifact whose step model ends in a bare ``ArgMax`` (the
sampling nodes of :func:`runtime.sampler_graph.add_sampling` replaced by a greedy pick, the
sampling state carried over): the same decoder and step IO, so the engine runs it, but only
greedy requests mean anything. It separates what the decoder's kernels cost inside the captured
step from what the appended sampling nodes add (issue #11, batch-1 greedy). Never for serving.

    PYTHONPATH=/tmp/gpu-site:$PWD python3 bench/gpu_greedy_tail.py FP32_ARTIFACT OUT
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def greedy_tail(g: Any, logits_last: str, vocab: int, names: dict[str, str], outputs: dict[str, str] | None = None,
                segments: int = 1) -> dict[str, str]:
    outputs = outputs or {}
    x = g.op("Cast", [logits_last], {"to": 1})
    ids = g.op("ArgMax", [x], {"axis": 1, "keepdims": 1, "select_last_index": 0}, outputs=[outputs["next_ids"]])
    seen = g.op("Identity", [names["seen"]], outputs=[outputs["seen"]])
    counts = g.op("Identity", [names["counts"]], outputs=[outputs["counts"]])
    step = g.op("Add", [names["step"], g.const(1, "int64")], outputs=[outputs["step"]])
    return {"next_ids": ids, "seen": seen, "counts": counts, "step": step}


def main() -> int:
    from passes.pipeline import optimize_artifact
    from runtime import step_graph

    step_graph.add_sampling = greedy_tail  # type: ignore[assignment]
    optimize_artifact(sys.argv[1], sys.argv[2], device="cuda", precision="fp16", kv_mode="shared-buffer", force=True,
                      progress=False)
    print("built", sys.argv[2])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
