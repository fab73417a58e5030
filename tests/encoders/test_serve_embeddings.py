"""``/v1/embeddings`` over a real MiniLM artifact: the `openai` client gets ``Encoder.encode``'s vectors
(float and base64), every refusal has its status and OpenAI's body, concurrency, metrics, and the
event loop answering while an encode runs."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from runtime.encoder import Encoder  # noqa: E402
from runtime.serve import BackgroundServer  # noqa: E402

TEXTS = ["A man is eating food.", "Ein Mann isst.", "def f(x):\n    return x * 2", "🙂 ok",
         "The quick brown fox jumps over the lazy dog " * 8]


@pytest.fixture(scope="module")
def served(minilm: Path) -> Iterator[tuple[BackgroundServer, Encoder]]:
    encoder = Encoder.load(minilm, threads=1)
    server = BackgroundServer(encoder, served_model_name="minilm").start()
    yield server, encoder
    server.stop()
    encoder.close()


def _client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_openai_client_gets_the_encoders_vectors(served: tuple[BackgroundServer, Encoder]) -> None:
    server, encoder = served
    client = _client(server)
    want = encoder.encode(TEXTS)
    for fmt in ("float", "base64", None):  # None: the client's default, which asks for base64 and decodes it
        args = {} if fmt is None else {"encoding_format": fmt}
        out = client.embeddings.create(model="minilm", input=TEXTS, **args)
        assert [d.index for d in out.data] == list(range(len(TEXTS)))
        if fmt == "base64":  # asked for explicitly, the client hands the strings back as they came
            got = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in out.data])
        else:
            got = np.array([d.embedding for d in out.data], dtype=np.float32)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert out.model == "minilm" and out.object == "list"
        assert out.usage.prompt_tokens == out.usage.total_tokens == encoder.encode_with_stats(TEXTS).stats.tokens
    one = client.embeddings.create(model="minilm", input="Ein Mann isst.", encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, want[1], atol=1e-5, rtol=0)
    assert one.usage.prompt_tokens == len(encoder.tokenizer.encode("Ein Mann isst.").ids)


def test_base64_is_little_endian_float32(served: tuple[BackgroundServer, Encoder]) -> None:
    server, encoder = served
    r = httpx.post(server.url + "/v1/embeddings", json={"input": ["hello"], "encoding_format": "base64"})
    assert r.status_code == 200
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert len(raw) == 4 * encoder.dim
    np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4"), encoder.encode(["hello"])[0], atol=1e-5, rtol=0)


def test_token_id_input(served: tuple[BackgroundServer, Encoder]) -> None:
    server, encoder = served
    ids = [encoder.tokenizer.encode(t).ids for t in TEXTS[:3]]
    out = _client(server).embeddings.create(model="minilm", input=ids, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in out.data]), encoder.encode_ids(ids), atol=1e-5, rtol=0)
    assert out.usage.prompt_tokens == sum(map(len, ids))
    flat = _client(server).embeddings.create(model="minilm", input=ids[0], encoding_format="float")
    np.testing.assert_allclose(flat.data[0].embedding, encoder.encode_ids(ids[:1])[0], atol=1e-5, rtol=0)


def test_dimensions_equal_to_the_models_is_accepted(served: tuple[BackgroundServer, Encoder]) -> None:
    server, encoder = served
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "x y", "dimensions": encoder.dim, "user": "u1"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == encoder.dim


@pytest.mark.parametrize("body, status, param, needle", [
    ({"input": []}, 400, "input", "empty list"),
    ({"input": ""}, 400, "input", "input[0]' is empty"),
    ({"input": ["ok", "   "]}, 400, "input", "input[1]' is empty"),
    ({"input": ["ok", 3]}, 400, "input", "input[1]' is a int"),
    ({"input": [["ok"]]}, 400, "input", "not a non-empty list of token ids"),
    ({"input": [[101, 10**9]]}, 400, "input", "outside the vocabulary"),
    ({"input": {"text": "x"}}, 400, "input", "must be a string"),
    ({"input": ["a"] * 2049}, 400, "input", "at most 2048"),
    ({}, 400, "input", "Field required"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", "encoding_format"),
    ({"input": "x", "dimensions": 128}, 400, "dimensions", "384 dimensions"),
    ({"input": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"input": "x" * (3 * 1024 * 1024)}, 413, None, "too large"),
])
def test_refusals_have_status_and_openai_body(served: tuple[BackgroundServer, Encoder], body: dict, status: int,
                                              param: str | None, needle: str) -> None:
    server, _ = served
    r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and needle in err["message"], err


def test_bad_json_is_400(served: tuple[BackgroundServer, Encoder]) -> None:
    server, _ = served
    r = httpx.post(server.url + "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_generation_routes_say_the_model_is_an_encoder(served: tuple[BackgroundServer, Encoder]) -> None:
    server, _ = served
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as chat:
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError) as completion:
        client.completions.create(model="minilm", prompt="hi")
    for exc in (chat.value, completion.value):
        assert "is an encoder" in exc.body["message"] and "/v1/embeddings" in exc.body["message"]
        assert exc.body["code"] == "model_not_supported"
    models = client.models.list().data
    assert [m.id for m in models] == ["minilm"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200


def test_eight_concurrent_requests(served: tuple[BackgroundServer, Encoder]) -> None:
    server, encoder = served
    client = _client(server)
    texts = [[f"request {i} sentence {j}" for j in range(i % 3 + 1)] for i in range(8)]
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            out = client.embeddings.create(model="minilm", input=texts[i])
            got[i] = np.array([d.embedding for d in out.data])
        except BaseException as exc:  # noqa: BLE001 — asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(got) == list(range(8))
    for i in range(8):
        np.testing.assert_allclose(got[i], encoder.encode(texts[i]), atol=1e-5, rtol=0)


def _samples(server: BackgroundServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_inputs_tokens_and_latency(served: tuple[BackgroundServer, Encoder]) -> None:
    server, encoder = served
    ok = ("lmforge_requests_total", (("endpoint", "embeddings"), ("outcome", "ok")))
    invalid = ("lmforge_requests_total", (("endpoint", "embeddings"), ("outcome", "invalid")))
    inputs, tokens = ("lmforge_embedding_inputs_total", ()), ("lmforge_embedding_tokens_total", ())
    count = ("lmforge_embedding_request_latency_seconds_count", ())
    before = _samples(server)
    assert httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS[:3]}).status_code == 200
    assert httpx.post(server.url + "/v1/embeddings", json={"input": []}).status_code == 400
    after = _samples(server)
    assert after[ok] == before[ok] + 1 and after[invalid] == before[invalid] + 1
    assert after[inputs] == before[inputs] + 3
    assert after[tokens] == before[tokens] + encoder.encode_with_stats(TEXTS[:3]).stats.tokens
    assert after[count] == before[count] + 1
    assert ("lmforge_draining", ()) in after and ("lmforge_queue_depth", ()) not in after  # no engine gauges


def test_event_loop_answers_while_an_encode_runs(served: tuple[BackgroundServer, Encoder]) -> None:
    server, _ = served
    big = {"input": [f"{i} " + "a long sentence about many things " * 12 for i in range(160)]}
    done = threading.Event()
    status: list[int] = []

    def embed() -> None:
        status.append(httpx.post(server.url + "/v1/embeddings", json=big, timeout=120).status_code)
        done.set()

    t = threading.Thread(target=embed)
    t0 = time.perf_counter()
    t.start()
    time.sleep(0.3)  # the request is in the encoder now (160 × ~100 tokens on one thread: seconds)
    health = httpx.get(server.url + "/health", timeout=60)
    answered_while_running = not done.is_set()
    t.join(120)
    assert health.status_code == 200 and status == [200]
    assert answered_while_running, f"/health waited for the encode ({time.perf_counter() - t0:.1f} s)"


def test_drain_closes_the_encoder(minilm: Path) -> None:
    encoder = Encoder.load(minilm, threads=1)
    server = BackgroundServer(encoder).start()
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "x"}).status_code == 200
    server.stop(drain=True)
    assert not server.state.ready
    with pytest.raises(Exception, match="closed"):
        encoder.encode(["x"])
