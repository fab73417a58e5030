"""``lmforge bench`` on a tiny artifact on the CPU: report schema, peers kept, bad input refused.

One bench run (lmforge + hf + genai + an unrunnable optimum, batch 1 and 2, 8-token prompts,
6 new tokens) is shared by the tests that read its report; the refusals never load a model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lmforge.benchmark.harness import make_prompts, render_table
from lmforge.benchmark.runner import Timing
from lmforge.cli import main

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


@pytest.fixture(scope="module")
def bench(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", str(tiny_llama), "--batch", "1,2", "--prompt-len", "8", "--new-tokens", "6", "--repeats", "2",
            "--peers", "hf,genai,optimum", "--peers-site", str(out / "no-such-site"), "--work", str(out / "work"),
            "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    assert main(argv) == 0
    return {"report": json.loads((out / "bench.json").read_text()), "png": out / "bench.png"}


def test_report_schema(bench: dict[str, Any]) -> None:
    report = bench["report"]
    assert report["schema"] == "lmforge-bench/1"
    for key in ("date", "command", "device", "versions", "model", "settings", "runners", "results"):
        assert key in report, key
    assert report["device"]["type"] == "cpu" and report["device"]["copy_bandwidth_gb_s"] > 0
    assert report["settings"]["batches"] == [1, 2] and report["settings"]["new_tokens"] == 6
    assert "bench" in report["command"]
    assert report["model"]["peers_source"] == "tiny:llama"


def test_every_requested_runner_is_reported(bench: dict[str, Any]) -> None:
    results = bench["report"]["results"]
    assert {(r["runner"], r["batch"]) for r in results} == {
        (name, b) for name in ("lmforge", "hf", "genai", "optimum") for b in (1, 2)
    }
    for r in results:
        assert r["status"] in ("ok", "not run")
        if r["status"] == "not run":
            assert r["reason"]


def test_lmforge_and_hf_ran(bench: dict[str, Any]) -> None:
    by = {(r["runner"], r["batch"]): r for r in bench["report"]["results"]}
    for name in ("lmforge", "hf"):
        for batch in (1, 2):
            r = by[(name, batch)]
            assert r["status"] == "ok", r
            assert r["decode_tok_s"] > 0 and r["ttft_ms"] > 0 and r["throughput_tok_s"] > 0
            assert r["per_row_tok_s"] == pytest.approx(r["decode_tok_s"] / batch, rel=0.5)
            assert len(r["repeats"]) == 2
            assert r["bytes_per_step"] > 0 and r["bw_util"] > 0
            assert r["mem_mb"] is not None


def test_genai_ran_or_says_why(bench: dict[str, Any]) -> None:
    rows = [r for r in bench["report"]["results"] if r["runner"] == "genai"]
    if HAS_GENAI:
        assert all(r["status"] == "ok" and r["decode_tok_s"] > 0 for r in rows), rows
    else:
        assert all(r["status"] == "not run" and "not installed" in r["reason"] for r in rows)


def test_unrunnable_peer_is_kept_with_reason(bench: dict[str, Any]) -> None:
    rows = [r for r in bench["report"]["results"] if r["runner"] == "optimum"]
    assert len(rows) == 2
    assert all(r["status"] == "not run" and "no-such-site" in r["reason"] for r in rows)
    entry = next(e for e in bench["report"]["runners"] if e["name"] == "optimum")
    assert entry["status"] == "not run"


def test_plot_written(bench: dict[str, Any]) -> None:
    assert bench["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_lists_not_run_reasons(bench: dict[str, Any]) -> None:
    table = render_table(bench["report"])
    assert "lmforge" in table and "not run:" in table and "optimum" in table


def test_timing_arithmetic() -> None:
    t = Timing(ttft_s=0.5, decode_s=2.0, new_tokens=9, batch=4)
    assert t.decode_tok_s == pytest.approx(16.0)
    assert t.per_row_tok_s == pytest.approx(4.0)
    assert t.throughput_tok_s == pytest.approx(36 / 2.5)


def test_prompts_are_fixed_and_in_vocab() -> None:
    a, b = make_prompts(320, 3, 16, seed=0), make_prompts(320, 3, 16, seed=0)
    assert a == b and len(a) == 3 and all(len(p) == 16 for p in a)
    assert all(80 <= t < 320 for p in a for t in p)


@pytest.mark.parametrize("extra, needle", [
    (["--peers", "hf,bogus"], "unknown peer 'bogus'"),
    (["--batch", "1,x"], "invalid --batch"),
    (["--batch", "0"], "invalid --batch"),
    (["--new-tokens", "1"], "invalid --new-tokens"),
    (["--device", "tpu"], "invalid --device"),
    (["--genai-precision", "int3"], "invalid --genai-precision"),
])
def test_bad_flags_exit_2(tiny_llama: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str) -> None:
    peers = [] if "--peers" in extra else ["--peers", "none"]
    assert main(["bench", str(tiny_llama), *peers, *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert err.count("\n") <= 2


def test_not_an_artifact_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(tmp_path), "--peers", "none"]) == 2
    assert "not an lmforge artifact" in capsys.readouterr().err


def test_encoder_artifact_exit_2(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "encoder"
    shutil.copytree(tiny_llama, fake)
    manifest = json.loads((fake / "manifest.json").read_text())
    manifest.update(model_kind="encoder", kv_mode="none")
    (fake / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bench", str(fake), "--peers", "none"]) == 2
    assert "encoder" in capsys.readouterr().err


def test_cuda_without_provider_exit_2(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    assert main(["bench", str(tiny_llama), "--device", "cuda", "--peers", "none"]) == 2
    assert "CUDAExecutionProvider" in capsys.readouterr().err


def test_optimum_without_a_site_is_not_run(tmp_path: Path) -> None:
    """The worker answers the import probe in its own interpreter; no folder is saved for nothing."""
    from lmforge.benchmark.peers import OptimumRunner
    from lmforge.benchmark.runner import NotRun

    class NoSource:
        sha256 = None

        def hf_folder(self) -> Path:
            raise NotRun("optimum.onnxruntime imported, and this test has no model folder")

    runner = OptimumRunner(NoSource(), "cpu", tmp_path, None, 0)  # type: ignore[arg-type]
    try:
        with pytest.raises(NotRun) as info:
            runner.prepare()
    finally:
        runner.close()
    assert "not importable" in str(info.value) or "no model folder" in str(info.value)


def test_cuda_memory_is_read_through_nvml_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the sampler asks NVML (no CUDA context, no fork) before torch or nvidia-smi."""
    import sys
    import types

    from lmforge.benchmark.memory import memory_probe

    calls: list[str] = []
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=3 * 2**20, handle=handle)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe, method = memory_probe("cuda")
    assert method == "device used memory, NVML"
    assert probe() == 3.0 and calls == ["init"]


def test_cuda_memory_falls_back_when_nvml_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from lmforge.benchmark import memory

    fake = types.ModuleType("pynvml")

    def no_driver() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setitem(sys.modules, "torch", None)  # no torch either: nvidia-smi is the last resort
    monkeypatch.setattr(memory, "_cuda_smi", lambda: 7.0)
    probe, method = memory.memory_probe("cuda")
    assert method == "device used memory, nvidia-smi" and probe() == 7.0
