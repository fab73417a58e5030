from __future__ import annotations

import json

import numpy as np

from parity.compare import Outcome, compare_prompt, skipped
from parity.policy import POLICIES, evaluate
from parity.report import (
    CHART_NAME,
    REPORT_NAME,
    describe_result,
    format_table,
    to_json,
    worst_prompts,
    write_markdown_report,
)
from tests.parity._synth import K, candidate, make_reference, runner_up

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS = list(range(20, 60))


def comparisons():
    """exact, near-tie at 12, drift at 5 (diffs growing), NaN logits, skipped."""
    out = []
    ref = make_reference("exact", TOKENS)
    out.append(compare_prompt(ref, candidate(ref, TOKENS, 1e-4), tie_threshold=0.1))

    ref = make_reference("tie", TOKENS, [2.0] * 12 + [0.03125] + [2.0] * 27)
    out.append(compare_prompt(ref, candidate(ref, TOKENS[:12] + [runner_up(ref, 12)], 2**-6), tie_threshold=0.1))

    ref = make_reference("drifty", TOKENS)
    growth = np.geomspace(1e-3, 1.0, 40)[:, None] * np.ones((40, K))
    out.append(
        compare_prompt(
            ref,
            candidate(ref, TOKENS[:5] + [runner_up(ref, 5)] + TOKENS[6:], growth, teacher_forced=True),
            tie_threshold=0.1,
        )
    )

    ref = make_reference("nan", TOKENS[:8])
    offsets = np.zeros((8, K))
    offsets[3, 0] = np.inf
    out.append(compare_prompt(ref, candidate(ref, TOKENS[:8], offsets), tie_threshold=0.1))

    out.append(skipped("huge", "prompt of 9000 tokens exceeds the context of 8192"))
    return out


def test_describe_result():
    exact, tie, drift, nan, huge = comparisons()
    assert [describe_result(c) for c in (exact, tie, drift, nan, huge)] == [
        "exact", "near-tie at step 12", "drift at step 5", "exact", "skipped",
    ]


def test_terminal_table_has_one_row_per_prompt_and_the_verdict():
    comps = comparisons()
    verdict = evaluate(POLICIES["fp16"], comps)
    text = format_table(comps, verdict, precision="fp16", decode=lambda t: f"tok{t}")
    lines = text.splitlines()
    assert lines[0].split() == ["prompt", "result", "ref", "→", "cand", "margin", "max", "|Δlogit|"]
    row = next(line for line in lines if line.startswith("tie "))
    assert (
        "near-tie at step 12" in row and "32 'tok32' → 1121 'tok1121'" in row and "0.0312" in row and "1.56e-02" in row
    )
    assert "drift at step 5" in next(line for line in lines if line.startswith("drifty"))
    assert "inf" in next(line for line in lines if line.startswith("nan "))
    assert "skipped: prompt of 9000 tokens" in text
    assert "5 prompts: 2 exact, 1 near-tie, 1 drift, 0 length mismatch, 1 skipped" in text
    assert "parity fp16: FAILED" in text and "drift within the first 32 tokens" in text


def test_terminal_table_survives_a_failing_decoder():
    def decode(token: int) -> str:
        raise KeyError(token)

    assert "32 → 1121" in format_table(comparisons(), decode=decode)


def test_json_has_the_issue_schema_and_is_strict_json():
    comps = comparisons()
    verdict = evaluate(POLICIES["fp16"], comps)
    doc = to_json(verdict, comps, "fp16", POLICIES["fp16"])
    text = json.dumps(doc, allow_nan=False)  # raises on NaN/inf
    doc = json.loads(text)
    assert {"passed", "precision", "policy", "summary", "prompts"} <= set(doc)
    assert doc["passed"] is False and doc["precision"] == "fp16"
    assert doc["policy"]["drift_free_steps"] == 32 and doc["policy"]["precision"] == "fp16"
    assert {"prompts", "exact", "near_tie", "drift"} <= set(doc["summary"])
    assert doc["summary"] == {"prompts": 5, "exact": 2, "near_tie": 1, "drift": 1, "length_mismatch": 0, "skipped": 1}
    assert [p["id"] for p in doc["prompts"]] == ["exact", "tie", "drifty", "nan", "huge"]
    for entry in doc["prompts"]:
        assert {"id", "exact", "first_divergence", "ref_margin", "max_logit_diff"} <= set(entry)
    tie = doc["prompts"][1]
    assert tie["exact"] is False and tie["first_divergence"] == 12 and tie["classification"] == "near_tie"
    assert tie["ref_margin"] == 0.03125 and tie["max_logit_diff"] == 2**-6
    nan = doc["prompts"][3]
    assert nan["max_logit_diff"] is None and nan["logits_finite"] is False
    assert doc["prompts"][4]["classification"] == "skipped" and doc["prompts"][4]["skip_reason"]
    assert doc["reasons"] and all(isinstance(r, str) for r in doc["reasons"])


def test_worst_prompts_order_by_outcome_then_logit_difference():
    names = [c.prompt_id for c in worst_prompts(comparisons(), 10)]
    assert names == ["drifty", "tie", "nan", "exact"]  # skipped has nothing to chart
    assert [c.prompt_id for c in worst_prompts(comparisons(), 2)] == ["drifty", "tie"]


def test_markdown_report_and_chart_are_written(tmp_path):
    comps = comparisons()
    verdict = evaluate(POLICIES["fp16"], comps)
    out = tmp_path / "reports" / "fp16"
    report = write_markdown_report(out, verdict, comps, "fp16", POLICIES["fp16"], worst=3)
    assert report == out / REPORT_NAME
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# Parity report: fp16, FAILED")
    assert f"![per-step logit difference]({CHART_NAME})" in text
    assert "## Why it failed" in text and "drift within the first 32 tokens" in text
    assert "| tie | near-tie at step 12 |" in text
    assert "| tie_threshold | 0.1 |  |" in text and "| drift_free_steps | 32 |  |" in text
    assert "for the 3 worst prompt(s)" in text
    png = (out / CHART_NAME).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_report_without_logits_has_no_chart(tmp_path):
    ref = make_reference("p", TOKENS)
    comps = [compare_prompt(ref, candidate(ref, TOKENS, None), tie_threshold=0.1)]
    (tmp_path / CHART_NAME).write_bytes(PNG_MAGIC)  # stale chart of an earlier run
    verdict = evaluate(POLICIES["int8"], comps)
    report = write_markdown_report(tmp_path, verdict, comps, "int8", POLICIES["int8"])
    assert verdict.passed
    text = report.read_text(encoding="utf-8")
    assert "PASSED" in text and "No logit differences were recorded" in text and CHART_NAME not in text
    assert not (tmp_path / CHART_NAME).exists()


def test_markdown_escapes_table_breakers(tmp_path):
    ref = make_reference("p", TOKENS)
    comps = [compare_prompt(ref, candidate(ref, TOKENS[:3] + [runner_up(ref, 3)]), tie_threshold=0.1)]
    verdict = evaluate(POLICIES["int4"], comps)
    report = write_markdown_report(tmp_path, verdict, comps, "int4", POLICIES["int4"], decode=lambda t: "a|b\nc")
    row = next(line for line in report.read_text(encoding="utf-8").splitlines() if line.startswith("| p |"))
    assert row.count(" | ") == 7 and "a\\|b" in row
    assert to_json(verdict, comps, "int4", POLICIES["int4"])["prompts"][0]["classification"] == Outcome.DRIFT.value
