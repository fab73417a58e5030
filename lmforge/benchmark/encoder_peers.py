"""The encoder runners ``lmforge tune`` and ``lmforge bench`` (encoders) time side by side.

* ``lmforge`` — :class:`runtime.Encoder` (``encode_ids``: bucketing, pooling + normalization in the
  graph, ``threads`` intra-op threads, spinning off);
* ``ort`` — a plain ``onnxruntime.InferenceSession`` with *default* options on the unoptimized
  export (the fp32 artifact this one was optimized from, per its manifest), pooled in numpy;
* ``pytorch`` — the source model in ``transformers`` (``AutoModel``, fp32 eager) with the same
  pooling and normalization, i.e. what sentence-transformers computes, ``torch.set_num_threads``.

Each is a callable ``f(ids [batch, seq] int64) -> pooled [batch, dim]`` opened in the calling
process (:func:`open_runner`); every runner gets the same :func:`fixed_ids`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RUNNERS", "PEERS", "fixed_ids", "open_runner", "peer_artifact"]

RUNNERS = ("lmforge", "ort", "pytorch")
PEERS = ("ort", "pytorch")


def fixed_ids(vocab: int, specials: list[int], batch: int, seq: int, seed: int) -> np.ndarray:
    """Deterministic ``[batch, seq]`` token ids; ``specials`` (e.g. [CLS, SEP]) frame each row."""
    rng = np.random.default_rng(seed + 1000 * seq + batch)
    low = 1000 if vocab > 4000 else min(3, vocab - 1)
    ids = rng.integers(low, vocab, size=(batch, seq), dtype=np.int64)
    if len(specials) == 2 and seq >= 2:
        ids[:, 0], ids[:, -1] = specials
    return ids


def open_runner(runner: str, path: str, threads: int) -> Any:
    """A callable ``f(ids [b, s]) -> pooled [b, d]`` for one runner, opened in this process."""
    from runtime.artifact import load_artifact
    from runtime.encoder import Encoder, l2_normalize, pool

    if runner == "lmforge":
        enc = Encoder.load(path, threads=threads)
        return lambda ids: enc.encode_ids(ids.tolist(), batch_size=len(ids))
    art = load_artifact(path, verify_hashes=False)
    block = art.manifest.get("encoder") or {}
    pooling, normalize = block.get("pooling", "mean"), bool(block.get("normalize", False))
    if runner == "ort":
        import onnxruntime as ort

        session = ort.InferenceSession(str(art.model_path), providers=["CPUExecutionProvider"])  # defaults
        names = {i.name for i in session.get_inputs()}

        def run_ort(ids: np.ndarray) -> np.ndarray:
            mask = np.ones_like(ids)
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})[0]
            out = pool(hidden, mask, pooling)
            return l2_normalize(out) if normalize else out

        return run_ort
    if runner == "pytorch":
        import torch

        from parity.encoder_reference import torch_pool
        from parity.reference import load_reference_source

        torch.set_num_threads(threads)
        model = load_reference_source(art.manifest).model

        def run_torch(ids: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                t = torch.from_numpy(ids)
                mask = torch.ones_like(t)
                hidden = model(input_ids=t, attention_mask=mask, token_type_ids=torch.zeros_like(t)).last_hidden_state
                out = torch_pool(hidden, mask, pooling)
                if normalize:
                    out = torch.nn.functional.normalize(out, p=2, dim=1)
                return out.numpy()

        return run_torch
    raise ValueError(runner)


def peer_artifact(art: Any, runner: str) -> tuple[Path | None, str | None]:
    """The artifact a peer runs on: PyTorch on the source (through ``art``'s manifest); the default
    onnxruntime session on the unoptimized export ``art`` was optimized from, or the reason it cannot."""
    if runner == "pytorch":
        return art.path, None
    recorded = (art.manifest.get("optimize") or {}).get("from", {}).get("path")
    if not art.manifest.get("optimize"):
        return art.path, None  # already the unoptimized export
    if recorded and (Path(recorded) / "manifest.json").is_file():
        return Path(recorded), None
    return None, f"the unoptimized export this artifact was made from ({recorded}) is not there"
