"""A request's values can fail that request, never the loop: a failure while the loop prepares,
plans or accepts one request fails that request alone, and the engine serves on (both KV
backends). The requests here bypass validation on purpose (``object.__setattr__`` on a frozen
SamplingParams, or a step monkeypatched to raise for one request), as a bug or a gap in the
validation would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import Engine, GenerationError, SamplingParams
from runtime import engine as engine_module
from runtime.sampling import host_values

PROMPT = "hello world"


@pytest.fixture(scope="module", params=["concat", "slots"])
def engine(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[Engine]:
    path = tiny_llama if request.param == "concat" else request.getfixturevalue("shared_path")
    e = Engine.load(path, max_batch=4)
    assert e.backend.kind == request.param
    yield e
    e.close(drain=False)


def _bypassed(**values: object) -> SamplingParams:
    """A SamplingParams whose fields were set after validation (what a validation gap would let through)."""
    params = SamplingParams(temperature=values.pop("temperature", 0.0))  # type: ignore[arg-type]
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


def _serves_on(engine: Engine, want: str) -> None:
    assert engine.ready
    assert engine.submit(PROMPT, 8).result(timeout=60).text == want


@pytest.mark.parametrize("bad", [
    {"top_k": 2**70},  # greedy: the int64 conversion of the sampling row overflows
    {"temperature": 0.8, "min_new_tokens": 2**70},
    {"temperature": 0.8, "seed": -5},  # numpy refuses a negative seed
], ids=["greedy-top_k", "sampled-min_new_tokens", "sampled-seed"])
def test_a_request_failing_in_preparation_fails_alone(engine: Engine, bad: dict[str, object]) -> None:
    want = engine.submit(PROMPT, 8).result(timeout=60).text
    running = engine.submit("a longer one", 40, SamplingParams(min_new_tokens=40))
    hostile = engine.submit(PROMPT, 8, _bypassed(**bad))
    with pytest.raises(GenerationError) as info:
        hostile.result(timeout=60)
    assert "request" in str(info.value) and "\n" not in str(info.value)
    assert running.result(timeout=60).new_tokens == 40  # the request beside it was not failed
    _serves_on(engine, want)


def test_a_request_failing_in_planning_fails_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    want = engine.submit(PROMPT, 8).result(timeout=60).text

    calls = []

    def plan(params, candidates):  # type: ignore[no-untyped-def]
        if any(p.seed == 666 for p in params):
            calls.append(len(params))
            if len(calls) > 1:  # its preparation plans it alone and passes; the run's plan raises
                raise ValueError("a planning bug")
        return host_values(params, candidates)

    monkeypatch.setattr(engine_module, "host_values", plan)
    running = engine.submit("a longer one", 30, SamplingParams(min_new_tokens=30))
    hostile = engine.submit(PROMPT, 8, SamplingParams(temperature=0.5, seed=666))
    with pytest.raises(GenerationError) as info:
        hostile.result(timeout=60)
    assert "a planning bug" in str(info.value) and "while planning" in str(info.value)
    assert running.result(timeout=60).new_tokens == 30
    _serves_on(engine, want)


def test_a_request_failing_in_acceptance_fails_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    want = engine.submit(PROMPT, 8).result(timeout=60).text
    marker = engine.encode("zz top")
    real = engine_module.IncrementalDetokenizer

    class Exploding(real):  # type: ignore[misc, valid-type]
        def __init__(self, tokenizer, context_ids=()):  # type: ignore[no-untyped-def]
            super().__init__(tokenizer, context_ids)
            self.explode = list(context_ids) == marker

        def push(self, token_id: int) -> str:
            if self.explode and self._read > 3:  # a few tokens in: the request is running
                raise RuntimeError("a detokenizer bug")
            return super().push(token_id)

    monkeypatch.setattr(engine_module, "IncrementalDetokenizer", Exploding)
    running = engine.submit("a longer one", 30, SamplingParams(min_new_tokens=30))
    hostile = engine.submit(marker, 20, SamplingParams(min_new_tokens=20))
    with pytest.raises(GenerationError) as info:
        hostile.result(timeout=60)
    assert "a detokenizer bug" in str(info.value)
    assert running.result(timeout=60).new_tokens == 30
    _serves_on(engine, want)
