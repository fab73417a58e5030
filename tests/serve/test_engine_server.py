"""The server over the real Engine: the `openai` client gets the Engine's greedy text (tiny:llama fast,
SmolLM2-135M slow), concurrency, the context-length refusal, disconnects, metrics, and `lmforge serve`
as a process that drains on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

openai = pytest.importorskip("openai")

from runtime import Engine, SamplingParams  # noqa: E402
from runtime.serve import BackgroundServer  # noqa: E402

if not hasattr(Engine, "submit"):
    pytest.skip("needs the continuous-batching Engine (Engine.submit)", allow_module_level=True)

PROMPTS = ["The capital of France is", "Hello", "def f(x):\n    return", "Zwölf Boxkämpfer jagen"]
CHATS = [[{"role": "user", "content": "Hi there!"}],
         [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}]]


@pytest.fixture(scope="module", params=["in-process", "split"])
def served(tiny_llama: Path, request: pytest.FixtureRequest) -> Iterator[tuple[BackgroundServer, Engine]]:
    """The app over the engine in this process, and over an engine core process (the engine
    returned then is a second one, in this process, that the tests take their references from)."""
    engine = Engine.load(tiny_llama, max_batch=4, max_queue=32)
    if request.param == "in-process":
        server = BackgroundServer(engine, served_model_name="tiny").start()
        yield server, engine
        server.stop()
        engine.close(drain=False)
        return
    from runtime.serve.client import CoreClient
    from runtime.serve.instances import ModelOptions
    from runtime.serve.split import CoreProcess

    with CoreProcess(ModelOptions(str(tiny_llama), max_batch=4, max_queue=32, verify_hashes=False)) as core:
        client = CoreClient(core.addresses, str(tiny_llama))
        server = BackgroundServer(client, served_model_name="tiny").start()
        yield server, engine
        server.stop()
        client.close(drain=False)
        engine.close(drain=False)


def _client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _greedy(engine: Engine, prompt: str | list[int], n: int) -> str:
    return engine.submit(prompt, max_new_tokens=n).result(timeout=60).text


def test_openai_client_gets_the_engines_greedy_text(served: tuple[BackgroundServer, Engine]) -> None:
    server, engine = served
    client = _client(server)
    for prompt in PROMPTS:
        want = _greedy(engine, prompt, 12)
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == want
        assert out.usage.prompt_tokens == len(engine.encode(prompt))
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want
    for messages in CHATS:
        want = _greedy(engine, engine.chat_ids(messages), 12)
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert out.choices[0].message.content == want
        assert out.choices[0].finish_reason in ("stop", "length")
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].usage.prompt_tokens == len(engine.chat_ids(messages))


def test_seeded_sampling_is_reproducible_over_http(served: tuple[BackgroundServer, Engine]) -> None:
    server, _ = served
    client = _client(server)
    args = dict(model="tiny", prompt="Once upon", max_tokens=10, temperature=0.9, top_p=0.9, seed=11)
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


def test_eight_concurrent_streaming_clients(served: tuple[BackgroundServer, Engine]) -> None:
    server, engine = served
    client = _client(server)
    prompts = [f"Request number {i} says" for i in range(8)]
    want = {i: _greedy(engine, p, 16) for i, p in enumerate(prompts)}
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=16, temperature=0,
                                               stream=True)
            got[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except BaseException as exc:  # noqa: BLE001 — asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == want


def test_prompt_longer_than_the_context_is_400_naming_both(served: tuple[BackgroundServer, Engine]) -> None:
    server, engine = served
    ctx = engine.max_context
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a" * (ctx - 4), "max_tokens": 10})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and str(ctx) in err["message"]
    assert str(len(engine.encode("a" * (ctx - 4)))) in err["message"] and "10" in err["message"]


def test_a_request_that_exactly_fills_the_context_is_served(served: tuple[BackgroundServer, Engine]) -> None:
    """prompt + max_tokens == the context: 200 with every token; one more: the context-length 400."""
    server, engine = served
    ctx = engine.max_context
    prompt = [(7 * i) % 300 + 3 for i in range(ctx - 10)]
    body = {"prompt": prompt, "max_tokens": 10, "min_tokens": 10, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": ctx - 10, "completion_tokens": 10, "total_tokens": ctx}
    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 11}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(served: tuple[BackgroundServer, Engine]) -> None:
    """A chat request without max_tokens gets the rest of the context (below the server's default
    cap here): prompt + default == the context exactly, which the engine must accept."""
    server, engine = served
    messages = [{"role": "user", "content": "Tell me everything."}]
    prompt = len(engine.chat_ids(messages))
    assert engine.max_context - prompt < server.state.limits.chat_default_max_tokens  # type: ignore[operator]
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": messages, "min_tokens": engine.max_context, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == engine.max_context - prompt
    assert out["choices"][0]["finish_reason"] == "length"
    want = engine.submit(engine.chat_ids(messages), engine.max_context - prompt,
                         SamplingParams(min_new_tokens=engine.max_context)).result(timeout=120).text
    assert out["choices"][0]["message"]["content"] == want


def test_disconnect_mid_stream_cancels_and_metrics_show_it(tiny_llama: Path) -> None:
    engine = Engine.load(tiny_llama, max_batch=1, max_queue=4)
    try:
        with BackgroundServer(engine) as server:
            before = _cancelled(server)
            body = {"prompt": "Go on and on", "max_tokens": engine.max_context - 64, "stream": True, "min_tokens": 400}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
                seen = 0
                for line in r.iter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 3:
                        break
            ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Next", "max_tokens": 4}, timeout=30)
            assert ok.status_code == 200  # the only slot was freed
            deadline = time.monotonic() + 10
            while _cancelled(server) == before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _cancelled(server) == before + 1
    finally:
        engine.close(drain=False)


def _cancelled(server: BackgroundServer) -> float:
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            if s.name == "lmforge_requests_total" and s.labels == {"endpoint": "completions", "outcome": "cancelled"}:
                return s.value
    raise AssertionError("lmforge_requests_total{outcome=cancelled} missing")


def test_metrics_count_tokens_and_engine_gauges(served: tuple[BackgroundServer, Engine]) -> None:
    server, _ = served

    def sample(name: str) -> float:
        for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
            for s in family.samples:
                if s.name == name and not s.labels:
                    return s.value
        raise AssertionError(name)

    gen, steps = sample("lmforge_generation_tokens_total"), sample("lmforge_engine_steps_total")
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 5, "min_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert sample("lmforge_generation_tokens_total") == gen + 5
    assert sample("lmforge_engine_steps_total") > steps
    assert sample("lmforge_max_batch") == 4 and sample("lmforge_queue_depth") == 0


def test_lmforge_serve_process_drains_on_sigterm(tiny_llama: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "LMFORGE_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(tiny_llama), "--port", "0",
                             "--drain-timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "lmforge serve:" in line and "API key required" in line, line
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        auth = {"Authorization": "Bearer k"}
        assert httpx.get(url + "/v1/models").status_code == 401
        body = {"prompt": "Count", "max_tokens": 60, "min_tokens": 60, "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
            lines = r.iter_lines()
            first = next(x for x in lines if x.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            events = [x for x in (first, *lines) if x]  # SSE events are separated by blank lines
        chunks = [json.loads(x[6:]) for x in events if x.startswith("data: {")]
        assert events[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_smollm2_chat_over_http(smollm2: Path) -> None:
    engine = Engine.load(smollm2, max_batch=4)
    try:
        with BackgroundServer(engine, served_model_name="smollm2") as server:
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            want = _greedy(engine, engine.chat_ids(messages), 24)
            client = _client(server)
            out = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
            assert out.choices[0].message.content == want and "Paris" in want
            stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
                                                    temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
            out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                            temperature=0)
            assert out.choices[0].text == _greedy(engine, "The capital of France is", 12)
    finally:
        engine.close(drain=False)


def test_bench_serve_on_an_artifact_is_bounded_and_clean(tiny_llama: Path, tmp_path: Path) -> None:
    from lmforge.cli import main

    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    assert main(["bench-serve", str(tiny_llama), "--concurrency", "1,4", "--rates", "inf", "--requests", "8",
                 "--prompt-len", "32", "--new-tokens", "16", "--max-seconds", "8", "--compare-engine",
                 "--max-batch", "4", "--json", str(out)]) == 0
    assert time.perf_counter() - t0 < 30
    report = json.loads(out.read_text())
    kinds = {p["kind"] for p in report["results"]}
    assert kinds == {"http", "engine (in-process)", "engine (in-process, after)"} and len(report["results"]) == 9
    for p in report["results"]:
        assert p["errors"] == {} and p["completed"] >= 1 and p["output_tokens"] == 16 * p["completed"]
        assert p["ttft_ms"]["p50"] > 0 and p["itl_ms"]["p99"] >= p["itl_ms"]["p50"]
