"""The exported graph reads ``position_ids``: the same tokens at other positions give other logits.

Rotary models see only relative positions inside one prefill, so a batch test alone cannot tell
whether the export wrapper passed ``position_ids`` on; here the positions of the decoded token move
relative to the cached ones (a wrapper that dropped them would derive the same positions either way).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.artifact import load_artifact

MIN_DIFF = 1e-3  # the shifted runs differ by far more; equal graphs agree to ~1e-6


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _empty_past(session: ort.InferenceSession, kv_heads: int, head_dim: int) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((1, kv_heads, 0, head_dim), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_")}


def _run(session: ort.InferenceSession, ids: np.ndarray, positions: np.ndarray, total: int,
         past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), "position_ids": positions, **past}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed)))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_decode_logits_depend_on_position_ids(arch: str, artifact_cache: Callable[[str], Path]) -> None:
    path = artifact_cache(f"tiny:{arch}")
    info = load_artifact(path).architecture
    session = _session(path)
    assert "position_ids" in [i.name for i in session.get_inputs()]
    ids = np.random.default_rng(5).integers(3, info["vocab"], (1, 8), dtype=np.int64)
    prompt, nxt = ids[:, :7], ids[:, 7:]
    got = _run(session, prompt, np.arange(7, dtype=np.int64)[None], 7, _empty_past(session, info["kv_heads"],
                                                                                     info["head_dim"]))
    past = {n.replace("present", "past_key_values"): v for n, v in got.items() if n.startswith("present.")}
    at_7 = _run(session, nxt, np.array([[7]], np.int64), 8, past)["logits"]
    again = _run(session, nxt, np.array([[7]], np.int64), 8, past)["logits"]
    at_12 = _run(session, nxt, np.array([[12]], np.int64), 8, past)["logits"]
    np.testing.assert_allclose(again, at_7, rtol=0, atol=1e-6)  # deterministic: the difference is the position
    diff = float(np.abs(at_12 - at_7).max())
    assert diff > MIN_DIFF, f"{arch}: the decoded token at position 12 vs 7 changes logits by only {diff}"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefill_logits_depend_on_a_gap_in_position_ids(arch: str, artifact_cache: Callable[[str], Path]) -> None:
    """The last prompt token moved 5 positions away from the others: its logits change."""
    path = artifact_cache(f"tiny:{arch}")
    info = load_artifact(path).architecture
    session = _session(path)
    ids = np.random.default_rng(6).integers(3, info["vocab"], (1, 7), dtype=np.int64)
    past = _empty_past(session, info["kv_heads"], info["head_dim"])
    plain = np.arange(7, dtype=np.int64)[None]
    gapped = plain.copy()
    gapped[0, -1] += 5
    a = _run(session, ids, plain, 7, past)["logits"]
    b = _run(session, ids, gapped, 7, past)["logits"]
    np.testing.assert_allclose(b[:, :-1], a[:, :-1], rtol=1e-5, atol=1e-5)  # earlier tokens: causal, unchanged
    assert float(np.abs(b[:, -1] - a[:, -1]).max()) > MIN_DIFF
