"""A real `lmforge serve` process (tiny:llama) against hostile requests: huge, negative, NaN,
infinite and underflowing values in every numeric field of both endpoints, greedy and sampled,
streaming and not, each answered with a 4xx OpenAI-shaped error; then the same server still
answers a normal greedy request with the same text as before, and never answered a 500."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.serve.processes import serve_process, server_errors

RAW = "__raw__"  # a value written into the body as a bare JSON token (NaN, Infinity, 1e400)

INTS = [2**70, -(2**70), 2**63, 2**64, -1, 0.5, 1e-46, "1", [1], f"{RAW}1e400", f"{RAW}NaN", f"{RAW}-Infinity"]
FLOATS = [1e-46, -1e-46, 1e-300, 1e308, -1e308, 2**70, -(2**70), -1, "1", f"{RAW}1e400", f"{RAW}-1e400",
          f"{RAW}NaN", f"{RAW}Infinity"]
VALID = {("top_k", "-1"), ("presence_penalty", "-1"), ("frequency_penalty", "-1"), ("repetition_penalty", repr(2**70))}
SHARED_INTS = ["max_tokens", "top_k", "min_tokens", "seed", "n"]
SHARED_FLOATS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
ENDPOINTS = {
    "/v1/completions": ({"prompt": "Hi", "max_tokens": 6}, SHARED_INTS + ["best_of", "logprobs"]),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6},
                             SHARED_INTS + ["max_completion_tokens", "top_logprobs", "logprobs"]),
}


def _body(base: dict, **fields: object) -> bytes:  # type: ignore[type-arg]
    raw = {k: v[len(RAW):] for k, v in fields.items() if isinstance(v, str) and v.startswith(RAW)}
    text = json.dumps({**base, **{k: (RAW + k if k in raw else v) for k, v in fields.items()}})
    for k, literal in raw.items():
        text = text.replace(json.dumps(RAW + k), literal)
    return text.encode()


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[str]:
    with serve_process(tiny_llama, "--max-batch", "4", "--max-queue", "8", "--header-timeout", "2") as (url, _):
        yield url


def _text(client: httpx.Client, url: str, path: str, base: dict, stream: bool) -> str:  # type: ignore[type-arg]
    body = {**base, "temperature": 0, "min_tokens": 6}
    if not stream:
        r = client.post(url + path, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]
    out = []
    with client.stream("POST", url + path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = (json.loads(line[6:])["choices"] or [{}])[0]
                out.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(out)


def test_hostile_values_get_4xx_and_the_server_serves_on(server: str) -> None:
    t0 = time.monotonic()
    with httpx.Client(timeout=30) as client:
        before = {(p, s): _text(client, server, p, base, s) for p, (base, _) in ENDPOINTS.items()
                  for s in (False, True)}
        assert all(before.values()) and before[("/v1/completions", False)] == before[("/v1/completions", True)]
        sent = 0
        for path, (base, ints) in ENDPOINTS.items():
            cases = [(f, v) for f in ints for v in INTS] + [(f, v) for f in SHARED_FLOATS for v in FLOATS]
            if path == "/v1/completions":
                cases += [("prompt", [2**70]), ("prompt", [-1]), ("prompt", [1e-46]), ("prompt", [[2**64]])]
            for field, value in cases:
                if (field, repr(value)) in VALID:
                    continue
                for mode in ({"temperature": 0}, {"temperature": 0.7, "seed": 1}):
                    for stream in (False, True):
                        body = _body({**base, **mode, "stream": stream}, **{field: value})
                        r = client.post(server + path, content=body, headers={"content-type": "application/json"})
                        sent += 1
                        assert 400 <= r.status_code < 500 and r.status_code != 429, (field, value, r.text)
                        error = r.json()["error"]
                        assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text
        # more than the queue can ever hold, lone surrogates, deep nesting, image parts
        for path, (base, _) in ENDPOINTS.items():
            for body in (_body(base, n=12), _body(base, model="\ud800"), _body(base, user="\udfff"),
                         _body(base, stop=["\ud800"]), _body(base, logit_bias={"1": [[[[[[[[[[]]]]]]]]]]}),
                         json.dumps(base)[:-1].encode() + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
                r = client.post(server + path, content=body, headers={"content-type": "application/json"})
                sent += 1
                assert r.status_code in (400, 404), r.text
                assert r.json()["error"]["message"]
        image = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
        r = client.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": image}]})
        assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]
        assert sent > 500
        after = {(p, s): _text(client, server, p, base, s) for p, (base, _) in ENDPOINTS.items()
                 for s in (False, True)}
    assert after == before
    assert httpx.head(server + "/health").status_code == 200 and httpx.get(server + "/ready").status_code == 200
    assert server_errors(server) == 0  # no 500 was answered
    assert time.monotonic() - t0 < 60


def test_slow_headers_are_disconnected(server: str) -> None:
    parts = urlsplit(server)
    t0 = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.25)
                if sock.recv(64) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        else:
            raise AssertionError("still connected")
    assert 1.8 < time.monotonic() - t0 < 5
    assert httpx.get(server + "/health").status_code == 200
