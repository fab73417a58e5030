"""Bad input gets one clear line, exit code 2, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.cli import main
from runtime.artifact import load_artifact
from runtime.errors import ArtifactError, ExportError

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("lmforge ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(name)]


# ------------------------------------------------------------------------------------------------
# convert


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "convert", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "does not exist", "pass an existing folder")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"x")
    code, err = run_cli(capsys, "convert", str(tmp_path / "model"), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "no config.json")
    assert leftovers(tmp_path, "out") == []


def test_hub_id_without_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    code, err = run_cli(capsys, "convert", "HuggingFaceTB/SmolLM2-135M", "-o", str(tmp_path / "out"))
    assert time.perf_counter() - started < 10
    assert_one_line_error(code, err, "hub is not reachable", "local folder")


def test_unknown_tiny_and_builtin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "convert", "tiny:t5", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "unknown architecture 't5'", "llama")
    code, err = run_cli(capsys, "convert", "builtin:gpt5", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "unknown builtin model", "smollm2-135m")


def test_unsupported_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import T5Config

    folder = tmp_path / "t5"
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    code, err = run_cli(capsys, "convert", str(folder), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "'t5' is an encoder-decoder model", "decoder-only", "bert")
    assert leftovers(tmp_path, "out") == []


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real HF folder (config + safetensors + tokenizer) of the tiny Llama."""
    from exporters.sources import load_source

    loaded = load_source("tiny:llama")
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_hf_folder_converts(tiny_hf_folder: Path, tmp_path: Path) -> None:
    from exporters.convert import convert

    out = convert(str(tiny_hf_folder), tmp_path / "art", progress=False)
    artifact = load_artifact(out)
    assert artifact.manifest["source"]["kind"] == "hf"
    assert artifact.manifest["export"]["check_max_abs_diff"] < 1e-4


def test_truncated_safetensors(tiny_hf_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_hf_folder, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, "convert", str(folder), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "truncated", "download the model again")
    assert leftovers(tmp_path, "out") == []


def test_truncated_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exporters.sources import resolve_source

    info = resolve_source("builtin:smollm2-135m")
    assert info.path is not None and info.gguf_file is not None
    broken = tmp_path / "broken.gguf"
    with open(info.path / info.gguf_file, "rb") as fh:
        broken.write_bytes(fh.read(4 << 20))
    code, err = run_cli(capsys, "convert", str(broken), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "GGUF file", "truncated or corrupt")
    assert leftovers(tmp_path, "out") == []


def test_not_a_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    code, err = run_cli(capsys, "convert", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "not a .gguf model")


def test_existing_output_refused_then_forced(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, "convert", "tiny:llama", "-o", str(out))
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "precious"


def test_read_only_output_location(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(capsys, "convert", "tiny:llama", "-o", str(blocker / "out"))
    assert_one_line_error(code, err, "cannot write to", "writable output location")
    if os.geteuid() != 0:  # root ignores mode bits; the file-as-parent case above covers root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            code, err = run_cli(capsys, "convert", "tiny:llama", "-o", str(ro / "out"))
            assert_one_line_error(code, err, "cannot write to")
        finally:
            ro.chmod(0o755)


def test_failure_mid_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    conv = importlib.import_module("exporters.convert")  # the module (the package re-exports the function)

    def boom(*args: object, **kwargs: object) -> None:
        raise ExportError("simulated failure during export")

    monkeypatch.setattr(conv, "export_model", boom)
    with pytest.raises(ExportError, match="simulated"):
        conv.convert("tiny:llama", tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_kill_mid_export_leaves_no_target(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "convert", "tiny:llama", "-o", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    # wait until the temporary folder exists (the export is under way), then kill hard
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith("killed.tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.1)
    assert any(p.name.startswith("killed.tmp-") for p in tmp_path.iterdir()), "export never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()


def test_bad_max_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "convert", "tiny:gpt2", "-o", str(tmp_path / "out"), "--max-context", "100000")
    assert_one_line_error(code, err, "learned positions", "--max-context 256")
    assert leftovers(tmp_path, "out") == []


# ------------------------------------------------------------------------------------------------
# artifact validation


@pytest.fixture()
def artifact_copy(tiny_llama: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    return copy


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_valid_copy_loads(artifact_copy: Path) -> None:
    assert load_artifact(artifact_copy).kv_mode.value == "concat"


def test_missing_manifest(artifact_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (artifact_copy / "manifest.json").unlink()
    code, err = run_cli(capsys, "inspect", str(artifact_copy))
    assert_one_line_error(code, err, "not an lmforge artifact", "manifest.json is missing")


def test_unknown_format_version(artifact_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _manifest(artifact_copy)
    manifest["format_version"] = 99
    _write_manifest(artifact_copy, manifest)
    code, err = run_cli(capsys, "inspect", str(artifact_copy))
    assert_one_line_error(code, err, "unknown format_version", "expected 1", "got 99")


def test_missing_file(artifact_copy: Path) -> None:
    (artifact_copy / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="model.onnx.data listed in the manifest is missing"):
        load_artifact(artifact_copy)


def test_size_mismatch(artifact_copy: Path) -> None:
    with open(artifact_copy / "model.onnx.data", "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(ArtifactError, match="model.onnx.data has been altered.*bytes"):
        load_artifact(artifact_copy)


def test_sha_mismatch_same_size(artifact_copy: Path) -> None:
    data = bytearray((artifact_copy / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (artifact_copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 differs"):
        load_artifact(artifact_copy)
    load_artifact(artifact_copy, verify_hashes=False)  # size still matches: only the hash catches it


def test_external_data_outside_folder(artifact_copy: Path, tmp_path: Path) -> None:
    import onnx

    from runtime.artifact import sha256_file

    model = onnx.load(str(artifact_copy / "model.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../evil.data"
    onnx.save_model(model, str(artifact_copy / "model.onnx"))
    manifest = _manifest(artifact_copy)
    path = artifact_copy / "model.onnx"
    manifest["files"]["model.onnx"] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    _write_manifest(artifact_copy, manifest)
    with pytest.raises(ArtifactError, match="outside the folder"):
        load_artifact(artifact_copy)


def test_manifest_file_outside_folder(artifact_copy: Path) -> None:
    manifest = _manifest(artifact_copy)
    manifest["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0"}
    _write_manifest(artifact_copy, manifest)
    with pytest.raises(ArtifactError, match="outside the folder"):
        load_artifact(artifact_copy)


def test_external_locations_reader_matches_onnx(tiny_llama: Path) -> None:
    import onnx

    from runtime.artifact import external_data_locations

    model = onnx.load(str(tiny_llama / "model.onnx"), load_external_data=False)
    expected = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    assert external_data_locations(tiny_llama / "model.onnx") == expected == {"model.onnx.data"}


def test_inspect_table(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tiny_llama)]) == 0
    out = capsys.readouterr().out
    for needle in (
        "architecture  llama",
        "kv_mode concat",
        "past_key_values.{i}.key",
        "× 2 layers",
        "model.onnx.data",
        "precision     fp32",
    ):
        assert needle in out
