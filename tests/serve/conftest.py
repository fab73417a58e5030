"""Servers for the serve tests: uvicorn in a thread on a port the OS picks, stopped at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from runtime.serve import BackgroundServer
from tests.serve.fake_engine import FakeEngine


@pytest.fixture
def fake_server() -> Iterator[Callable[..., tuple[BackgroundServer, FakeEngine]]]:
    """``fake_server(max_batch=.., api_key=..)`` → a started server over a new FakeEngine."""
    made: list[tuple[BackgroundServer, FakeEngine]] = []

    def make(api_key: str | None = None, served_model_name: str | None = None, limits: Any = None,
             **engine_args: Any) -> tuple[BackgroundServer, FakeEngine]:
        engine = FakeEngine(**engine_args)
        server = BackgroundServer(engine, api_key=api_key, served_model_name=served_model_name, limits=limits)
        server.start()
        made.append((server, engine))
        return server, engine

    yield make
    for server, engine in made:
        server.stop()
        engine.close(drain=False)
