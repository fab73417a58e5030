"""Servers for the serve tests: uvicorn in a thread on a port the OS picks, stopped at the end."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from runtime.serve import BackgroundServer
from tests.serve.fake_engine import FakeEngine


@dataclasses.dataclass(frozen=True)
class _LooseSampling:
    """Stands in for SamplingParams where the installed one predates the fields the server passes."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()


@pytest.fixture
def loose_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.sampling import SamplingParams

    if "min_p" not in {f.name for f in dataclasses.fields(SamplingParams)}:
        monkeypatch.setattr("runtime.serve.app.SamplingParams", _LooseSampling)


@pytest.fixture
def fake_server(loose_sampling: None) -> Iterator[Callable[..., tuple[BackgroundServer, FakeEngine]]]:
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
