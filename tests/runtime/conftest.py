"""Tiny artifacts for the engine tests, converted once per session (~20 s each on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest


def _convert(tmp_path_factory: pytest.TempPathFactory, source: str) -> Path:
    exporters = pytest.importorskip("exporters")
    out = tmp_path_factory.mktemp("artifacts") / source.replace(":", "-")
    return Path(exporters.convert(source, out, progress=False))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert(tmp_path_factory, "tiny:llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert(tmp_path_factory, "tiny:gpt2")


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_artifact(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def shared_path(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny:llama optimized to the shared-buffer contract for the CPU (the slots backend's artifact)."""
    from passes.pipeline import optimize_artifact

    out = tmp_path_factory.mktemp("shared") / "llama-sb"
    optimize_artifact(tiny_llama, out, device="cpu", precision="fp32", kv_mode="shared-buffer", progress=False)
    return out
