"""Re-rankers and classifiers: ``Encoder.score`` / ``classify`` against transformers, and the routes
``/v1/rerank``, ``/rerank`` (Cohere/Jina/vLLM and TEI shapes), ``/v1/score`` and ``/predict`` over a
real server — scores equal transformers', hostile inputs get OpenAI-shaped 4xx bodies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from runtime.encoder import Encoder  # noqa: E402
from runtime.errors import InvalidRequestError  # noqa: E402
from runtime.serve import BackgroundServer  # noqa: E402
from tests.serve.fake_engine import openai_error  # noqa: E402

QUERY = "what is the capital of france"
DOCS = ["Paris is the capital and largest city of France.", "Bananas are long yellow fruits.", "x",
        "The capital of France is Paris, on the Seine.", "Rivers, bridges and the boats under them."]


def _torch_logits(source: str, pairs: list[tuple[str, str]] | list[str]) -> np.ndarray:
    """transformers' own sequence-classification logits, one input at a time (no padding)."""
    import torch

    from exporters.export import encoder_input_names
    from exporters.sources import load_source

    loaded = load_source(source)
    names = encoder_input_names(loaded)
    rows = []
    for item in pairs:
        args = item if isinstance(item, tuple) else (item,)
        enc = loaded.tokenizer(*args, return_tensors="pt")  # token types as the tokenizer gives them
        with torch.no_grad():
            rows.append(loaded.model(**{k: v for k, v in enc.items() if k in names}).logits[0].numpy())
    return np.stack(rows)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
def test_score_equals_transformers(family: str, artifact_cache: Callable[[str], Path]) -> None:
    source = f"tiny:{family}-reranker"
    encoder = Encoder.load(artifact_cache(source), threads=1)
    assert encoder.is_classifier and encoder.labels == ["LABEL_0"] and encoder.activation == "sigmoid"
    logits = _torch_logits(source, [(QUERY, d) for d in DOCS])[:, 0]
    got = encoder.score(QUERY, DOCS, batch_size=2)
    np.testing.assert_allclose(got, _sigmoid(logits), atol=1e-5)
    np.testing.assert_allclose(encoder.score(QUERY, DOCS, raw=True), logits, atol=1e-4)
    assert len(set(np.argsort(-got)[:2])) == 2 and np.ptp(logits) > 1e-3  # scores differ: a ranking to keep
    with pytest.raises(InvalidRequestError, match="no embeddings"):
        encoder.encode(["a"])


def test_classify_equals_transformers_softmax(artifact_cache: Callable[[str], Path]) -> None:
    source = "tiny:roberta-classifier"
    encoder = Encoder.load(artifact_cache(source), threads=1)
    assert encoder.labels == ["negative", "neutral", "positive"] and encoder.activation == "softmax"
    logits = _torch_logits(source, DOCS)
    want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = encoder.classify(DOCS)
    np.testing.assert_allclose([[row[label] for label in encoder.labels] for row in got], want, atol=1e-5)
    with pytest.raises(InvalidRequestError, match="3 labels"):
        encoder.score(QUERY, DOCS)


@pytest.fixture(scope="module")
def served(artifact_cache: Callable[[str], Path]) -> Iterator[tuple[BackgroundServer, Encoder]]:
    encoder = Encoder.load(artifact_cache("tiny:bert-reranker"), threads=1)
    server = BackgroundServer(encoder, served_model_name="reranker").start()
    yield server, encoder
    server.stop()
    encoder.close()


def test_v1_rerank_answers_transformers_scores_sorted(served: tuple[BackgroundServer, Encoder]) -> None:
    server, _ = served
    want = _sigmoid(_torch_logits("tiny:bert-reranker", [(QUERY, d) for d in DOCS])[:, 0])
    for path in ("/v1/rerank", "/rerank"):
        r = httpx.post(server.url + path, json={"model": "reranker", "query": QUERY, "documents": DOCS,
                                                "top_n": 3, "return_documents": True}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "reranker" and body["usage"]["total_tokens"] > len(DOCS)
        results = body["results"]
        assert [x["index"] for x in results] == list(np.argsort(-want)[:3])
        for x in results:
            assert abs(x["relevance_score"] - want[x["index"]]) < 1e-5
            assert x["document"] == {"text": DOCS[x["index"]]}
    # Cohere's document objects, no top_n, no documents back
    r = httpx.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS]})
    assert len(r.json()["results"]) == len(DOCS) and all("document" not in x for x in r.json()["results"])


def test_tei_rerank_shape(served: tuple[BackgroundServer, Encoder]) -> None:
    server, _ = served
    logits = _torch_logits("tiny:bert-reranker", [(QUERY, d) for d in DOCS])[:, 0]
    r = httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True,
                                                 "return_text": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and [x["index"] for x in body] == list(np.argsort(-logits))
    assert all(abs(x["score"] - logits[x["index"]]) < 1e-4 and x["text"] == DOCS[x["index"]] for x in body)


def test_v1_score_and_predict(served: tuple[BackgroundServer, Encoder]) -> None:
    server, _ = served
    want = _sigmoid(_torch_logits("tiny:bert-reranker", [(QUERY, d) for d in DOCS])[:, 0])
    r = httpx.post(server.url + "/v1/score", json={"model": "reranker", "text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(DOCS)))
    np.testing.assert_allclose([d["score"] for d in body["data"]], want, atol=1e-5)
    r = httpx.post(server.url + "/v1/score", json={"text_1": [QUERY, QUERY], "text_2": DOCS[:2]})
    np.testing.assert_allclose([d["score"] for d in r.json()["data"]], want[:2], atol=1e-5)
    one = httpx.post(server.url + "/predict", json={"inputs": [QUERY, DOCS[0]]}).json()  # one pair
    assert one == [{"label": "LABEL_0", "score": pytest.approx(float(want[0]), abs=1e-5)}]
    batch = httpx.post(server.url + "/predict", json={"inputs": [[QUERY, DOCS[0]], [QUERY, DOCS[1]], "x"]}).json()
    assert len(batch) == 3 and batch[1][0]["score"] == pytest.approx(float(want[1]), abs=1e-5)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/rerank", {"query": QUERY}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
    ("/v1/rerank", {"query": "  ", "documents": DOCS}, "query"),
    ("/v1/rerank", {"query": QUERY, "documents": ["ok", 3]}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": ["ok", ""]}, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": "2"}, "top_n"),
    ("/v1/rerank", {"query": QUERY, "documents": ["d"] * 1001}, "documents"),
    ("/v1/rerank", {"query": [QUERY], "documents": DOCS}, "query"),
    ("/v1/rerank", {"query": QUERY, "documents": DOCS, "return_documents": "yes"}, "return_documents"),
    ("/v1/score", {"text_1": [QUERY, QUERY, QUERY], "text_2": DOCS}, "text_2"),
    ("/v1/score", {"text_1": QUERY}, "text_2"),
    ("/predict", {"inputs": 5}, "inputs"),
    ("/predict", {"inputs": [["a", "b", "c"]]}, "inputs"),
    ("/predict", {"inputs": []}, "inputs"),
])
def test_hostile_inputs_get_400_with_openai_bodies(path: str, body: dict, param: str,  # type: ignore[type-arg]
                                                   served: tuple[BackgroundServer, Encoder]) -> None:
    server, _ = served
    error = openai_error(httpx.post(server.url + path, json=body, timeout=30), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_other_refusals(served: tuple[BackgroundServer, Encoder]) -> None:
    server, _ = served
    assert openai_error(httpx.post(server.url + "/v1/rerank", json={"model": "other", "query": QUERY,
                                                                    "documents": DOCS}), 404)["param"] == "model"
    assert openai_error(httpx.post(server.url + "/v1/rerank", content=b"{not json",
                                   headers={"content-type": "application/json"}), 400)["code"] == "invalid_json"
    assert openai_error(httpx.post(server.url + "/v1/rerank", json=[1, 2]), 400)["code"] == "invalid_type"
    # an embeddings request to a re-ranker, and a re-rank request to an embedding model
    assert openai_error(httpx.post(server.url + "/v1/embeddings", json={"input": "a"}), 404)["code"] \
        == "model_not_supported"


def test_rerank_on_an_embedding_model_is_a_404(tiny_bert: Path) -> None:
    encoder = Encoder.load(tiny_bert, threads=1)
    with BackgroundServer(encoder, served_model_name="emb") as server:
        error = openai_error(httpx.post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS}), 404)
        assert "not a re-ranker" in error["message"] and error["code"] == "model_not_supported"
    encoder.close()
