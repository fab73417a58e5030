"""lmforge's runtime: load an artifact and generate with onnxruntime, numpy, tokenizers and jinja2 only.

Never imports torch, transformers or onnx, so that a service can run an artifact with ONNX Runtime
alone (``tests/runtime/test_imports.py`` proves it). ::

    from runtime import Engine, SamplingParams

    engine = Engine.load("artifacts/smollm2-135m", device="cpu")          # or "cuda"
    texts = engine.generate(["prompt one", "prompt two"], max_new_tokens=64,
                            sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1))
    for piece in engine.stream("prompt", max_new_tokens=64):
        print(piece, end="", flush=True)
    reply = engine.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=64)
    results = engine.generate_results("prompt", 32)     # counts, timings, finish reason
    ids = engine.generate_ids([[1, 2, 3]], 16)           # token ids in, token ids out
"""

from __future__ import annotations

from runtime.artifact import Artifact, load_artifact
from runtime.encoder import Encoder
from runtime.engine import Engine, FinishReason, GenerationResult
from runtime.errors import (
    ArtifactError,
    ExportError,
    GenerationError,
    LmforgeError,
    ParityError,
    PassError,
)
from runtime.sampling import SamplingParams

__all__ = [
    "Engine",
    "Encoder",
    "SamplingParams",
    "GenerationResult",
    "FinishReason",
    "Artifact",
    "load_artifact",
    "LmforgeError",
    "ExportError",
    "PassError",
    "ArtifactError",
    "GenerationError",
    "ParityError",
]
