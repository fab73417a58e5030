"""`lmforge serve` / `bench-serve` command-line refusals, and mounting the app in another FastAPI app."""

from __future__ import annotations

import importlib.util

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from lmforge.cli import main
from runtime.serve import create_app
from tests.serve.fake_engine import FakeEngine


def test_missing_serve_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", "artifacts/none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'lmforge[serve]'" in err and "uvicorn" in err


@pytest.mark.parametrize("argv, flag", [
    (["serve", "x", "--max-batch", "0"], "--max-batch"),
    (["serve", "x", "--prefill-tokens", "-1"], "--prefill-tokens"),
    (["serve", "x", "--port", "70000"], "--port"),
    (["serve", "x", "--header-timeout", "0"], "--header-timeout"),
    (["serve", "x", "--header-timeout", "nan"], "--header-timeout"),
    (["serve", "x", "--chat-default-max-tokens", "-1"], "--chat-default-max-tokens"),
    (["serve", "x", "--api-workers", "0"], "--api-workers"),
    (["serve", "x", "--api-workers", "2", "--in-process"], "--api-workers"),
    (["serve", "x", "--max-core-restarts", "-1"], "--max-core-restarts"),
    (["bench-serve", "http://127.0.0.1:1", "--rates", "0"], "--rates"),
    (["bench-serve", "http://127.0.0.1:1", "--concurrency", "a"], "--concurrency"),
    (["bench-serve", "http://127.0.0.1:1", "--compare-engine"], "--compare-engine"),
    (["bench-serve", "http://127.0.0.1:1", "--server-threads", "0"], "--server-threads"),
    (["bench-serve", "http://127.0.0.1:1", "--threads", "-1"], "--threads"),
])
def test_bad_flags_are_one_line_errors(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert flag in capsys.readouterr().err


def test_bench_serve_unreachable_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-serve", "http://127.0.0.1:9", "--requests", "1"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_app_mounts_inside_another_fastapi_app() -> None:
    engine = FakeEngine()
    try:
        outer = FastAPI()
        outer.mount("/llm", create_app(engine, served_model_name="m"))
        with TestClient(outer) as client:
            assert client.get("/llm/v1/models").json()["data"][0]["id"] == "m"
            r = client.post("/llm/v1/completions", json={"prompt": [1, 2], "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        engine.close()
