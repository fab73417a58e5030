"""Real weights: SmolLM2-135M greedy generations and MiniLM sentence embeddings vs PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporters.sources import load_source

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Une recette simple pour faire du pain :",
    "List three prime numbers greater than 100:",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 17 * 23?\nA:",
]
NEW_TOKENS = 32


def ort_greedy(
    session: ort.InferenceSession,
    prompt_ids: list[int],
    new_tokens: int,
    layers: int,
    kv_heads: int,
    head_dim: int,
    eos: set[int],
) -> list[int]:
    """A plain concat-KV greedy loop over ORT (the runtime issue builds the real one)."""
    ids = np.array([prompt_ids], dtype=np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    past = {
        f"past_key_values.{i}.{k}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
        for i in range(layers)
        for k in ("key", "value")
    }
    out_names = [o.name for o in session.get_outputs()]
    generated: list[int] = []
    for _ in range(new_tokens):
        outs = dict(
            zip(out_names, session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}))
        )
        token = int(outs["logits"][0, -1].argmax())
        generated.append(token)
        if token in eos:
            break
        past = {f"past_key_values.{i}.{k}": outs[f"present.{i}.{k}"] for i in range(layers) for k in ("key", "value")}
        ids = np.array([[token]], dtype=np.int64)
        pos = pos[:, -1:] + 1
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
    return generated


def test_smollm2_greedy_matches_transformers(smollm2: Path, smollm2_torch: Any) -> None:
    import json

    manifest = json.loads((smollm2 / "manifest.json").read_text())
    arch = manifest["architecture"]
    eos = set(manifest["generation"]["eos_token_ids"])
    loaded = smollm2_torch
    assert loaded.sha256 == manifest["source"]["sha256"]
    session = ort.InferenceSession(str(smollm2 / "model.onnx"), providers=["CPUExecutionProvider"])
    for prompt in PROMPTS:
        enc = loaded.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ref = loaded.model.generate(
                **enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=manifest["generation"]["pad_token_id"]
            )
        ref_new = ref[0, enc["input_ids"].shape[1]:].tolist()
        got = ort_greedy(
            session, enc["input_ids"][0].tolist(), NEW_TOKENS, arch["layers"], arch["kv_heads"], arch["head_dim"], eos
        )
        assert got == ref_new, (
            f"prompt {prompt!r}: ONNX {loaded.tokenizer.decode(got)!r} vs torch {loaded.tokenizer.decode(ref_new)!r}"
        )
        assert len(got) >= 8


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_minilm_sentence_embeddings_match(artifact_cache: Callable[[str], Path]) -> None:
    path = artifact_cache("builtin:minilm-l6")
    loaded = load_source("builtin:minilm-l6")
    sentences = [
        "A man is eating food.",
        "Ein Mann isst etwas.",
        "The new movie is awesome, I loved every minute of it!",
        "Paris",
    ]
    enc = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**enc).last_hidden_state.numpy()
    ref = _mean_pool(hidden, enc["attention_mask"].numpy())
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    feed: dict[str, Any] = {k: v.numpy() for k, v in enc.items()}
    got_hidden = session.run(["last_hidden_state"], feed)[0]
    got = _mean_pool(got_hidden, feed["attention_mask"])
    assert np.abs(got - ref).max() <= 1e-4
    # and the embeddings behave like sentence embeddings: the paraphrase is the nearest
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2]
