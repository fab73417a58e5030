"""``lmforge bench`` on encoder artifacts: end to end on the tiny BERT (JSON well-formed, every runner
timed), and the refusals that point to the right flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main


def test_bench_encoder_end_to_end(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", "--encoder", str(tiny_bert), "--batch", "1,4", "--seq", "8,16", "--repeats", "3",
                 "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "encoder" and report["settings"]["threads"] == 1 and report["settings"]["rounds"] == 3
    rows = report["rows"]
    assert {(r["runner"], r["seq"], r["batch"]) for r in rows} == {
        (runner, seq, batch) for runner in ("lmforge", "ort", "pytorch") for seq in (8, 16) for batch in (1, 4)}
    for r in rows:
        if r["runner"] == "pytorch" and r["error"]:
            assert r["error"].startswith("skipped"), r  # torch missing: a note, not a failure
            continue
        assert r["error"] is None, r
        assert r["calls"] == 3 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["throughput"] == pytest.approx(r["batch"] / (r["median_ms"] / 1000), rel=1e-2)  # ms rounded to 1 µs
    printed = capsys.readouterr().out
    assert "| lmforge fp32 (tiny-bert) | 8 | 1 |" in printed and "| ort default | 16 | 4 |" in printed


def test_bench_detects_an_encoder_without_the_flag(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", str(tiny_bert), "--batch", "2", "--seq", "8", "--repeats", "2", "--peers", "none",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["runner"], r["batch"], r["seq"], r["calls"]) for r in rows] == [("lmforge", 2, 8, 2)]


@pytest.mark.parametrize("extra, needle", [
    (["--prompt-len", "8"], "--prompt-len does not apply to encoder artifacts"),
    (["--peers", "hf"], "invalid --peers for encoders"),
    (["--seq", "100000"], "longer than the model's maximum"),
    (["--device", "cuda"], "the encoder bench runs on the CPU"),
])
def test_bench_encoder_refusals(tiny_bert: Path, extra: list[str], needle: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(tiny_bert), "--repeats", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_bench_encoder_flag_on_a_decoder(fake_decoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--encoder", str(fake_decoder)]) == 2
    assert "is a decoder artifact" in capsys.readouterr().err
    assert main(["bench", str(fake_decoder), "--seq", "8"]) == 2
    assert "--seq does not apply to decoder artifacts" in capsys.readouterr().err
