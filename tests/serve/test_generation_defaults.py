"""The artifact's sampling defaults (generation_config.json), used by the server for the fields a
request leaves out, as vLLM's ``--generation-config auto``: recorded by the exporter from the
source's generation config, checked by the runtime, applied per field by the server."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime import Engine, SamplingParams
from runtime.artifact import sha256_file
from runtime.sampling import generation_defaults
from runtime.serve import BackgroundServer

DEFAULTS = {"temperature": 0.6, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 6}


def test_the_exporter_records_the_sources_sampling_defaults() -> None:
    transformers = pytest.importorskip("transformers")
    from exporters.sources import _generation_ids

    class Model:
        generation_config = transformers.GenerationConfig(do_sample=True, eos_token_id=2, **DEFAULTS)

    class Config:
        eos_token_id = None

    got = _generation_ids(Model(), Config(), None)
    assert got == {"bos_token_id": None, "eos_token_ids": [2], "pad_token_id": 2, **DEFAULTS}
    Model.generation_config = transformers.GenerationConfig(eos_token_id=2, bos_token_id=1)
    assert set(_generation_ids(Model(), Config(), None)) == {"bos_token_id", "eos_token_ids", "pad_token_id"}


def test_a_default_the_server_cannot_honour_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime.sampling"):
        got = generation_defaults({"temperature": 1e-46, "top_p": 0.9, "top_k": 2**70, "min_p": "x",
                                   "repetition_penalty": None, "max_new_tokens": 0, "eos_token_id": 2})
    assert got == {"top_p": 0.9}
    assert "temperature" in caplog.text and "top_k" in caplog.text and "max_new_tokens" in caplog.text
    assert generation_defaults({}) == {}


@pytest.fixture(scope="module")
def with_defaults(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackgroundServer,
                                                                                                 Engine, list[Any]]]:
    """tiny:llama with sampling defaults in its generation_config.json (the manifest's hash updated)."""
    path = tmp_path_factory.mktemp("defaults") / "tiny"
    shutil.copytree(tiny_llama, path)
    config = path / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **DEFAULTS}))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["generation_config.json"] = {"size": config.stat().st_size, "sha256": sha256_file(config)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    engine = Engine.load(path, max_batch=2)
    seen: list[Any] = []
    submit = engine.submit

    def spy(prompt: Any, max_new_tokens: int = 128, sampling: SamplingParams | None = None, **kw: Any) -> Any:
        seen.append((max_new_tokens, sampling))
        return submit(prompt, max_new_tokens, sampling, **kw)

    engine.submit = spy  # type: ignore[method-assign]
    server = BackgroundServer(engine, served_model_name="tiny").start()
    yield server, engine, seen
    server.stop()
    engine.close(drain=False)


def test_the_server_uses_the_artifacts_defaults_for_omitted_fields(with_defaults) -> None:  # type: ignore[no-untyped-def]
    server, engine, seen = with_defaults
    assert engine.sampling_defaults == DEFAULTS
    messages = [{"role": "user", "content": "Hi"}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "min_tokens": 50}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6  # the artifact's max_new_tokens caps the default
    max_new, params = seen[-1]
    assert max_new == 6
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.6, 0.8, 20, 1.1)
    # a field the request sets wins, field by field; completions keep OpenAI's 16 tokens
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "temperature": 0, "top_k": 0}, timeout=60)
    assert r.status_code == 200, r.text
    max_new, params = seen[-1]
    assert max_new == 16 and (params.temperature, params.top_k, params.top_p) == (0, 0, 0.8)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 9}, timeout=60)
    assert r.status_code == 200 and seen[-1][0] == 9
