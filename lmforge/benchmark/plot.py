"""``--plot PNG``: grouped bars of decode tokens/s, one group per batch size, one bar per runtime.

Runtimes that did not run at a batch size get no bar but keep their place in the legend with
"(not run)", so a missing peer is visible in the picture too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["plot_report", "save_figure"]

log = logging.getLogger(__name__)


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    results = report["results"]
    runners = list(dict.fromkeys(r["runner"] for r in results))
    batches = sorted({r["batch"] for r in results})
    values = {(r["runner"], r["batch"]): r.get("decode_tok_s") if r["status"] == "ok" else None for r in results}
    width = 0.8 / max(1, len(runners))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(batches) * len(runners) * 0.6 + 3), 4.5))
    for i, name in enumerate(runners):
        xs, ys = [], []
        for j, batch in enumerate(batches):
            v = values.get((name, batch))
            if v is not None:
                xs.append(j + (i - (len(runners) - 1) / 2) * width)
                ys.append(v)
        ran = any(values.get((name, b)) is not None for b in batches)
        bars = ax.bar(xs, ys, width, label=name if ran else f"{name} (not run)")
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s (whole batch)")
    device, settings = report["device"], report["settings"]
    ax.set_title(f"{device['name']} — prompt {settings['prompt_len']}, {settings['new_tokens']} new tokens, greedy",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write (parents made) and close a matplotlib figure; the path written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    log.info("wrote %s", out)
    return out
