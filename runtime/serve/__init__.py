"""lmforge's OpenAI-compatible HTTP server (FastAPI + uvicorn + prometheus-client: the ``serve`` extra).

``import runtime`` never imports this package; only code that serves does. ::

    from runtime import Engine
    from runtime.serve import create_app

    engine = Engine.load("artifacts/smollm2-135m")
    app = create_app(engine, served_model_name="smollm2", api_key=None)   # an ASGI app to mount or run

    app = create_app(Encoder.load("artifacts/minilm"))                     # an encoder: /v1/embeddings

``lmforge serve --instances N`` runs N pinned worker processes on one port
(:mod:`runtime.serve.instances`).
"""

from __future__ import annotations

from runtime.serve.app import ServeLimits, ServeState, create_app
from runtime.serve.server import BackgroundServer, serve

__all__ = ["BackgroundServer", "ServeLimits", "ServeState", "create_app", "serve"]
