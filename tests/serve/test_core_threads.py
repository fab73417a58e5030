"""The engine core's onnxruntime threads on the CPU: with no count asked it leaves each front-end a
core when, at the engine's decode rate with every core, the front-ends would need a tenth of a core
or more; a model whose tokens are expensive keeps every core; the count chosen reaches the parent
(a restarted core takes it without measuring again) and ``lmforge serve``'s startup line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("zmq")

import runtime.cpu
import runtime.serve.core as core
from runtime import Engine
from runtime.serve.instances import ModelOptions
from runtime.serve.split import CoreProcess


@pytest.mark.parametrize(("cores", "frontends", "rate", "want"), [
    (2, 1, 10_000.0, 1),  # tiny model, 2 cores: the front-end would need 0.4 of a core
    (2, 1, 150.0, None),  # SmolLM2-like: 0.006 of a core, every core computes
    (16, 2, 5_000.0, 14),  # a core per front-end
    (16, 1, core.RESERVE_AT / core.FRONTEND_CPU_S_PER_TOKEN, 15),  # at the boundary: reserved
    (16, 1, 0.99 * core.RESERVE_AT / core.FRONTEND_CPU_S_PER_TOKEN, None),
    (1, 1, 1e6, None),  # nothing left to reserve
    (2, 2, 1e6, None),
])
def test_reserve_for_frontends(monkeypatch: pytest.MonkeyPatch, cores: int, frontends: int, rate: float,
                               want: int | None) -> None:
    monkeypatch.setattr(runtime.cpu, "intra_op_threads", lambda threads: cores)
    asked: list[float | None] = []

    def fake_rate(engine: Any, rows: int = 16, enough: float | None = None) -> float:
        asked.append(enough)
        return rate

    monkeypatch.setattr(core, "decode_rate", fake_rate)
    assert core.reserve_for_frontends(object(), frontends) == want
    assert asked == ([] if cores - frontends < 1 else [core.RESERVE_AT / core.FRONTEND_CPU_S_PER_TOKEN])


class _Timed:
    """An engine stand-in whose calls take ``seconds`` each; counts them."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls, self.max_batch, self.vocab = seconds, 0, 8, 100

    def generate_results(self, prompts: list[list[int]], n: int, params: Any) -> list[Any]:
        import time

        assert len(prompts) == 8 and all(0 < t < self.vocab for p in prompts for t in p) and len(params) == 8
        self.calls += 1
        time.sleep(self.seconds)
        return []


def test_decode_rate_stops_early_for_a_slow_model() -> None:
    slow = _Timed(0.05)  # 8 rows × 4 tokens in 0.05 s or more: 640 tok/s at most
    rate = core.decode_rate(slow, enough=10_000.0)
    assert slow.calls == 1 and 0 < rate <= 641
    fast = _Timed(0.001)  # 32,000 tok/s at most; below 50 only if a call took 0.64 s
    core.decode_rate(fast, enough=100.0)
    assert fast.calls == 2  # the first call may include one-time work: measured again


def test_a_failing_probe_keeps_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.cpu, "intra_op_threads", lambda threads: 2)

    def broken(engine: Any, rows: int = 16, enough: float | None = None) -> float:
        raise RuntimeError("no")

    monkeypatch.setattr(core, "decode_rate", broken)
    assert core.reserve_for_frontends(object(), 1) is None


def test_decode_rate_of_a_real_engine(tiny_llama: Path) -> None:
    with Engine.load(tiny_llama, max_batch=4) as engine:
        steps = engine.steps
        assert core.decode_rate(engine) > 0
        assert engine.steps > steps  # it generated
    with Engine.load(tiny_llama, max_batch=4, max_context=12) as short:  # shorter than the probe's prompt
        assert core.decode_rate(short) > 0  # the prompt is cut to fit


def test_the_core_reports_its_threads(tiny_llama: Path) -> None:
    """A count given is kept; without one the core measures and says what it chose (the rule above:
    None or the cores less one), and the parent keeps it for a restart."""
    with CoreProcess(ModelOptions(str(tiny_llama), max_batch=4, verify_hashes=False), threads=1) as process:
        assert process.threads == 1
    cores = runtime.cpu.intra_op_threads(None)
    with CoreProcess(ModelOptions(str(tiny_llama), max_batch=4, verify_hashes=False)) as process:
        assert process.threads in ({None, cores - 1} if cores > 1 else {None})
