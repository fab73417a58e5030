"""The split server (an engine core process, HTTP front-ends over pyzmq + msgpack): the same text and
finish as the engine in-process (stop strings cut in the front-end), 429 from the core's queue,
a disconnect that frees the core's slot, and `lmforge serve` supervising its core (killed: the
request in flight fails saying so, /ready is 503 behind a live /health, a new core serves; killed
past --max-core-restarts: exit 1) and running two front-ends on one port with summed counters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from runtime import Engine, SamplingParams
from runtime.serve import BackgroundServer
from runtime.serve.client import CoreClient
from runtime.serve.instances import ModelOptions
from runtime.serve.split import CoreProcess


@pytest.fixture(scope="module")
def split(tiny_llama: Path) -> Iterator[tuple[BackgroundServer, Engine]]:
    """A server over a core with one slot and one queue place; the engine here gives the references."""
    engine = Engine.load(tiny_llama, max_batch=1, max_queue=1)
    with CoreProcess(ModelOptions(str(tiny_llama), max_batch=1, max_queue=1, verify_hashes=False)) as core:
        client = CoreClient(core.addresses, str(tiny_llama))
        server = BackgroundServer(client, served_model_name="tiny").start()
        yield server, engine
        server.stop()
        client.close(drain=False)
    engine.close(drain=False)


def _sample(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return s.value
    raise AssertionError(name)


def test_text_and_stop_strings_match_the_engine(split: tuple[BackgroundServer, Engine]) -> None:
    server, engine = split
    args = dict(temperature=0.9, seed=5, min_new_tokens=20)
    want = engine.submit("Once upon", 20, SamplingParams(**args)).result(timeout=60)
    assert len(want.text) > 6
    stop = want.text[4:6]
    want_stop = engine.submit("Once upon", 20, SamplingParams(**args, stop=(stop,))).result(timeout=60)
    assert want_stop.text == want.text[:want.text.index(stop)]
    body = {"prompt": "Once upon", "max_tokens": 20, "min_tokens": 20, "temperature": 0.9, "seed": 5}
    for extra, ref in (({}, want), ({"stop": [stop]}, want_stop)):
        r = httpx.post(server.url + "/v1/completions", json={**body, **extra}, timeout=60).json()
        assert r["choices"][0]["text"] == ref.text
        assert r["choices"][0]["finish_reason"] == ref.finish_reason.openai
        assert r["usage"]["completion_tokens"] == ref.new_tokens
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, **extra, "stream": True},
                          timeout=60) as s:
            chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text


def test_core_queue_full_is_429_with_retry_after(split: tuple[BackgroundServer, Engine]) -> None:
    """One slot and one queue place in the core: of six requests sent at once, some are refused
    by the core's queue, each with OpenAI's 429 body and Retry-After, and counted as rejected."""
    server, _ = split
    rejected = _sample(server.url, "lmforge_requests_total", {"endpoint": "completions", "outcome": "rejected"})
    body = {"prompt": "Go on", "max_tokens": 300, "min_tokens": 300}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return list(await asyncio.gather(*(c.post(server.url + "/v1/completions", json=body) for _ in range(6))))

    answers = asyncio.run(burst())
    refused = [r for r in answers if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in answers)
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full" for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in answers if r.status_code == 200)
    assert _sample(server.url, "lmforge_requests_total",
                   {"endpoint": "completions", "outcome": "rejected"}) == rejected + len(refused)


def test_disconnect_cancels_in_the_core(split: tuple[BackgroundServer, Engine]) -> None:
    server, engine = split
    labels = {"endpoint": "completions", "outcome": "cancelled"}
    before = _sample(server.url, "lmforge_requests_total", labels)
    body = {"prompt": "Go on and on", "max_tokens": engine.max_context - 64, "stream": True, "min_tokens": 400}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Next", "max_tokens": 4, "min_tokens": 4},
                    timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4  # the one slot was freed
    deadline = time.monotonic() + 10
    while _sample(server.url, "lmforge_requests_total", labels) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sample(server.url, "lmforge_requests_total", labels) == before + 1
    assert _sample(server.url, "lmforge_running_requests") == 0


def _serve(artifact: Path, *args: str) -> tuple[subprocess.Popen[str], str, int]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("LMFORGE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(artifact), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert "lmforge serve:" in line and "engine core pid" in line, line + proc.stderr.read()  # type: ignore[union-attr]
    url = line.split(" on ", 1)[1].split(" ", 1)[0]
    core = int(line.split("engine core pid ", 1)[1].split(",", 1)[0])
    return proc, url, core


def _wait_ready(url: str, want: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/ready").status_code != want:
        assert time.monotonic() < deadline, f"/ready never answered {want}"
        time.sleep(0.05)


def test_a_killed_core_fails_its_requests_and_is_restarted_then_the_server_exits_1(tiny_llama: Path) -> None:
    proc, url, core = _serve(tiny_llama, "--max-core-restarts", "1")
    try:
        body = {"prompt": "Count", "max_tokens": 400, "min_tokens": 400, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(x for x in lines if x.startswith("data: {"))
            os.kill(core, signal.SIGKILL)
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        error = events[-1]["error"]
        assert "engine core process stopped" in error["message"] and error["code"] == "engine_closed"
        assert httpx.get(url + "/health").status_code == 200
        _wait_ready(url, 200)  # a new core
        r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 3, "min_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        pid = int(_sample(url, "lmforge_core_pid"))
        assert pid != core
        os.kill(pid, signal.SIGKILL)  # past --max-core-restarts
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_two_api_workers_share_the_port_and_sum_their_counters(tiny_llama: Path) -> None:
    proc, url, _ = _serve(tiny_llama, "--api-workers", "2")
    try:
        workers = set()
        for _ in range(12):
            with httpx.Client() as c:  # a new connection each: the kernel spreads them
                r = c.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "min_tokens": 2})
            assert r.status_code == 200
            workers.add(r.headers["x-lmforge-worker"])
        assert workers == {"0", "1"}
        ok = {"endpoint": "completions", "outcome": "ok"}
        assert [_sample(url, "lmforge_requests_total", ok) for _ in range(4)] == [12.0] * 4
        assert _sample(url, "lmforge_generation_tokens_total") == 24
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
