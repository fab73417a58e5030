"""lmforge's runtime: load an artifact and generate with onnxruntime, numpy, tokenizers and jinja2 only.

Never imports torch, transformers or onnx, so that a service can run an artifact with ONNX Runtime
alone (``tests/runtime/test_imports.py`` proves it). One :class:`Engine` runs one scheduling loop;
any number of threads (or asyncio tasks) submit requests to it and their requests batch together::

    from runtime import Engine, SamplingParams

    engine = Engine.load("artifacts/smollm2-135m", device="cpu")          # or "cuda"
    texts = engine.generate(["prompt one", "prompt two"], max_new_tokens=64,
                            sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1))
    for piece in engine.stream("prompt", max_new_tokens=64):
        print(piece, end="", flush=True)
    request = engine.submit("prompt", max_new_tokens=64)                  # from any thread
    async for event in request: ...                                      # or from asyncio
    reply = engine.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=64)
    engine.close()                                                        # or `with Engine.load(...)`
"""

from __future__ import annotations

from runtime.artifact import Artifact, load_artifact
from runtime.encoder import Encoder
from runtime.engine import Engine, EngineStats
from runtime.errors import (
    ArtifactError,
    EngineClosedError,
    ExportError,
    GenerationError,
    InvalidRequestError,
    LmforgeError,
    ParityError,
    PassError,
    QueueFullError,
)
from runtime.options import EngineOptions
from runtime.request import FinishReason, GenerationResult, Request, TokenEvent
from runtime.sampling import SamplingParams

__all__ = [
    "Engine",
    "EngineStats",
    "EngineOptions",
    "Encoder",
    "SamplingParams",
    "Request",
    "TokenEvent",
    "GenerationResult",
    "FinishReason",
    "Artifact",
    "load_artifact",
    "LmforgeError",
    "ExportError",
    "PassError",
    "ArtifactError",
    "GenerationError",
    "InvalidRequestError",
    "QueueFullError",
    "EngineClosedError",
    "ParityError",
]
