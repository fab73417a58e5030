"""Hostile requests against the server over a fake engine: each gets a 4xx OpenAI body (or a 500
that is counted), on a connection that stays open; slow headers are cut off."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.serve import ServeLimits
from runtime.serve import server as server_module
from tests.serve.fake_engine import openai_error as _error

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def _count(server, endpoint: str, outcome: str) -> float:  # type: ignore[no-untyped-def]
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            if s.name == "lmforge_requests_total" and s.labels == {"endpoint": endpoint, "outcome": outcome}:
                return s.value
    raise AssertionError(f"lmforge_requests_total{{{endpoint}, {outcome}}} missing")


def _exchange(url: str, *bodies: bytes, path: str = "/v1/completions") -> list[tuple[int, dict, dict]]:  # type: ignore[type-arg]
    """POST each body in turn on ONE keep-alive connection: (status, headers, JSON body) each.
    Fails when the server closes the connection before the last answer."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    out = []
    with socket.create_connection((host, port), timeout=10) as sock:
        buf = b""
        for body in bodies:
            sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection"
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
            size = int(headers["content-length"])
            while len(buf) < size:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection mid-body"
                buf += chunk
            payload, buf = buf[:size], buf[size:]
            out.append((int(lines[0].split()[1]), headers, json.loads(payload)))
            assert headers.get("connection", "").lower() != "close", headers
    return out


def test_n_above_the_queue_is_a_400_not_a_retry(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server(max_queue=8)
    for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 2}), ("/v1/chat/completions", CHAT)):
        r = httpx.post(server.url + path, json={**body, "n": 12})
        e = _error(r, 400)
        assert e["param"] == "n" and "8" in e["message"] and "max-queue" in e["message"]
        assert "retry-after" not in r.headers
        ok = httpx.post(server.url + path, json={**body, "n": 8, "temperature": 0})  # the queue's size fits
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 8


def test_a_lone_surrogate_is_an_encodable_error_on_a_kept_connection(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server()
    hostile = [b'{"model": "\\ud800", "prompt": "Hi", "max_tokens": 2}',
               b'{"prompt": "\\udfff", "max_tokens": 2}',
               b'{"prompt": "Hi", "max_tokens": 2, "stop": ["\\ud800"]}',
               b'{"prompt": "Hi", "max_tokens": 2, "user": "\\ud800x"}']
    normal = b'{"prompt": "Hi", "max_tokens": 2, "temperature": 0}'
    answers = _exchange(server.url, *[x for h in hostile for x in (h, normal)])
    for (status, _, body), (ok, _, good) in zip(answers[::2], answers[1::2]):
        assert status in (400, 404) and "surrogate" in body["error"]["message"], body
        assert ok == 200 and good["choices"][0]["text"]
    chat = b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'
    (status, _, body), = _exchange(server.url, chat, path="/v1/chat/completions")
    assert status == 400 and body["error"]["param"] == "messages"
    assert _count(server, "completions", "error") == 0


@pytest.mark.parametrize("depth", [100_000, 2_000, 200])
def test_deeply_nested_json_is_a_400(fake_server, depth: int) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server()
    nested = b"[" * depth + b"]" * depth
    body = b'{"prompt": "Hi", "max_tokens": 2, "logit_bias": {"1": ' + nested + b"}}"
    (status, _, err), (ok, _, _) = _exchange(server.url, body, b'{"prompt": "Hi", "max_tokens": 2}')
    assert status == 400 and "nest" in err["error"]["message"] and ok == 200
    assert _count(server, "completions", "error") == 0


def test_an_unexpected_failure_is_a_counted_500_on_a_kept_connection(fake_server,  # type: ignore[no-untyped-def]
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server, engine = fake_server()

    def broken(_messages: object) -> list[int]:
        raise RuntimeError("a bug in the template code")

    monkeypatch.setattr(engine, "chat_ids", broken)
    before = _count(server, "chat", "error")
    chat = json.dumps(CHAT).encode()
    (status, _, body), (again, _, _) = _exchange(server.url, chat, chat, path="/v1/chat/completions")
    assert status == again == 500 and body["error"]["type"] == "server_error"
    assert _count(server, "chat", "error") == before + 2


def test_image_parts_are_refused_by_name(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server()
    parts = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    e = _error(httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": parts}], "max_tokens": 3}), 400)
    assert e["param"] == "messages" and "image_url" in e["message"] and "not supported" in e["message"]
    assert "valid string" not in e["message"]
    e = _error(httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": [{"type": "text"}]}], "max_tokens": 3}), 400)
    assert e["param"] == "messages" and "text" in e["message"]


def test_head_on_health_and_ready(fake_server) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server(api_key="k")
    assert httpx.head(server.url + "/health").status_code == 200
    assert httpx.head(server.url + "/ready", headers={"Authorization": "Bearer k"}).status_code == 200


def _slow_headers(url: str, pause_s: float, limit_s: float) -> float:
    """Send a request's headers one byte every ``pause_s``; the seconds until the server hung up."""
    parts = urlsplit(url)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    t0 = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=limit_s) as sock:
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return time.monotonic() - t0
            sock.settimeout(pause_s)
            try:
                if sock.recv(1024) == b"":
                    return time.monotonic() - t0
            except TimeoutError:
                pass
            if time.monotonic() - t0 > limit_s:
                break
    raise AssertionError(f"the server still read headers after {limit_s} s")


PARSERS = ["h11", pytest.param("httptools", marks=pytest.mark.skipif(
    not server_module.HAVE_HTTPTOOLS, reason="httptools is not installed"))]


@pytest.mark.parametrize("parser", PARSERS)
def test_slow_headers_are_cut_off(fake_server, monkeypatch: pytest.MonkeyPatch, parser: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(server_module, "HTTP_PARSER", parser)
    server, _ = fake_server(limits=ServeLimits(header_timeout_s=1.0))
    assert issubclass(server.server.config.http, server_module.HeaderTimeoutH11Protocol if parser == "h11"
                      else server_module.HeaderTimeoutHttpToolsProtocol)
    took = _slow_headers(server.url, pause_s=0.2, limit_s=8.0)
    assert 0.9 <= took < 3.0, took
    # an idle connection that never sends a byte is cut off the same way
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=8) as sock:
        t0 = time.monotonic()
        assert sock.recv(1024) == b"" and time.monotonic() - t0 < 3.0
    # a prompt client on a kept connection is not affected: requests after the timeout still work
    body = b'{"prompt": "Hi", "max_tokens": 2}'
    with httpx.Client() as client:
        for _ in range(3):
            assert client.post(server.url + "/v1/completions", content=body).status_code == 200
            time.sleep(0.6)
    # after a response on a kept connection, the next request's headers are timed again
    with socket.create_connection((parts.hostname, parts.port), timeout=8) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # the whole response: status line, headers, JSON body
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # and never the rest
        t0 = time.monotonic()
        assert sock.recv(1024) == b"" and 0.5 <= time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("parser", PARSERS)
def test_oversized_headers_are_a_400_and_pipelined_requests_are_answered(  # type: ignore[no-untyped-def]
        fake_server, monkeypatch: pytest.MonkeyPatch, parser: str) -> None:
    monkeypatch.setattr(server_module, "HTTP_PARSER", parser)
    server, _ = fake_server(limits=ServeLimits(header_timeout_s=2.0))
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=8) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(40):  # 40 KiB of headers that never end
                sock.sendall(b"X-Big: " + b"a" * 1014 + b"\r\n")
        except OSError:
            pass  # closed while sending
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    # two requests in one write (pipelined): both answered, in order, on the kept connection
    with socket.create_connection((parts.hostname, parts.port), timeout=8) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while answer.count(b"HTTP/1.1 200") < 2 or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert b'{"status":"ok"}' in answer and b'"object":"list"' in answer.replace(b" ", b"")


@pytest.mark.parametrize("temperature", [0, 0.7])
@pytest.mark.parametrize(("field", "value"), [
    ("top_k", 2**70), ("min_tokens", 2**70), ("seed", 2**64), ("max_tokens", 2**70), ("n", 2**70),
    ("logprobs", 2**70), ("best_of", 2**70), ("top_k", -(2**70)), ("min_tokens", -1),
    ("repetition_penalty", 1e-46), ("repetition_penalty", 1e-300), ("repetition_penalty", 1e308),
    ("top_p", 1e-46), ("min_p", 1e-46), ("presence_penalty", 1e-46), ("frequency_penalty", -1e-46),
    ("temperature", 1e-46), ("temperature", 1e308),
])
def test_values_the_sampler_cannot_hold_are_400_naming_the_field(fake_server, field: str, value: object,  # type: ignore[no-untyped-def]
                                                                 temperature: float) -> None:
    server, engine = fake_server()
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": temperature, field: value}
    e = _error(httpx.post(server.url + "/v1/completions", json=body), 400)
    assert e["param"] == field, e
    assert not engine.submitted
