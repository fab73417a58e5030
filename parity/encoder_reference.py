"""PyTorch reference embeddings for an encoder: what sentence-transformers computes, without it.

``transformers``' model (the ``LoadedSource`` of :mod:`exporters.sources`, fp32 eager) → the
last hidden state → the same pooling as the artifact (mean / cls / max / mean_sqrt_len over the
attention mask) → L2 normalization when the model's configuration has a ``Normalize`` module.
Tokenized by the source's Hugging Face tokenizer, truncated at the same maximum length, so a
tokenizer that the artifact saved differently would show up as a parity failure.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["reference_embeddings", "torch_pool"]

log = logging.getLogger(__name__)


def torch_pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """sentence-transformers' ``Pooling`` module on torch tensors ``[b, s, d]``, ``[b, s]``."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "lasttoken":  # sentence-transformers: flip the mask, the first 1 from the end
        values, indices = mask.flip(1).max(1)
        indices = torch.where(values == 0, mask.shape[1] - 1, indices)
        last = mask.shape[1] - indices - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    if pooling == "max":
        return torch.where(m > 0, hidden, torch.full_like(hidden, -1e9)).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    counts = torch.clamp(m.sum(dim=1), min=1e-9)
    if pooling == "mean":
        return summed / counts
    if pooling == "mean_sqrt_len":
        return summed / torch.sqrt(counts)
    raise ValueError(pooling)


def reference_embeddings(loaded: Any, texts: Sequence[str], pooling: str, normalize: bool, max_length: int,
                         batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """Pooled fp32 embeddings ``[n, d]`` of ``texts`` from the PyTorch model in ``loaded``."""
    import torch
    from tqdm import tqdm

    from exporters.export import encoder_input_names

    model, tokenizer = loaded.model, loaded.tokenizer
    names = encoder_input_names(loaded)  # what the artifact's graph takes (no token types for RoBERTa …)
    out: list[np.ndarray] = []
    starts = range(0, len(texts), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="PyTorch reference", unit="batch", disable=not progress, file=sys.stderr):
            batch = list(texts[start:start + batch_size])
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**{k: v for k, v in enc.items() if k in names}).last_hidden_state
            pooled = torch_pool(hidden, enc["attention_mask"], pooling)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out.append(pooled.float().numpy())
    return np.concatenate(out, axis=0)
