"""``/v1/embeddings`` on a decoder (the error says to serve an encoder), and the embeddings helpers:
input checks and the base64 encoding OpenAI's client decodes."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from runtime.serve.embeddings import embedding_inputs, encode_vector
from runtime.serve.errors import APIError


def test_decoder_answers_embeddings_with_a_pointer_to_encoders(fake_server: Callable) -> None:
    server, _ = fake_server(served_model_name="tiny")
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": "hello"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "is a decoder" in err["message"] and "serve an encoder artifact" in err["message"]
    assert err["code"] == "model_not_supported" and err["param"] == "model"
    # the decoder's own routes still work, and its metrics count the refusal under "embeddings"
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert ok.status_code == 200
    assert 'lmforge_requests_total{endpoint="embeddings",outcome="not_found"} 1.0' in \
        httpx.get(server.url + "/metrics").text


def test_base64_is_little_endian_float32_bytes() -> None:
    v = np.array([1.0, -2.5, 3.0e-8], dtype=np.float32)
    text = encode_vector(v, "base64")
    assert text == base64.b64encode(b"\x00\x00\x80\x3f\x00\x00\x20\xc0" + np.float32(3.0e-8).tobytes()).decode()
    assert np.array_equal(np.frombuffer(base64.b64decode(text), dtype="<f4"), v)
    assert encode_vector(v, "float") == pytest.approx([1.0, -2.5, 3.0e-8])


def test_input_shapes() -> None:
    assert embedding_inputs("a", 4, 100) == ["a"]
    assert embedding_inputs(["a", "b"], 4, 100) == ["a", "b"]
    assert embedding_inputs([1, 2, 3], 4, 100) == [[1, 2, 3]]
    assert embedding_inputs([[1], [2, 3]], 4, 100) == [[1], [2, 3]]


@pytest.mark.parametrize("value, needle", [
    ([], "empty list"), ("", "input[0]' is empty"), (["a", ""], "input[1]' is empty"),
    (["a", None], "input[1]' is a NoneType"), ([1, "a"], "input[0]' is a int"), ([[1], [True]], "input[1]"),
    ([[1], []], "input[1]' is not a non-empty list"), ([[100]], "outside the vocabulary"),
    (["a"] * 5, "at most 4"), (3.5, "must be a string"), ([True], "input[0]' is a bool"),
])
def test_input_refusals(value: object, needle: str) -> None:
    with pytest.raises(APIError) as exc:
        embedding_inputs(value, 4, 100)
    assert exc.value.status == 400 and exc.value.param == "input" and needle in exc.value.message
