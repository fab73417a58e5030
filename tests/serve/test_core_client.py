"""The front-end's CoreClient reads the core's messages in the event loop that submits: the thread
hands the reading over to that loop (what it read before arrives first), takes it back when that
loop is closed, and only watches the heartbeat meanwhile; a loop that is not running is no reason
to declare the core lost, and a silent core still fails what is in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from runtime import Engine
from runtime.errors import EngineClosedError
from runtime.serve.client import CoreClient
from runtime.serve.instances import ModelOptions
from runtime.serve.split import CoreProcess

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def core(tiny_llama: Path) -> Iterator[tuple[CoreProcess, Path, list[tuple[int, ...]]]]:
    with Engine.load(tiny_llama, max_batch=4) as engine:
        want = [engine.submit(p, max_new_tokens=12).result(timeout=60).token_ids for p in PROMPTS]
    with CoreProcess(ModelOptions(str(tiny_llama), max_batch=4, verify_hashes=False)) as process:
        yield process, tiny_llama, want


async def _generate(client: CoreClient, prompts: list[list[int]], n: int = 12) -> list[tuple[int, ...]]:
    async def one(prompt: list[int]) -> tuple[int, ...]:
        ids: list[int] = []
        async for event in client.submit(prompt, n):
            ids.extend(event.token_ids)
        return tuple(ids)

    return list(await asyncio.gather(*(one(p) for p in prompts)))


async def _reading(client: CoreClient) -> asyncio.AbstractEventLoop:
    """The running loop, once it reads the client's socket (the thread hands over within its
    0.1 s poll)."""
    loop = asyncio.get_running_loop()
    for _ in range(100):
        if client._reader is loop:
            break
        await asyncio.sleep(0.02)
    return loop


def _wait_for(predicate: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_the_loop_takes_over_the_reading_and_a_later_loop_after_it(
        core: tuple[CoreProcess, Path, list[tuple[int, ...]]]) -> None:
    process, artifact, want = core
    client = CoreClient(process.addresses, str(artifact))
    try:
        async def session() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], bool]:
            first = await _generate(client, PROMPTS)  # read by the thread until it hands over
            loop = await _reading(client)
            second = await _generate(client, PROMPTS)  # read by this loop
            return first, second, client._reader is loop

        for _ in range(2):  # a new loop after the first one closed (asyncio.run per call)
            first, second, loop_reads = asyncio.run(session())
            assert first == want and second == want
            assert loop_reads
        assert client.ready
    finally:
        client.close(drain=False)


def test_a_loop_that_is_not_running_does_not_declare_the_core_lost(
        core: tuple[CoreProcess, Path, list[tuple[int, ...]]]) -> None:
    process, artifact, want = core
    client = CoreClient(process.addresses, str(artifact), core_timeout_s=0.5)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(_generate(client, PROMPTS[:1])) == want[:1]
        assert _wait_for(lambda: client._reader is loop)  # handed over, to start when the loop runs again
        time.sleep(1.5)  # three timeouts with the loop idle: nobody reads, nothing is concluded
        assert client.ready
        assert loop.run_until_complete(_generate(client, PROMPTS)) == want
    finally:
        client.close(drain=False)
        loop.close()


def test_a_silent_core_fails_the_requests_the_loop_reads_then_serves_again(
        core: tuple[CoreProcess, Path, list[tuple[int, ...]]]) -> None:
    process, artifact, want = core
    client = CoreClient(process.addresses, str(artifact), core_timeout_s=1.0)
    pid = process.pid
    assert pid is not None
    try:
        async def stalled() -> BaseException | None:
            await _generate(client, PROMPTS[:1])
            loop = await _reading(client)
            assert client._reader is loop
            request = client.submit(PROMPTS[0], client.max_context - len(PROMPTS[0]))
            os.kill(pid, signal.SIGSTOP)
            try:
                async with asyncio.timeout(10):
                    async for _ in request:
                        pass
            except EngineClosedError as exc:
                return exc
            finally:
                os.kill(pid, signal.SIGCONT)
            return None

        error = asyncio.run(stalled())
        assert isinstance(error, EngineClosedError) and "no heartbeat" in str(error), error
        assert _wait_for(lambda: client.ready, 10.0)  # the core answers again
        assert asyncio.run(_generate(client, PROMPTS)) == want
    finally:
        client.close(drain=False)


def test_a_message_that_fails_to_dispatch_does_not_stop_the_loops_reading(
        core: tuple[CoreProcess, Path, list[tuple[int, ...]]], caplog: pytest.LogCaptureFixture) -> None:
    """The reader logs the failure itself and goes on draining (left to asyncio, the exception would
    end the drain early, and ZeroMQ signals no new edge for messages already taken in)."""
    process, artifact, want = core
    client = CoreClient(process.addresses, str(artifact))
    try:
        async def session() -> tuple[list[tuple[int, ...]], bool]:
            await _generate(client, PROMPTS[:1])
            loop = await _reading(client)
            real, failed = client._dispatch, []

            def flaky(items: list[list[object]], now: float) -> None:
                if not failed:
                    failed.append(items)
                    raise RuntimeError("a message this front-end cannot handle")
                real(items, now)  # type: ignore[arg-type]

            client._dispatch = flaky  # type: ignore[method-assign]
            async with asyncio.timeout(30):  # a reading that stopped fails here, not by hanging
                lost = client.submit(PROMPTS[1], 12)  # its first block goes with the failed message
                async for _ in lost:
                    pass
                after = await _generate(client, PROMPTS)
            return after, bool(failed) and client._reader is loop

        with caplog.at_level("ERROR", logger="runtime.serve.client"):
            after, failed_on_the_loop = asyncio.run(session())
        assert failed_on_the_loop
        assert [r.getMessage() for r in caplog.records if r.name == "runtime.serve.client"] == [
            "the front-end failed to handle a message from the engine core"]
        assert after == want  # the reading went on past the message that failed
    finally:
        client.close(drain=False)
