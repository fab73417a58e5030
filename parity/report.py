"""Render a parity verdict: a terminal table, the ``--json`` document, and a Markdown report with a
chart of the per-step logit difference (``--report DIR``).

Rendering functions return strings; only :func:`write_markdown_report` (and the chart it calls)
touches the file system. The chart uses matplotlib's object API with the Agg canvas, never
``pyplot``, so it neither needs a display nor changes the process's global backend.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from parity.compare import Outcome, PromptComparison
from parity.policy import Policy, Verdict

__all__ = [
    "REPORT_NAME",
    "CHART_NAME",
    "describe_result",
    "format_table",
    "to_json",
    "worst_prompts",
    "plot_logit_diffs",
    "render_markdown",
    "write_markdown_report",
]

log = logging.getLogger(__name__)

REPORT_NAME = "report.md"
CHART_NAME = "logit_diff.png"

Decode = Callable[[int], str]
_SEVERITY = {
    Outcome.LENGTH_MISMATCH: 4,
    Outcome.DRIFT: 3,
    Outcome.NEAR_TIE: 2,
    Outcome.EXACT: 1,
    Outcome.SKIPPED: 0,
}


# --------------------------------------------------------------------------------------------
# Formatting helpers


def describe_result(comparison: PromptComparison) -> str:
    """``exact``, ``near-tie at step 12``, ``drift at step 5``, ``length mismatch at step 30``, ``skipped``."""
    outcome = comparison.classification
    if outcome is Outcome.EXACT:
        return "exact"
    if outcome is Outcome.SKIPPED:
        return "skipped"
    label = {Outcome.NEAR_TIE: "near-tie", Outcome.DRIFT: "drift", Outcome.LENGTH_MISMATCH: "length mismatch"}[outcome]
    return f"{label} at step {comparison.first_divergence}"


def _num(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def _token(token: int | None, decode: Decode | None) -> str:
    if token is None:
        return "(end)"
    if decode is None:
        return str(token)
    try:
        text = decode(token)
    except Exception as exc:  # noqa: BLE001 - a display nicety must never break a report
        log.debug("cannot decode token %d: %s", token, exc)
        return str(token)
    shown = repr(text)
    if len(shown) > 16:
        shown = shown[:15] + "…"
    return f"{token} {shown}"


def _tokens(comparison: PromptComparison, decode: Decode | None) -> str:
    if comparison.first_divergence is None:
        return ""
    return f"{_token(comparison.ref_token, decode)} → {_token(comparison.cand_token, decode)}"


def _json_float(value: float | None) -> float | None:
    """JSON has no NaN/inf: they become null (``logits_finite`` says why)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


# --------------------------------------------------------------------------------------------
# Terminal table


def format_table(
    comparisons: Sequence[PromptComparison],
    verdict: Verdict | None = None,
    *,
    precision: str | None = None,
    decode: Decode | None = None,
) -> str:
    """A plain-text table, one row per prompt, then the summary and (given a verdict) the outcome."""
    header = ("prompt", "result", "ref → cand", "margin", "max |Δlogit|")
    rows = []
    for c in comparisons:
        result = describe_result(c)
        if c.classification is Outcome.SKIPPED and c.skip_reason:
            reason = c.skip_reason if len(c.skip_reason) <= 40 else c.skip_reason[:39] + "…"
            result = f"skipped: {reason}"
        rows.append((c.prompt_id, result, _tokens(c, decode), _num(c.ref_margin, ".3g"), _num(c.max_logit_diff, ".2e")))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    right = {3, 4}

    def line(row: Sequence[str]) -> str:
        cells = [
            str(cell).rjust(w) if i in right else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    counts = {o: sum(c.classification is o for c in comparisons) for o in Outcome}
    out.append("")
    out.append(
        f"{len(comparisons)} prompts: {counts[Outcome.EXACT]} exact, {counts[Outcome.NEAR_TIE]} near-tie, "
        f"{counts[Outcome.DRIFT]} drift, {counts[Outcome.LENGTH_MISMATCH]} length mismatch, "
        f"{counts[Outcome.SKIPPED]} skipped"
    )
    if verdict is not None:
        label = f"parity {precision}" if precision else "parity"
        out.append(f"{label}: {'PASSED' if verdict.passed else 'FAILED'}")
        out += [f"  - {reason}" for reason in verdict.reasons]
        out += [f"  note: {note}" for note in verdict.notes]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# JSON


def to_json(
    verdict: Verdict, comparisons: Sequence[PromptComparison], precision: str, policy: Policy
) -> dict[str, Any]:
    """The ``--json`` document; ``json.dumps(..., allow_nan=False)`` accepts it.

    The issue's schema, plus ``reasons``/``notes`` at the top, ``length_mismatch``/``skipped`` in
    the summary, and per prompt the classification and divergence details.
    """
    return {
        "passed": bool(verdict.passed),
        "precision": precision,
        "policy": policy.to_json(),
        "summary": verdict.summary.to_json(),
        "reasons": list(verdict.reasons),
        "notes": list(verdict.notes),
        "prompts": [
            {
                "id": c.prompt_id,
                "exact": c.exact,
                "first_divergence": c.first_divergence,
                "ref_margin": _json_float(c.ref_margin),
                "max_logit_diff": _json_float(c.max_logit_diff),
                "classification": c.classification.value,
                "ref_token": c.ref_token,
                "cand_token": c.cand_token,
                "ref_gap": _json_float(c.ref_gap),
                "mean_logit_diff": _json_float(c.mean_logit_diff),
                "compared_steps": c.compared_steps,
                "logits_finite": c.logits_finite,
                "ref_length": c.ref_length,
                "cand_length": c.cand_length,
                "skip_reason": c.skip_reason,
                "step_max_diffs": [_json_float(x) for x in c.step_max_diffs],
            }
            for c in comparisons
        ],
    }


# --------------------------------------------------------------------------------------------
# Chart


def worst_prompts(comparisons: Sequence[PromptComparison], count: int) -> list[PromptComparison]:
    """The ``count`` prompts with recorded logit differences that fared worst: by outcome
    (length mismatch, drift, near-tie, exact), then by maximum logit difference (inf first)."""
    charted = [c for c in comparisons if c.step_max_diffs]
    charted.sort(
        key=lambda c: (-_SEVERITY[c.classification], -(c.max_logit_diff if c.max_logit_diff is not None else 0.0))
    )
    return charted[:count]


def plot_logit_diffs(
    comparisons: Sequence[PromptComparison],
    path: str | os.PathLike[str],
    *,
    worst: int = 5,
    title: str | None = None,
    tolerance: float | None = None,
    tie_threshold: float | None = None,
) -> Path | None:
    """Write a PNG of the per-step max |Δlogit| of the worst prompts, log-scale y, the first
    divergence marked; None (and nothing written) when no prompt has logit differences."""
    chosen = worst_prompts(comparisons, worst)
    if not chosen:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finite = [x for c in chosen for x in c.step_max_diffs if math.isfinite(x) and x > 0]
    bounds = [b for b in (tolerance, tie_threshold) if b is not None]
    floor = 10 ** math.floor(math.log10(min(finite + bounds))) / 10 if finite or bounds else 1e-7

    fig = Figure(figsize=(12, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_yscale("log")
    for index, c in enumerate(chosen):
        color = f"C{index % 10}"
        steps = range(len(c.step_max_diffs))
        shown = [max(x, floor) if math.isfinite(x) else math.nan for x in c.step_max_diffs]
        label = f"{c.prompt_id}: {describe_result(c)}" + ("" if c.logits_finite else ", NaN/inf logits")
        ax.plot(steps, shown, color=color, linewidth=1.4, label=label)
        bad = [s for s, x in zip(steps, c.step_max_diffs) if not math.isfinite(x)]
        if bad:
            ax.scatter(bad, [0.97] * len(bad), marker="^", color=color, transform=ax.get_xaxis_transform(), zorder=3)
        step = c.first_divergence
        if step is not None and c.classification is not Outcome.EXACT:
            ax.axvline(step, color=color, linestyle="--", linewidth=1.0, alpha=0.8)
            if step < len(shown) and math.isfinite(shown[step]):
                ax.plot([step], [shown[step]], marker="o", markersize=7, color=color, markeredgecolor="black")
    if tolerance is not None:
        ax.axhline(tolerance, color="black", linestyle=":", linewidth=1.2, label=f"logit tolerance {tolerance:g}")
    if tie_threshold is not None:
        ax.axhline(tie_threshold, color="grey", linestyle="-.", linewidth=1.0, label=f"tie threshold {tie_threshold:g}")
    ax.set_xlabel("generation step (dashed line, dot: first divergence; ▲: NaN/inf)")
    ax.set_ylabel("max |Δlogit| at the reference's top-k ids")
    ax.set_title(title or f"Per-step logit difference, worst {len(chosen)} prompt(s)")
    if any(x < floor for c in chosen for x in c.step_max_diffs):
        ax.text(0.99, 0.01, f"differences below {floor:.0e} (incl. 0) drawn at {floor:.0e}", transform=ax.transAxes,
                ha="right", va="bottom", fontsize="small", color="dimgrey")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    out = Path(path)
    fig.savefig(out, format="png", dpi=110)
    log.debug("wrote chart %s", out)
    return out


# --------------------------------------------------------------------------------------------
# Markdown


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(
    verdict: Verdict,
    comparisons: Sequence[PromptComparison],
    precision: str,
    policy: Policy,
    *,
    chart: str | None = None,
    charted: int = 0,
    decode: Decode | None = None,
    title: str | None = None,
) -> str:
    """The report as Markdown; ``chart`` is the image's path relative to the report."""
    s = verdict.summary
    lines = [f"# {title or 'Parity report'}: {precision}, {'PASSED' if verdict.passed else 'FAILED'}", ""]
    lines += [
        f"{s.prompts} prompts ({s.compared} compared, {s.skipped} skipped): **{s.exact} exact**, "
        f"{s.near_tie} near-tie, {s.drift} drift, {s.length_mismatch} length mismatch.",
        "",
    ]
    if verdict.reasons:
        lines += ["## Why it failed", ""] + [f"- {_md(r)}" for r in verdict.reasons] + [""]
    if verdict.notes:
        lines += ["## Notes", ""] + [f"- {_md(n)}" for n in verdict.notes] + [""]

    lines += [f"## Policy ({policy.precision})", "", "| threshold | value | |", "|---|---|---|"]
    for key, value in policy.to_json().items():
        if key in ("precision", "provisional"):
            continue
        mark = "provisional" if key in policy.provisional else ""
        lines.append(f"| {key} | {'not enforced' if value is None else value} | {mark} |")
    lines.append("")

    lines += ["## Where drift starts", ""]
    if chart:
        lines += [
            f"![per-step logit difference]({chart})",
            "",
            f"Per generation step, the largest absolute difference between the candidate's and the reference's "
            f"logits at the reference's top-k ids, for the {charted} worst prompt(s). A dashed line marks a "
            "prompt's first divergence; its curve ends there unless the candidate was teacher-forced, because "
            "after it the two runs no longer share a context.",
        ]
    else:
        lines.append("No logit differences were recorded (the candidate returned tokens only).")
    lines.append("")

    lines += [
        "## Prompts",
        "",
        "| prompt | result | ref → cand | ref margin | ref gap | max \\|Δlogit\\| | mean \\|Δlogit\\| | steps |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in comparisons:
        result = describe_result(c)
        if c.classification is Outcome.SKIPPED and c.skip_reason:
            result = f"skipped: {c.skip_reason}"
        lines.append(
            f"| {_md(c.prompt_id)} | {_md(result)} | {_md(_tokens(c, decode))} | {_num(c.ref_margin, '.3g')} | "
            f"{_num(c.ref_gap, '.3g')} | {_num(c.max_logit_diff, '.2e')} | {_num(c.mean_logit_diff, '.2e')} | "
            f"{c.compared_steps} |"
        )
    lines += [
        "",
        "*ref margin*: the reference's top-1 minus top-2 logit at the first divergence. *ref gap*: the reference's "
        "top-1 logit minus its logit of the candidate's token there ('-' when that token is outside the "
        f"reference's top-k). A divergence with a gap below the tie threshold ({policy.tie_threshold:g}) is a "
        "near-tie: the reference itself was nearly indifferent.",
        "",
    ]
    return "\n".join(lines)


def write_markdown_report(
    directory: str | os.PathLike[str],
    verdict: Verdict,
    comparisons: Sequence[PromptComparison],
    precision: str,
    policy: Policy,
    *,
    worst: int = 5,
    decode: Decode | None = None,
    title: str | None = None,
) -> Path:
    """Write ``report.md`` and ``logit_diff.png`` into ``directory`` (created); return the report's path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    charted = len(worst_prompts(comparisons, worst))
    chart = plot_logit_diffs(
        comparisons,
        out / CHART_NAME,
        worst=worst,
        title=f"{precision}: per-step logit difference, worst {charted} prompt(s)",
        tolerance=policy.max_logit_diff,
        tie_threshold=policy.tie_threshold,
    )
    if chart is None and (out / CHART_NAME).exists():
        (out / CHART_NAME).unlink()  # a stale chart from an earlier run must not pass for this one
    text = render_markdown(
        verdict,
        comparisons,
        precision,
        policy,
        chart=CHART_NAME if chart else None,
        charted=charted,
        decode=decode,
        title=title,
    )
    report = out / REPORT_NAME
    report.write_text(text, encoding="utf-8")
    log.info("wrote parity report %s", report)
    return report
