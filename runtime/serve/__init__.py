"""lmforge's OpenAI-compatible HTTP server (FastAPI + uvicorn + prometheus-client: the ``serve`` extra).

``import runtime`` never imports this package; only code that serves does. ::

    from runtime import Engine
    from runtime.serve import create_app

    engine = Engine.load("artifacts/smollm2-135m")
    app = create_app(engine, served_model_name="smollm2", api_key=None)   # an ASGI app to mount or run

    app = create_app(Encoder.load("artifacts/minilm"))                     # an encoder: /v1/embeddings

``lmforge serve`` runs a decoder as separate processes (:mod:`runtime.serve.split`): an engine
core that owns the engine and its loop (:mod:`runtime.serve.core`) and ``--api-workers N`` HTTP
front-ends, each the same app over a :class:`runtime.serve.client.CoreClient`, talking over
pyzmq + msgpack (:mod:`runtime.serve.transport`). The engine in its own process, for a service
of your own::

    from runtime.serve.client import CoreClient
    from runtime.serve.instances import ModelOptions
    from runtime.serve.split import CoreProcess

    core = CoreProcess(ModelOptions("artifacts/smollm2-135m")).start()
    app = create_app(CoreClient(core.addresses, "artifacts/smollm2-135m"))   # core.stop() at the end

``lmforge serve --instances N`` runs N whole servers (each its own engine) on one port
(:mod:`runtime.serve.instances`).
"""

from __future__ import annotations

from runtime.serve.app import ServeLimits, ServeState, create_app
from runtime.serve.server import BackgroundServer, serve

__all__ = ["BackgroundServer", "ServeLimits", "ServeState", "create_app", "serve"]
