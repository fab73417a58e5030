"""Encoder artifacts for these tests, converted once per session (tiny:bert ~5 s, MiniLM ~15 s)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporters.convert import convert

    return Path(convert("tiny:bert", tmp_path_factory.mktemp("enc") / "tiny-bert", progress=False))


@pytest.fixture(scope="session")
def fake_decoder(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny encoder's folder with a manifest that says decoder (the manifest itself is not hashed)."""
    out = tmp_path_factory.mktemp("enc") / "fake-decoder"
    shutil.copytree(tiny_bert, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(model_kind="decoder", kv_mode="concat")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="session")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporters.convert import convert

    return Path(convert("builtin:minilm-l6", tmp_path_factory.mktemp("enc") / "minilm", progress=False))
