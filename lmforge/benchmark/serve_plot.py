"""``bench-serve --plot PNG``: latency against output throughput, one curve per runtime and sweep kind.

Left: time to first token (p50 solid, p99 dashed); right: inter-token latency (p50 solid, p99
dashed); x: output tokens/s at that point. Points are joined in sweep order (rising rate or
concurrency), so a curve bending back shows a collapse.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmforge.benchmark.plot import save_figure

__all__ = ["plot_serve_report"]

log = logging.getLogger(__name__)


def plot_serve_report(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for point in report["results"]:
        if point["completed"]:
            curves.setdefault((point["target"], point["mode"]), []).append(point)
    for (target, mode), points in curves.items():
        xs = [p["output_tok_s"] for p in points]
        for ax, key in zip(axes, ("ttft_ms", "itl_ms")):
            (line,) = ax.plot(xs, [p[key]["p50"] for p in points], marker="o", label=f"{target} — {mode} p50")
            ax.plot(xs, [p[key]["p99"] for p in points], linestyle="--", marker="x", color=line.get_color(),
                    label=f"{target} — {mode} p99")
            for p, x in zip(points, xs):
                ax.annotate(str(p["value"]), (x, p[key]["p50"]), fontsize=7, textcoords="offset points",
                            xytext=(3, 3))
    for ax, title in zip(axes, ("time to first token (ms)", "inter-token latency (ms)")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    s = report["settings"]
    fig.suptitle(f"bench-serve — prompts {s['prompts']}, {s['new_tokens']} new tokens, mix {s['mix']}", fontsize=9)
    return save_figure(fig, path)
