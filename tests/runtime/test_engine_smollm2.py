"""Engine greedy generation equals transformers on SmolLM2-135M real weights (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from runtime import Engine

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def is_prime(n):\n",
    "Schreibe einen kurzen Satz über den Winter:",
    "1, 1, 2, 3, 5, 8,",
    "The most important lesson I learned from",
]


def test_engine_greedy_equals_transformers(smollm2: Path, smollm2_torch: Any) -> None:
    loaded = smollm2_torch
    engine = Engine.load(smollm2, device="cpu")
    prompt_ids = [engine.encode(p) for p in PROMPTS]
    for ids, prompt in zip(prompt_ids, PROMPTS):
        assert ids == loaded.tokenizer(prompt)["input_ids"]  # the runtime's tokenizer agrees
    refs = []
    for ids in prompt_ids:
        with torch.no_grad():
            out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=24, do_sample=False, pad_token_id=engine.pad_token_id)
        refs.append(out[0, len(ids):].tolist())
    single = [engine.generate_ids([ids], max_new_tokens=24)[0] for ids in prompt_ids]
    assert single == refs
    batched = engine.generate_ids(prompt_ids, max_new_tokens=24)  # one left-padded batch
    assert batched == single
    # the text API decodes exactly the greedy ids (EOS excluded)
    texts = engine.generate(PROMPTS[:2], max_new_tokens=24)
    for text, ids in zip(texts, single[:2]):
        assert text == engine.decode([t for t in ids if t not in engine.eos_token_ids])
