"""``lmforge inspect``: the step model and the batch guidance of quantized CUDA artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.cmd_inspect import BATCH_GUIDANCE, render
from runtime import step_graph
from runtime.artifact import Artifact


def _manifest(precision: str, device: str, step: bool) -> dict[str, Any]:
    io = step_graph.step_io(320) if step else {"inputs": [], "outputs": []}
    manifest: dict[str, Any] = {
        "format_version": 1, "source": {"ref": "tiny:llama", "kind": "tiny", "sha256": "0" * 64},
        "architecture": {"name": "llama", "hf_model_type": "llama", "layers": 2, "vocab": 320},
        "precision": precision, "device": device, "kv_mode": "shared-buffer" if step else "concat",
        "io": {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}, *io["inputs"]],
               "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 320]}, *io["outputs"]]},
        "files": {"model.onnx": {"size": 10, "sha256": "0" * 64}},
    }
    if step:
        manifest["step"] = step_graph.manifest_entry()
    return manifest


def test_the_step_model_is_one_line_not_twenty() -> None:
    text = render(Artifact(path=Path("/a"), manifest=_manifest("fp16", "cuda", step=True)))
    assert f"step model    format {step_graph.FORMAT}, id history of 32 steps" in text
    n_inputs = len(step_graph.step_io(320)["inputs"])
    assert "lmforge_step.*" in text and f"{n_inputs} tensors of the step model" in text
    assert "lmforge_step.temperature" not in text
    assert "batch sizes" not in text  # fp16: nothing to say


def test_quantized_cuda_artifacts_say_which_batch_sizes_they_suit() -> None:
    text = render(Artifact(path=Path("/a"), manifest=_manifest("int4", "cuda", step=True)))
    assert f"batch sizes   int4 {BATCH_GUIDANCE['int4']}" in text
    assert "batch sizes" not in render(Artifact(path=Path("/a"), manifest=_manifest("int4", "cpu", step=False)))
