"""The scheduling loop under service conditions, on tiny artifacts (CPU): many callers at once,
arrivals while others decode, cancellation, deadlines, a bounded queue, failures inside
onnxruntime, closing, asyncio, EOS, and memory over thousands of requests.

Both backends run every test (``concat`` for what ``convert`` writes; ``slots`` for shared-buffer
artifacts), and a request's greedy tokens are compared with the same request run alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime import (
    Engine,
    EngineClosedError,
    FinishReason,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
)


@pytest.fixture(scope="module", params=["concat", "slots"])
def path(request: pytest.FixtureRequest, artifact_cache: Callable[[str], Path]) -> Path:
    if request.param == "concat":
        return artifact_cache("tiny:llama")
    return request.getfixturevalue("shared_path")


@pytest.fixture(scope="module")
def engine(path: Path):  # type: ignore[no-untyped-def]
    with Engine.load(path, max_batch=8, max_queue=64) as e:
        yield e


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(3, 300) for _ in range(rng.randrange(1, 24))]


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_a_request_arriving_mid_decode_gets_its_solo_tokens(engine: Engine) -> None:
    rng = random.Random(1)
    prompts = [_prompt(rng) for _ in range(6)]
    solo = [engine.generate_ids([p], 30)[0] for p in prompts]
    first = [engine.submit(p, 30) for p in prompts[:3]]
    stream = iter(first[0])
    next(stream)  # the first three are decoding now (keep the iterator: dropping it cancels)
    later = [engine.submit(p, 30) for p in prompts[3:]]
    got = [list(r.result().token_ids) for r in first + later]
    assert got == solo


def test_32_threads_mixed_requests_with_cancellations(engine: Engine) -> None:
    """32 threads × 20 requests: greedy and sampled, varied lengths, some cancelled mid-stream.
    Every greedy result equals its solo run; every sampled result equals its solo run (seeded)."""
    rng = random.Random(2)
    jobs = []
    for t in range(32):
        for j in range(20):
            sampled = rng.random() < 0.5
            params = SamplingParams(temperature=0.8, top_p=0.9, seed=t * 100 + j) if sampled else SamplingParams()
            jobs.append((t, _prompt(rng), rng.randrange(1, 12), params, rng.random() < 0.15))
    solo = {}
    for i, (_, prompt, n, params, cancel) in enumerate(jobs):
        if not cancel:
            solo[i] = engine.generate_ids([prompt], n, params)[0]
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i, (owner, prompt, n, params, cancel) in enumerate(jobs):
                if owner != t:
                    continue
                while True:
                    try:
                        request = engine.submit(prompt, n, params)
                        break
                    except QueueFullError:
                        time.sleep(0.01)
                if cancel:
                    for _ in request:
                        request.cancel()
                    results[i] = request.result()
                else:
                    results[i] = request.result()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(32)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[:3]
    assert len(results) == len(jobs)
    for i, want in solo.items():
        assert list(results[i].token_ids) == want, i  # type: ignore[attr-defined]
    cancelled = [results[i] for i, job in enumerate(jobs) if job[4]]
    assert all(r.finish_reason in (FinishReason.CANCELLED, FinishReason.LENGTH, FinishReason.EOS)  # type: ignore[attr-defined]
               for r in cancelled)
    assert any(r.finish_reason is FinishReason.CANCELLED for r in cancelled)  # type: ignore[attr-defined]
    stats = engine.stats()
    assert stats.running == 0 and stats.queued == 0


def test_cancelling_a_stream_frees_its_slot(path: Path) -> None:
    with Engine.load(path, max_batch=1) as engine:
        request = engine.submit([5, 6, 7], 400)
        stream = iter(request)
        next(stream)
        stream.close()  # the consumer walks away: the request is cancelled
        assert request.result(timeout=10).finish_reason is FinishReason.CANCELLED
        t0 = time.perf_counter()
        assert engine.generate_ids([[8, 9]], 3)[0]  # the only slot was free again
        assert time.perf_counter() - t0 < 5


def test_a_deadline_expires_cleanly(path: Path) -> None:
    with Engine.load(path, max_batch=1) as engine:
        slow = engine.submit([5, 6, 7], 450, deadline_s=0.05)
        result = slow.result(timeout=30)
        assert result.finish_reason is FinishReason.DEADLINE and result.new_tokens < 450
        queued_behind = engine.submit([5], 3, deadline_s=1e-6)  # expires while waiting
        assert queued_behind.result(timeout=10).finish_reason is FinishReason.DEADLINE
        assert engine.generate_ids([[5, 6]], 3)[0]


def test_queue_overflow_is_refused_at_once(path: Path) -> None:
    with Engine.load(path, max_batch=1, max_queue=2) as engine:
        running = engine.submit([5, 6, 7], 450)
        stream = iter(running)
        next(stream)  # admitted: the queue is empty again
        queued = [engine.submit([5], 4), engine.submit([6], 4)]
        t0 = time.perf_counter()
        with pytest.raises(QueueFullError) as info:
            engine.submit([7], 4)
        assert time.perf_counter() - t0 < 0.5
        assert str(info.value).startswith("the engine's queue is full | expected at most 2 waiting")
        assert info.value.retry_after_s > 0
        running.cancel()
        assert all(r.result(timeout=30).new_tokens == 4 for r in queued)


def test_a_too_long_prompt_is_refused_before_it_takes_a_slot(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine.submit([5] * 500, 13)
    assert "a 500-token prompt + 13 new tokens = 513" in str(info.value) and "512" in str(info.value)
    assert engine.stats().queued == 0


class _FailOnRun:
    """Wraps a session; runs fail while ``failing`` is set, like onnxruntime on out-of-memory."""

    def __init__(self, session) -> None:
        self._session, self.failing = session, False

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    def run_with_iobinding(self, binding, options=None) -> None:
        if self.failing:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 2: out of memory")
        self._session.run_with_iobinding(binding, options)


def test_an_onnxruntime_failure_fails_that_step_and_the_loop_keeps_serving(path: Path) -> None:
    with Engine.load(path, max_batch=4) as engine:
        want = engine.generate_ids([[5, 6, 7]], 6)[0]
        wrapped = _FailOnRun(engine.backend.session)
        engine.backend.session = wrapped  # type: ignore[assignment]
        victims = [engine.submit([5, 6, 7], 200), engine.submit([9, 9], 200)]
        stream = iter(victims[0])
        next(stream)
        wrapped.failing = True
        for victim in victims:
            with pytest.raises(GenerationError) as info:
                victim.result(timeout=30)
            assert "generation failed inside onnxruntime" in str(info.value) and "out of memory" in str(info.value)
        wrapped.failing = False
        assert engine.generate_ids([[5, 6, 7]], 6)[0] == want
        assert engine.stats().running == 0


def test_close_drains_then_refuses(path: Path) -> None:
    engine = Engine.load(path, max_batch=2)
    inflight = [engine.submit([5, 6], 40), engine.submit([7], 40), engine.submit([8, 9], 40)]
    engine.close(drain=True, timeout=60)
    assert [r.result(timeout=1).finish_reason for r in inflight] == [FinishReason.LENGTH] * 3
    assert not engine.ready and not engine._thread.is_alive()
    with pytest.raises(EngineClosedError):
        engine.submit([5], 2)
    engine.close()  # twice is fine


def test_close_without_drain_cancels(path: Path) -> None:
    engine = Engine.load(path, max_batch=1)
    inflight = [engine.submit([5, 6], 450), engine.submit([7], 450)]
    stream = iter(inflight[0])
    next(stream)
    engine.close(drain=False)
    reasons = [r.result(timeout=10).finish_reason for r in inflight]
    assert reasons == [FinishReason.CANCELLED, FinishReason.CANCELLED]


def test_asyncio_callers_batch_together(engine: Engine) -> None:
    rng = random.Random(4)
    prompts = [_prompt(rng) for _ in range(6)]
    solo = [engine.generate_ids([p], 12)[0] for p in prompts]

    async def one(prompt: list[int]) -> list[int]:
        ids: list[int] = []
        async for event in engine.submit(prompt, 12):
            ids.extend(event.token_ids)
        return ids

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    assert asyncio.run(main()) == solo

    async def abandon() -> None:
        request = engine.submit([5, 6, 7], 400)
        async with contextlib.aclosing(aiter(request)) as events:
            async for _ in events:
                break  # leaving the stream early cancels the request once the iterator is closed
        assert request.cancelled
        result = await asyncio.to_thread(request.result, 10)
        assert result.finish_reason is FinishReason.CANCELLED

    async def task_cancelled() -> None:  # what a server sees when its client disconnects
        request = engine.submit([5, 6, 7], 400)

        async def consume() -> None:
            async with contextlib.aclosing(aiter(request)) as events:
                async for _ in events:
                    await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert request.cancelled
        result = await asyncio.to_thread(request.result, 10)
        assert result.finish_reason is FinishReason.CANCELLED

    asyncio.run(abandon())
    asyncio.run(task_cancelled())


def test_eos_stops_with_its_reason(path: Path, tmp_path: Path) -> None:
    """A copied artifact whose manifest names, as EOS, a token the model does produce: generation
    stops there with FinishReason.EOS (the token included, the text without it); a stop id
    gives STOP_TOKEN; otherwise LENGTH."""
    with Engine.load(path) as plain:
        prompt = [17, 42, 99, 5]
        free = plain.generate_ids([prompt], 16)[0]
        eos = free[3]
        cut = free.index(eos) + 1
        res = plain.generate_results([prompt], 16)[0]
        assert res.finish_reason is FinishReason.LENGTH and res.new_tokens == 16
        stop = plain.generate_results([prompt], 16, SamplingParams(stop_token_ids=(eos,)))[0]
        assert stop.finish_reason is FinishReason.STOP_TOKEN and list(stop.token_ids) == free[:cut]
    copy = tmp_path / "eos"
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["generation"]["eos_token_ids"] = [eos]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with Engine.load(copy) as engine:
        res = engine.generate_results([prompt], 16)[0]
        assert res.finish_reason is FinishReason.EOS
        assert list(res.token_ids) == free[:cut] and res.token_ids[-1] == eos
        assert res.text == engine.decode(free[: cut - 1])
        held = engine.generate_results([prompt], 16, SamplingParams(min_new_tokens=cut))[0]
        assert held.new_tokens > cut - 1 and eos not in held.token_ids[:cut]


def test_memory_stays_flat_over_10000_requests(path: Path) -> None:
    rng = np.random.default_rng(6)
    with Engine.load(path, max_batch=16, max_queue=20000) as engine:
        def wave(n: int) -> int:
            requests = [engine.submit(rng.integers(3, 300, int(rng.integers(1, 20))).tolist(), int(rng.integers(1, 6)),
                                      SamplingParams(temperature=0.7, seed=i) if i % 2 else None) for i in range(n)]
            return sum(r.result(timeout=300).new_tokens for r in requests)

        wave(1000)  # warm-up: arenas and caches reach their working size
        before = _rss_kib()
        tokens = sum(wave(2250) for _ in range(4))
        grown = _rss_kib() - before
    assert tokens > 9000
    assert grown < 8 * 1024, f"RSS grew {grown} KiB over 9,000 requests"


def test_repetition_penalty_counts_the_prompt(engine: Engine) -> None:
    """The greedy pick is a prompt token; under a large penalty the first generated token must
    change to what transformers' RepetitionPenaltyLogitsProcessor picks over the prompt."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = random.Random(8)
    for _ in range(50):
        base = _prompt(rng)
        prompt = base + engine.generate_ids([base], 1)[0]
        res = engine.generate_results([prompt], 1, return_logits=True)[0]
        if res.token_ids[0] in prompt:
            break
    else:
        pytest.fail("no prompt whose greedy pick repeats one of its tokens")
    logits = torch.tensor(res.step_logits[:1])  # type: ignore[index]
    want = RepetitionPenaltyLogitsProcessor(50.0)(torch.tensor([prompt]), logits).argmax(-1).item()
    got = engine.generate_ids([prompt], 1, SamplingParams(repetition_penalty=50.0))[0][0]
    assert got == want != res.token_ids[0]


def test_an_engine_nobody_holds_is_collected_and_its_thread_ends(path: Path) -> None:
    import gc
    import weakref

    engine = Engine.load(path)
    request = engine.submit([5, 6, 7], 4)
    thread, ref = engine._thread, weakref.ref(engine)
    del engine
    assert request.result(timeout=30).new_tokens == 4  # a request in flight keeps its engine alive
    del request
    gc.collect()
    thread.join(5)
    assert ref() is None and not thread.is_alive()
