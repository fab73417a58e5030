"""The HTTP server over a fake engine: OpenAI shapes, streaming, every error, metrics, auth, disconnects."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.serve import ServeLimits
from tests.serve.fake_engine import expected_text
from tests.serve.fake_engine import openai_error as _error

openai = pytest.importorskip("openai")


def _ids(text: str) -> list[int]:
    return list(text.encode())


def _client(server, key: str = "none") -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _sse(lines: list[str]) -> list[object]:
    out: list[object] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _metrics(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _requests(m, endpoint: str, outcome: str) -> float:  # type: ignore[no-untyped-def]
    return m.get(("lmforge_requests_total", (("endpoint", endpoint), ("outcome", outcome))), 0.0)


def test_completion_matches_engine_output(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server()
    client = _client(server)
    out = client.completions.create(model="fake-model", prompt="Hello", max_tokens=7, temperature=0)
    assert out.choices[0].text == expected_text(_ids("Hello"), 7)
    assert out.choices[0].finish_reason == "length"
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.created > 0
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 7, 12)
    streamed = client.completions.create(model="fake-model", prompt="Hello", max_tokens=7, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(_ids("Hello"), 7)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    # token-id prompts, and a list of prompts
    out = client.completions.create(model="fake-model", prompt=[[1, 2, 3], [4, 5]], max_tokens=3, temperature=0)
    assert [c.text for c in out.choices] == [expected_text([1, 2, 3], 3), expected_text([4, 5], 3)]
    assert out.usage.prompt_tokens == 5


def test_chat_matches_engine_output(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, engine = fake_server()
    client = _client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = expected_text(engine.chat_ids(messages), 5)
    out = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=5, temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.usage.prompt_tokens == len(engine.chat_ids(messages))
    chunks = list(client.chat.completions.create(model="fake-model", messages=messages, max_completion_tokens=5,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # content as a list of text parts
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    out = client.chat.completions.create(model="fake-model", messages=parts, max_tokens=4, temperature=0)
    assert out.choices[0].message.content == expected_text(engine.chat_ids([{"role": "user", "content": "Hi"}]), 4)


def test_chat_default_max_tokens_fills_the_context(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, engine = fake_server(max_context=64)
    messages = [{"role": "user", "content": "Hi"}]
    out = _client(server).chat.completions.create(model="fake-model", messages=messages, temperature=0)
    assert out.usage.completion_tokens == 64 - len(engine.chat_ids(messages))


def test_raw_sse_stream_ends_with_done(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server()
    body = {"model": "fake-model", "prompt": "ab", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])  # include_usage off: no usage key at all


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("with_usage", [False, True])
def test_text_chunk_template_is_the_chunk_json(chat: bool, with_usage: bool) -> None:
    """A streamed text delta rendered from the per-stream template is, character for character,
    the chunk object's JSON event."""
    from runtime.serve.app import _sse as render
    from runtime.serve.app import _TextChunks
    from runtime.serve.protocol import chat_chunk, completion_chunk

    rid, model, created = 'cmpl-"x\\y', "m\u00e9/\"q\"\n", 1765000000
    chunks = _TextChunks(chat, rid, model, created, with_usage)
    texts = ("", "a", " hello", '"quoted" \\ back', "tab\tnl\nnul\x00\x1f", "é日本🙂", "\u2028\u2029", "</script>")
    for index in (0, 3, 15):
        for text in texts:
            want = render(chat_chunk(rid, model, created, index, {"content": text}, with_usage=with_usage) if chat
                          else completion_chunk(rid, model, created, index, text, with_usage=with_usage))
            assert chunks(index, text) == want


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_raw_stream_events_with_usage(fake_server, endpoint: str) -> None:  # type: ignore[no-untyped-def]
    """Every event its own ``data:`` line, in order: (chat: the role), the text, the finish, the
    usage, ``[DONE]`` — also where several go out in one write."""
    server, engine = fake_server()
    body: dict[str, object] = {"model": "fake-model", "max_tokens": 3, "stream": True, "temperature": 0,
                               "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "q"}]
    else:
        body["prompt"] = "ab"
    with httpx.stream("POST", f"{server.url}/v1/{'chat/' if endpoint == 'chat' else ''}completions", json=body) as r:
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n") and "\n\n\n" not in raw
    events = _sse(raw.split("\n"))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert len(chunks) == len(events) - 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    texts = chunks[1:-2] if endpoint == "chat" else chunks[:-2]
    if endpoint == "chat":
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        got = "".join(c["choices"][0]["delta"]["content"] for c in texts)
        want = expected_text(engine.chat_ids([{"role": "user", "content": "q"}]), 3)
    else:
        got = "".join(c["choices"][0]["text"] for c in texts)
        want = expected_text(_ids("ab"), 3)
    assert got == want and len(texts) == 3


def test_n_choices_streamed_and_not(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, engine = fake_server()
    client = _client(server)
    out = client.completions.create(model="fake-model", prompt="xy", n=3, max_tokens=4, temperature=0.5, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.text == expected_text(_ids("xy"), 4) for c in out.choices)
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == 6
    assert [r.sampling.seed for r in engine.submitted[-3:]] == [7, 8, 9]
    texts: dict[int, str] = {}
    finished = set()
    for c in client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "q"}], n=2,
                                            max_tokens=4, temperature=0, stream=True):
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finished.add(ch.index)
    want = expected_text(engine.chat_ids([{"role": "user", "content": "q"}]), 4)
    assert texts == {0: want, 1: want} and finished == {0, 1}


@pytest.mark.parametrize("interval", [1, 4])
def test_stream_interval_holds_tokens_per_chunk(fake_server, interval: int) -> None:  # type: ignore[no-untyped-def]
    """--stream-interval N: the first token goes out alone, then chunks of N tokens, then the rest
    with the finish; the text is the same as unstreamed, for every choice."""
    server, engine = fake_server(limits=ServeLimits(stream_interval=interval))
    body = {"model": "fake-model", "prompt": "ab", "max_tokens": 11, "stream": True, "temperature": 0, "n": 2}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = _sse(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    texts: dict[int, list[str]] = {0: [], 1: []}
    for e in events[:-1]:
        assert isinstance(e, dict)
        for c in e["choices"]:
            if c["text"]:
                texts[c["index"]].append(c["text"])
    want = expected_text(_ids("ab"), 11)
    for parts in texts.values():
        assert "".join(parts) == want
        # the first token alone (the fake engine emits one a step), then chunks of at least
        # `interval` (more when the reader fell behind), the remainder with the finish
        sizes = [len(p) for p in parts]
        assert sizes[0] == 1 and all(n >= interval for n in sizes[1:-1]), sizes
        if interval > 1:
            assert len(sizes) <= 1 + -(-10 // interval), sizes


def test_eight_concurrent_streams(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server(max_batch=4, max_queue=8, step_s=0.005)
    client = _client(server)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            stream = client.completions.create(model="fake-model", prompt=f"prompt {i}", max_tokens=10 + i,
                                               temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except BaseException as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results == {i: expected_text(_ids(f"prompt {i}"), 10 + i) for i in range(8)}


def test_request_errors_are_openai_shaped(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server(max_context=32)
    url = server.url
    def post(path, **kw):
        return httpx.post(url + path, timeout=10, **kw)
    e = _error(post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert e["code"] == "invalid_json"
    e = _error(post("/v1/completions", json=[1, 2]), 400)
    e = _error(post("/v1/completions", json={"prompt": "a", "max_tokens": "5"}), 400)
    assert e["param"] == "max_tokens" and e["type"] == "invalid_request_error"
    e = _error(post("/v1/completions", json={"prompt": "a", "temperature": 3}), 400)
    assert e["param"] == "temperature"
    e = _error(post("/v1/completions", json={"max_tokens": 4}), 400)
    assert e["param"] == "prompt"
    e = _error(post("/v1/chat/completions", json={"messages": []}), 400)
    assert e["param"] == "messages"
    e = _error(post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert "role" in e["message"]
    e = _error(post("/v1/completions", json={"model": "gpt-4", "prompt": "a"}), 404)
    assert e["code"] == "model_not_found" and e["param"] == "model"
    e = _error(post("/v1/completions", json={"prompt": "a", "logprobs": 2}), 400)
    assert e["param"] == "logprobs" and e["code"] == "unsupported_parameter"
    e = _error(post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "logprobs": True}),
               400)
    assert e["param"] == "logprobs"
    e = _error(post("/v1/completions", json={"prompt": "a" * 30, "max_tokens": 8}), 400)
    assert e["code"] == "context_length_exceeded" and "32" in e["message"] and "30 prompt tokens" in e["message"]
    assert "8 max_tokens" in e["message"]
    e = _error(post("/v1/completions", json={"prompt": "a", "stop": ["x"] * 9}), 400)
    assert e["param"] == "stop"
    e = _error(post("/v1/completions", json={"prompt": "a", "stop": "y" * 257}), 400)
    e = _error(post("/v1/completions", json={"prompt": "a", "n": 17}), 400)
    assert e["param"] == "n"
    e = _error(post("/v1/completions", json={"prompt": [999]}), 400)
    assert e["param"] == "prompt"
    e = _error(post("/v1/completions", content=b'{"prompt": "a", "temperature": NaN}'), 400)
    assert e["code"] == "invalid_json"
    e = _error(httpx.get(url + "/v1/nothing-here"), 404)
    e = _error(httpx.get(url + "/v1/completions"), 405)
    e = _error(httpx.get(url + "/v1/models/other"), 404)
    m = _metrics(server)
    assert _requests(m, "completions", "invalid") >= 12 and _requests(m, "completions", "not_found") == 1


def test_body_size_is_bounded(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server(limits=ServeLimits(max_body_bytes=1000))
    e = _error(httpx.post(server.url + "/v1/completions", json={"prompt": "a" * 2000}), 413)
    assert e["code"] == "request_too_large"

    def chunked():  # type: ignore[no-untyped-def]
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"a" * 100
        yield b'"}'

    _error(httpx.post(server.url + "/v1/completions", content=chunked()), 413)


def test_queue_full_is_429_with_retry_after(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, engine = fake_server(max_batch=1, max_queue=1, step_s=0.02)
    hold = [engine.submit("x", max_new_tokens=200)]
    time.sleep(0.1)
    hold.append(engine.submit("x", max_new_tokens=200))  # one runs, one waits: the queue is full
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
    e = _error(r, 429)
    assert r.headers["retry-after"] == "3" and e["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        _client(server).completions.create(model="fake-model", prompt="a", max_tokens=2)
    for req in hold:
        req.cancel()
    assert _requests(_metrics(server), "completions", "rejected") == 2


def test_engine_failure_is_500_for_that_request_only(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "FAIL here", "max_tokens": 8})
    e = _error(r, 500)
    assert e["type"] == "server_error" and "simulated" in e["message"]
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "fine", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected_text(_ids("fine"), 3)
    # mid-stream (after the first token): an error event, then [DONE]
    body = {"prompt": "FAIL later", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = _sse(list(r.iter_lines()))
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
    assert sum(1 for e in events if isinstance(e, dict) and e.get("choices")) == 2
    with pytest.raises(openai.APIError):
        list(_client(server).completions.create(model="fake-model", prompt="FAIL", max_tokens=8, stream=True))
    assert _requests(_metrics(server), "completions", "error") == 3


def test_closed_engine_and_draining_are_503(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, engine = fake_server()
    assert httpx.get(server.url + "/ready").status_code == 200
    server.state.start_drain()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a"})
    assert _error(r, 503)["code"] == "draining" and int(r.headers["retry-after"]) >= 1
    assert httpx.get(server.url + "/ready").json() == {"status": "draining"}
    assert httpx.get(server.url + "/health").status_code == 200
    server.state.draining = False
    engine.close(drain=False)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]})
    assert _error(r, 503)["code"] == "engine_closed"
    assert httpx.get(server.url + "/ready").status_code == 503
    assert _requests(_metrics(server), "chat", "unavailable") == 1


def test_drain_lets_streams_in_flight_finish(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, engine = fake_server(step_s=0.01)
    body = {"prompt": "long", "max_tokens": 40, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        server.stop(drain=True, timeout=30)  # what SIGTERM does; returns once the server stopped
        rest = [first, *lines]
    events = _sse(rest)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == expected_text(_ids("long"), 40)
    assert engine.stats().closed


def test_disconnect_mid_stream_frees_the_slot(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, engine = fake_server(max_batch=1, max_queue=4, step_s=0.01)
    body = {"prompt": "endless", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    # the connection is closed: the server cancels the request, and the only slot is free again
    t0 = time.perf_counter()
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "next", "max_tokens": 3, "temperature": 0},
                    timeout=10)
    assert ok.status_code == 200 and time.perf_counter() - t0 < 1.5  # 200 tokens at 10 ms would be 2 s
    cancelled = engine.submitted[0]
    assert cancelled.cancelled and cancelled.done
    assert cancelled.result().new_tokens < 200
    deadline = time.monotonic() + 5
    while _requests(_metrics(server), "completions", "cancelled") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _requests(_metrics(server), "completions", "cancelled") == 1


def test_disconnect_while_waiting_cancels_a_non_streaming_request(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, engine = fake_server(max_batch=1, step_s=0.01, max_context=1024)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "slow", "max_tokens": 500}, timeout=0.3)
    deadline = time.monotonic() + 5
    while not engine.submitted[0].done and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.submitted[0].cancelled and engine.submitted[0].result().new_tokens < 500


def test_metrics_count_what_was_sent(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server()
    client = _client(server)
    client.completions.create(model="fake-model", prompt="abc", max_tokens=4, temperature=0)
    list(client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                        max_tokens=6, temperature=0, stream=True))
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in ("lmforge_requests", "lmforge_prompt_tokens", "lmforge_generation_tokens",
                 "lmforge_time_to_first_token_seconds", "lmforge_inter_token_latency_seconds",
                 "lmforge_e2e_request_latency_seconds", "lmforge_queue_wait_seconds", "lmforge_queue_depth",
                 "lmforge_running_requests", "lmforge_max_batch"):
        assert name in families, name
    m = _metrics(server)
    assert _requests(m, "completions", "ok") == 1 and _requests(m, "chat", "ok") == 1
    assert m[("lmforge_generation_tokens_total", ())] == 10
    assert m[("lmforge_prompt_tokens_total", ())] == 3 + len("<user>x<assistant>")
    assert m[("lmforge_time_to_first_token_seconds_count", ())] == 2
    assert m[("lmforge_inter_token_latency_seconds_count", ())] == 3 + 5
    assert m[("lmforge_e2e_request_latency_seconds_count", ())] == 2
    assert m[("lmforge_queue_wait_seconds_count", ())] == 2
    assert m[("lmforge_max_batch", ())] == 4 and m[("lmforge_queue_depth", ())] == 0


def test_api_key(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server(api_key="s3cret")
    body = {"prompt": "a", "max_tokens": 2}
    e = _error(httpx.post(server.url + "/v1/completions", json=body), 401)
    assert e["code"] == "invalid_api_key"
    _error(httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    for path in ("/v1/models", "/metrics", "/ready"):
        _error(httpx.get(server.url + path), 401)
    assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").models.list()
    models = _client(server, "s3cret").models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    ok = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_models_and_served_name(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server(served_model_name="tiny", max_context=99)
    data = httpx.get(server.url + "/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == "tiny" and data["data"][0]["max_model_len"] == 99
    assert httpx.get(server.url + "/v1/models/tiny").json()["id"] == "tiny"
    assert httpx.post(server.url + "/v1/completions", json={"model": "fake-model", "prompt": "a"}).status_code == 404
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})  # model may be omitted
    assert ok.status_code == 200 and ok.json()["model"] == "tiny"
