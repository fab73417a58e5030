"""passes.encoder_int8 on the tiny BERT: the Attention split is exact, then every weight MatMul is int8."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from passes.encoder_int8 import is_encoder_graph, quantize_encoder_int8, split_attention_projection


@pytest.fixture(scope="module")
def fused(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from passes.pipeline import optimize_artifact

    out = tmp_path_factory.mktemp("enc") / "tiny-bert-fused"
    optimize_artifact(tiny_bert, out, device="cpu", precision="fp32", progress=False)
    return out / "model.onnx"


def _run(model: onnx.ModelProto | str) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200, size=(3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding: the mask must still reach the attention
    return session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                               "token_type_ids": np.zeros_like(ids)})[0] * mask[:, :, None]


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


def test_split_attention_projection_is_exact(fused: Path) -> None:
    model = onnx.load(str(fused))
    assert is_encoder_graph(model)
    before = _ops(model)
    assert before["Attention"] == 2
    reference = _run(model)
    assert split_attention_projection(model) == 2
    after = _ops(model)
    assert after["Attention"] == 0 and after["MultiHeadAttention"] == 2
    assert after["MatMul"] == before["MatMul"] + 2 and after["Split"] == before["Split"] + 2
    np.testing.assert_allclose(_run(model), reference, atol=1e-5)


def test_quantize_encoder_int8_converts_every_weight_matmul(fused: Path, tmp_path: Path) -> None:
    model = onnx.load(str(fused))
    reference = _run(str(fused))
    done = quantize_encoder_int8(model, tmp_path / "model.onnx")
    out = onnx.load(str(tmp_path / "model.onnx"))
    ops = _ops(out)
    inits = {t.name for t in out.graph.initializer}
    weight_matmuls = [n for n in out.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert weight_matmuls == [] and ops["MatMulInteger"] == done["converted_nodes"] >= 2 * 3
    got = _run(str(tmp_path / "model.onnx"))
    cos = (got * reference).sum(-1) / np.maximum(np.linalg.norm(got, axis=-1) * np.linalg.norm(reference, axis=-1),
                                                  1e-9)
    valid = np.abs(reference).sum(-1) > 0
    assert cos[valid].min() > 0.95  # int8 on random weights: close, not equal
    assert np.abs(got - reference).max() > 1e-6  # and really quantized
