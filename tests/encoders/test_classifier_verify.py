"""``verify`` on re-ranker artifacts: 16 queries × 16 passages against transformers, fp32 and CPU int8,
through the Python API and ``lmforge verify``; a broken graph fails."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from parity.encoder_classifier_verify import verify_classifier
from passes.pipeline import optimize_artifact
from runtime.artifact import sha256_file


@pytest.mark.parametrize("family", ["bert", "xlm-roberta", "modernbert"])
def test_reranker_verifies_in_fp32_and_int8(family: str, artifact_cache: Callable[[str], Path],
                                            tmp_path: Path) -> None:
    src = artifact_cache(f"tiny:{family}-reranker")
    fp32 = verify_classifier(src)
    assert fp32.passed, fp32.reasons
    assert fp32.max_abs_logit < 1e-4 and len(fp32.queries) == 16
    margins = [q["reference_margin"] for q in fp32.queries]
    assert np.median(margins) > 1e-3  # the head's scores differ: the top-1 check compares real choices
    report = optimize_artifact(src, tmp_path / "int8", "cpu", "int8", progress=False)
    # the head (pooler/dense + classifier) stays fp32: with it in int8, ModernBERT's logits moved by 1.2
    assert report.quantization["settings"]["classifier_head"].startswith("fp32")
    int8 = verify_classifier(tmp_path / "int8")
    assert int8.passed, int8.reasons
    assert 0 < int8.max_abs_logit < 0.1  # it is really int8, and close


def test_verify_cli_on_a_reranker_and_a_broken_one(artifact_cache: Callable[[str], Path], tmp_path: Path) -> None:
    from lmforge.cli import main

    src = artifact_cache("tiny:bert-reranker")
    assert main(["-q", "verify", str(src), "--json", str(tmp_path / "v.json")]) == 0
    document = json.loads((tmp_path / "v.json").read_text())
    assert document["kind"] == "classifier" and document["passed"] and document["summary"]["pairs"] == 256
    # the classifier's weight scaled by 1.5: every logit moves, refused
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    model = onnx.load(str(broken / "model.onnx"))
    weight = next(t for t in model.graph.initializer if t.name.endswith("classifier.weight"))
    array = onnx.numpy_helper.to_array(weight) * 1.5
    weight.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), weight.name))
    onnx.save(model, str(broken / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    manifest = json.loads((broken / "manifest.json").read_text())
    for name in ("model.onnx", "model.onnx.data"):
        manifest["files"][name] = {"size": (broken / name).stat().st_size, "sha256": sha256_file(broken / name)}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = verify_classifier(broken)
    assert not result.passed and "max |Δ logit|" in result.reasons[0]
