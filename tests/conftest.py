"""Shared fixtures: artifacts are converted once per test session and reused across modules."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _own_lmforge_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets an empty lmforge cache folder (verify's shared reference cache), never the
    user's ~/.cache/lmforge, so no test is answered from another's references."""
    folder = tmp_path_factory.mktemp("lmforge-cache")
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``artifact_cache("tiny:llama")`` → path of that source's fp32 artifact, converted once."""
    from exporters.convert import convert

    root = tmp_path_factory.mktemp("artifacts")
    made: dict[str, Path] = {}

    def get(source: str) -> Path:
        if source not in made:
            out = root / source.replace(":", "-").replace("/", "-")
            made[source] = convert(source, out, progress=False)
        return made[source]

    return get


@pytest.fixture(scope="session")
def tiny_llama(artifact_cache: Callable[[str], Path]) -> Path:
    return artifact_cache("tiny:llama")


@pytest.fixture(scope="session")
def smollm2(artifact_cache: Callable[[str], Path]) -> Path:
    return artifact_cache("builtin:smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_torch():  # type: ignore[no-untyped-def]
    """SmolLM2-135M as a PyTorch model + HF tokenizer, loaded once per session (~20 s)."""
    from exporters.sources import load_source

    return load_source("builtin:smollm2-135m")
