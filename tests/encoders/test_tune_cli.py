"""``lmforge tune`` end to end on the tiny BERT, and the CLI's refusals (exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from runtime.cpu import available_cores


def test_tune_sweep_runs_end_to_end(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tune.json"
    code = main(["-q", "tune", str(tiny_bert), "--batch", "2", "--seq", "16", "--instances", "1",
                 "--peers", "ort", "--seconds", "0.2", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["runner"], r["instances"]) for r in rows] == [("lmforge", 1), ("ort", 1)]
    for r in rows:
        assert r["error"] is None, r
        assert r["requests"] >= 2 and 0 < r["p50_ms"] <= r["p99_ms"] and r["throughput"] > 0
    assert report["recommended"][0]["seq"] == 16
    assert report["recommended"][0]["throughput"]["instances"] == 1
    printed = capsys.readouterr().out
    assert "| lmforge | 16 | 2 |" in printed and "seq 16: for throughput" in printed


@pytest.mark.skipif(len(available_cores()) < 2, reason="needs 2 cores to split")
def test_tune_two_pinned_instances(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune.json"
    assert main(["-q", "tune", str(tiny_bert), "--batch", "1", "--seq", "8", "--instances", "2",
                 "--peers", "none", "--seconds", "0.2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["instances"] == 2 and row["threads"] >= 1
    slices = row["cpus"].split("|")
    assert len(slices) == 2 and slices[0] != slices[1]


@pytest.mark.parametrize("extra, needle", [
    (["--instances", str(len(available_cores()) + 1)], "invalid instance count"),
    (["--cpus", str(max(available_cores()) + 1000)], "may not use"),
    (["--threads", "0"], "invalid --threads"),
    (["--threads", str(len(available_cores()) + 1)], "invalid threads"),
    (["--batch", "0"], "invalid --batch"),
    (["--seq", "100000"], "longer than the model's maximum"),
    (["--peers", "tensorrt"], "invalid --peers"),
])
def test_tune_bad_input_exits_2(tiny_bert: Path, extra: list[str], needle: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tune", str(tiny_bert), "--seconds", "0.1", "--peers", "none", *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_tune_refuses_a_decoder(fake_decoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", str(fake_decoder), "--peers", "none"]) == 2
    assert "is a decoder" in capsys.readouterr().err
