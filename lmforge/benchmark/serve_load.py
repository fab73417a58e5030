"""``lmforge bench-serve``'s load generator: streaming requests on an arrival schedule, measured per request.

The method is vLLM's ``bench serve`` and genai-perf's: every request streams; the client records
time to first token (send → first chunk with text), the gaps between text chunks (inter-token
latency) and end-to-end latency; a point of the sweep is either open-loop (Poisson arrivals at a
rate, ``inf`` = all at once, independent of how fast the server answers) or closed-loop (a fixed
number of clients, each sending its next request when the last one ended).

Two targets share the schedule and the measurements: :class:`HttpTarget` (an OpenAI-compatible
server, via ``aiohttp``) and :class:`EngineTarget` (a :class:`runtime.Engine` in this process,
``submit`` + ``async for``; what the HTTP layer costs is the difference between the two).
:class:`ServerProcess` runs ``lmforge serve ARTIFACT`` as its own process for an :class:`HttpTarget`
to measure: a server in a thread of the load generator's process shares its GIL (and the engine
loop's) and measures worse than any deployment.

A request that does not end well is counted by kind: ``http_<status>`` (``http_429`` = the
queue was full), ``timeout``, ``connection``, ``stream_error`` (an error event inside a
stream), ``incomplete`` (no finish reason before the stream ended), and for the engine target
``queue_full``, ``closed``, ``invalid``, ``failed``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import GenerationError
from runtime.options import DEFAULTS

log = logging.getLogger(__name__)

__all__ = [
    "EngineTarget",
    "HttpTarget",
    "LoadPrompt",
    "Mix",
    "RequestRecord",
    "ServerProcess",
    "Slo",
    "load_prompts",
    "parse_mix",
    "parse_rates",
    "parse_slo",
    "random_prompts",
    "run_closed_loop",
    "run_open_loop",
    "summarize",
]


@dataclasses.dataclass(frozen=True)
class LoadPrompt:
    """One prompt of the load: text (sent to ``/v1/completions``, or as one user message to
    ``/v1/chat/completions`` when ``chat``) or token ids (``/v1/completions`` only)."""

    prompt: str | tuple[int, ...]
    chat: bool = False


@dataclasses.dataclass(frozen=True)
class Mix:
    """The share of greedy requests; the rest sample (temperature 0.8, top-p 0.95, seeded per request)."""

    greedy: float = 1.0

    def params(self, rng: random.Random, i: int) -> dict[str, Any]:
        if rng.random() < self.greedy:
            return {"temperature": 0.0}
        return {"temperature": 0.8, "top_p": 0.95, "seed": i % 2**31}  # warm-up indices are negative


@dataclasses.dataclass(frozen=True)
class Slo:
    """Goodput's bounds (None = not bounded); ``itl_s`` bounds a request's mean inter-token latency."""

    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        mean_itl = sum(r.itl_s) / len(r.itl_s) if r.itl_s else 0.0
        return ((self.ttft_s is None or r.ttft_s <= self.ttft_s) and (self.itl_s is None or mean_itl <= self.itl_s)
                and (self.e2e_s is None or r.e2e_s <= self.e2e_s))

    def describe(self) -> dict[str, float | None]:
        return {"ttft_ms": _ms(self.ttft_s), "itl_ms": _ms(self.itl_s), "e2e_ms": _ms(self.e2e_s)}


@dataclasses.dataclass
class RequestRecord:
    ok: bool = False
    error: str | None = None
    ttft_s: float = math.nan
    itl_s: list[float] = dataclasses.field(default_factory=list)
    e2e_s: float = math.nan
    output_tokens: int = 0
    prompt_tokens: int = 0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


# -- parsing the flags ---------------------------------------------------------------------------


def _bad(flag: str, expected: str, got: str) -> GenerationError:
    return GenerationError(f"invalid {flag}", expected=expected, got=repr(got))


def parse_rates(text: str) -> tuple[float, ...]:
    """``"1,2,inf"`` → ``(1.0, 2.0, inf)`` requests per second."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = float(part)
        except ValueError:
            raise _bad("--rates", "positive numbers or inf, comma-separated, e.g. 1,4,inf", text) from None
        if not value > 0:
            raise _bad("--rates", "positive numbers or inf, comma-separated, e.g. 1,4,inf", text)
        out.append(value)
    return tuple(out)


def parse_mix(text: str) -> Mix:
    """``"greedy:0.5,sampled:0.5"`` → ``Mix(greedy=0.5)`` (weights are normalized)."""
    weights = {"greedy": 0.0, "sampled": 0.0}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition(":")
        try:
            weight = float(value or "1")
        except ValueError:
            weight = -1.0
        if name not in weights or weight < 0:
            raise _bad("--mix", "greedy:W,sampled:W with weights >= 0", text)
        weights[name] = weight
    total = weights["greedy"] + weights["sampled"]
    if total <= 0:
        raise _bad("--mix", "at least one positive weight", text)
    return Mix(greedy=weights["greedy"] / total)


def parse_slo(text: str | None) -> Slo:
    """``"ttft=200ms,itl=50ms,e2e=2s"`` → :class:`Slo` (a bare number is milliseconds)."""
    if not text:
        return Slo()
    values: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition("=")
        scale = 1e-3
        if value.endswith("ms"):
            value = value[:-2]
        elif value.endswith("s"):
            value, scale = value[:-1], 1.0
        try:
            seconds = float(value) * scale
        except ValueError:
            seconds = -1.0
        if name not in ("ttft", "itl", "e2e") or not seconds > 0:
            raise _bad("--slo", "ttft=200ms,itl=50ms,e2e=10s (any of them)", text)
        values[f"{name}_s"] = seconds
    return Slo(**values)


# -- prompts -------------------------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[LoadPrompt]:
    """A JSON-lines file with a ``prompt`` string and an optional ``chat`` flag per line."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt = item["prompt"]
        except (ValueError, KeyError, TypeError):
            raise GenerationError(f"{path}:{n}: not a prompt line", expected='{"prompt": "...", "chat": false}',
                                  got=line[:80]) from None
        if not isinstance(prompt, str) or not prompt:
            raise GenerationError(f"{path}:{n}: invalid prompt", expected="a non-empty string", got=repr(prompt))
        out.append(LoadPrompt(prompt, bool(item.get("chat", False))))
    if not out:
        raise GenerationError(f"{path}: no prompts", expected="at least one line", fix="pass another --prompts")
    return out


def random_prompts(count: int, mean_len: int, vocab: int, seed: int = 0, spread: float = 0.5) -> list[LoadPrompt]:
    """``count`` token-id prompts, lengths uniform in ``mean_len × [1 - spread, 1 + spread]``."""
    rng = np.random.default_rng(seed)
    low = max(1, round(mean_len * (1 - spread)))
    high = max(low, round(mean_len * (1 + spread)))
    first = min(100, vocab // 2)
    return [LoadPrompt(tuple(int(i) for i in rng.integers(first, vocab, int(rng.integers(low, high + 1)))))
            for _ in range(count)]


# -- targets -------------------------------------------------------------------------------------


class HttpTarget:
    """An OpenAI-compatible server; every request streams with ``include_usage``.

    The client is aiohttp, as in vLLM's ``bench serve``: its C parser reads an SSE chunk for
    about a third of the CPU time httpx takes, and on a small machine the load generator shares
    the cores with the server it measures, so a costly client is charged to the server.
    """

    kind = "http"

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.base = self.url if self.url.endswith("/v1") else self.url + "/v1"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.session: Any = None  # an aiohttp.ClientSession, made on the running loop (prepare)
        self.model = model
        self.vocab: int | None = None
        self.name = self.url

    def _open(self) -> Any:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=10.0),
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30.0),
                read_bufsize=1 << 16)
        return self.session

    async def prepare(self) -> None:
        """Read the served model (name, vocabulary) from ``/v1/models``."""
        import aiohttp

        try:
            async with self._open().get(self.base + "/models") as r:
                status, text = r.status, await r.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise GenerationError(f"cannot reach {self.base}/models", got=str(exc) or type(exc).__name__,
                                  fix="start the server (lmforge serve ARTIFACT) or pass its URL") from None
        if status != 200:
            raise GenerationError(f"{self.base}/models answered {status}", got=text[:200],
                                  fix="pass --api-key if the server needs one")
        card = json.loads(text)["data"][0]
        self.model = self.model or card["id"]
        self.vocab = card.get("vocab_size")
        self.name = f"{self.model} @ {self.url}"

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def send(self, prompt: LoadPrompt, new_tokens: int, params: dict[str, Any]) -> RequestRecord:
        import aiohttp

        body: dict[str, Any] = {"model": self.model, "max_tokens": new_tokens, "min_tokens": new_tokens,
                                "stream": True, "stream_options": {"include_usage": True}, **params}
        if prompt.chat:
            path = "/chat/completions"
            body["messages"] = [{"role": "user", "content": prompt.prompt}]
        else:
            path = "/completions"
            body["prompt"] = prompt.prompt if isinstance(prompt.prompt, str) else list(prompt.prompt)
        rec = RequestRecord()
        t0 = last = time.perf_counter()
        finished = False
        try:
            async with self._open().post(self.base + path, json=body) as r:
                if r.status != 200:
                    await r.read()
                    rec.error = f"http_{r.status}"
                    return rec
                async for raw in r.content:  # one line at a time
                    if not raw.startswith(b"data: "):
                        continue
                    data = raw[6:].rstrip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rec.error = "stream_error"
                        return rec
                    if chunk.get("usage"):
                        rec.output_tokens = int(chunk["usage"]["completion_tokens"])
                        rec.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                    for choice in chunk.get("choices") or ():
                        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                        if text:
                            now = time.perf_counter()
                            if math.isnan(rec.ttft_s):
                                rec.ttft_s = now - t0
                            else:
                                rec.itl_s.append(now - last)
                            last = now
                        finished = finished or choice.get("finish_reason") is not None
        except TimeoutError:
            rec.error = "timeout"
            return rec
        except (aiohttp.ClientError, OSError):
            rec.error = "connection"
            return rec
        rec.e2e_s = time.perf_counter() - t0
        if not finished:
            rec.error = "incomplete"
        else:
            rec.ok = True
            if not rec.output_tokens:
                rec.output_tokens = len(rec.itl_s) + (0 if math.isnan(rec.ttft_s) else 1)
        return rec


class EngineTarget:
    """A :class:`runtime.Engine` in this process at its best, under the same schedule (no HTTP).

    Each request is submitted and read by a thread of its own (``for event in request``), as N
    callers of a service would, so nothing stands between the engine's loop and its callers but
    the request's own queue: no asyncio loop relays the tokens (one did before, and it measured
    that loop's per-token cost, not the engine's). ``callers`` bounds the threads.
    """

    kind = "engine (in-process)"

    def __init__(self, engine: Any, name: str = "engine", callers: int = 512) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.engine = engine
        self.vocab = int(engine.vocab)
        self.name = f"{name} (in-process engine)"
        self._pool = ThreadPoolExecutor(max_workers=callers, thread_name_prefix="lmforge-bench-caller")

    async def prepare(self) -> None:
        return None

    async def close(self) -> None:
        self._pool.shutdown(wait=False)

    async def send(self, prompt: LoadPrompt, new_tokens: int, params: dict[str, Any]) -> RequestRecord:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._send, prompt, new_tokens, params)

    def _send(self, prompt: LoadPrompt, new_tokens: int, params: dict[str, Any]) -> RequestRecord:
        from runtime import SamplingParams
        from runtime.errors import (
            EngineClosedError,
            InvalidRequestError,
            QueueFullError,
        )

        rec = RequestRecord()
        t0 = last = time.perf_counter()
        try:
            ids: Any = prompt.prompt if isinstance(prompt.prompt, str) else list(prompt.prompt)
            if prompt.chat:
                ids = self.engine.chat_ids([{"role": "user", "content": prompt.prompt}])
            sampling = SamplingParams(min_new_tokens=new_tokens, **params)
            req = self.engine.submit(ids, max_new_tokens=new_tokens, sampling=sampling)
            for event in req:
                if event.text:
                    now = time.perf_counter()
                    if math.isnan(rec.ttft_s):
                        rec.ttft_s = now - t0
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                if event.result is not None:
                    rec.output_tokens = event.result.new_tokens
                    rec.prompt_tokens = event.result.prompt_tokens
        except QueueFullError:
            rec.error = "queue_full"
            return rec
        except EngineClosedError:
            rec.error = "closed"
            return rec
        except InvalidRequestError:
            rec.error = "invalid"
            return rec
        except GenerationError:
            rec.error = "failed"
            return rec
        rec.e2e_s = time.perf_counter() - t0
        rec.ok = True
        return rec


# -- a server of our own ---------------------------------------------------------------------------

_LISTENING = re.compile(r"^lmforge serve: .* on (https?://\S+) \(", re.MULTILINE)


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that asks for SIGTERM when the thread that started the child dies,
    so a bench run killed outright (SIGKILL, OOM) does not leave its server holding the port and the
    device. ``prctl`` is looked up here, in the parent: the child only calls it."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG; best effort, stop() is the guarantee


class ServerProcess:
    """``lmforge serve ARTIFACT`` as its own process on a port the OS picks; a context manager.

    ``start()`` returns once the server printed the URL it listens on and answers ``GET /ready``
    (within ``start_timeout_s``), or raises :class:`GenerationError` with the tail of its stderr.
    ``stop()`` sends SIGTERM (the server drains), waits ``stop_timeout_s``, then kills. The child
    gets this process's environment with the repository on ``PYTHONPATH`` (it runs the same
    lmforge) and without ``LMFORGE_API_KEY`` (the load goes out without a key).
    """

    def __init__(self, artifact: str | Path, *, device: str = "cpu", max_batch: int = DEFAULTS.max_batch,
                 max_queue: int = DEFAULTS.max_queue,
                 threads: int | None = None, api_workers: int = 1, in_process: bool = False,
                 stream_interval: int = 1, prefill_tokens: int | None = None, start_timeout_s: float = 120.0,
                 stop_timeout_s: float = 60.0) -> None:
        self.artifact = str(artifact)
        self.command = [sys.executable, "-m", "lmforge", "serve", self.artifact, "--host", "127.0.0.1",
                        "--port", "0", "--device", device, "--max-batch", str(max_batch),
                        "--max-queue", str(max_queue)]
        if threads is not None:
            self.command += ["--threads", str(threads)]
        if in_process:
            self.command += ["--in-process"]
        elif api_workers != 1:
            self.command += ["--api-workers", str(api_workers)]
        if stream_interval != 1:
            self.command += ["--stream-interval", str(stream_interval)]
        if prefill_tokens is not None:
            self.command += ["--prefill-tokens", str(prefill_tokens)]
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._logs: tempfile.TemporaryDirectory[str] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def describe(self) -> dict[str, Any]:
        """How the target was served, for the report."""
        return {"served": f"separate process, pid {self.pid}", "pid": self.pid, "url": self.url,
                "command": shlex.join(self.command)}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEY"}
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    def _read(self, name: str) -> str:
        assert self._logs is not None
        return (Path(self._logs.name) / name).read_text(encoding="utf-8", errors="replace")

    def stderr_tail(self, lines: int = 5) -> str:
        """The last non-empty lines of the server's stderr, joined into one line."""
        if self._logs is None:
            return ""
        tail = collections.deque((x.strip() for x in self._read("stderr.log").splitlines() if x.strip()), lines)
        return " // ".join(tail) or "(nothing)"

    def _fail(self, what: str) -> GenerationError:
        return GenerationError(f"the server for {self.artifact} did not start", got=f"{what}; its stderr ends: "
                               f"{self.stderr_tail()}", fix="run the command alone to see why: "
                               + shlex.join(self.command[1:]).replace("-m lmforge", "lmforge", 1))

    def start(self) -> ServerProcess:
        import httpx

        self._logs = tempfile.TemporaryDirectory(prefix="lmforge-bench-serve-")
        logs = Path(self._logs.name)
        with open(logs / "stdout.log", "wb") as out, open(logs / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env=self._env(), preexec_fn=_parent_death_signal())
        log.info("started %s (pid %d)", shlex.join(self.command), self.proc.pid)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while not self.url:
                if (code := self.proc.poll()) is not None:
                    raise self._fail(f"it exited with code {code}")
                if m := _LISTENING.search(self._read("stdout.log")):
                    self.url = m.group(1)
                elif time.monotonic() > deadline:
                    raise self._fail(f"no URL printed within {self.start_timeout_s:g} s")
                else:
                    time.sleep(0.05)
            with httpx.Client(timeout=5.0) as client:
                while True:
                    if (code := self.proc.poll()) is not None:
                        raise self._fail(f"it exited with code {code}")
                    try:
                        if client.get(self.url + "/ready").status_code == 200:
                            return self
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise self._fail(f"{self.url}/ready did not answer 200 within {self.start_timeout_s:g} s")
                    time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        """SIGTERM, wait, kill if it must; the exit code (None if it never started). Idempotent."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("the server (pid %d) did not stop within %g s of SIGTERM: killing it",
                                self.proc.pid, self.stop_timeout_s)
                    self.proc.kill()
            code = self.proc.wait()
        finally:
            if self.proc.poll() is None:  # interrupted while waiting: never leave it behind
                self.proc.kill()
                self.proc.wait()
        if code not in (0, -signal.SIGTERM) and self._logs is not None and self.url:
            log.warning("the server (pid %d) exited with code %s; its stderr ends: %s", self.proc.pid, code,
                        self.stderr_tail())
        if self._logs is not None:
            self._logs.cleanup()
            self._logs = None
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


Send = Callable[[int], Coroutine[Any, Any, RequestRecord]]
"""``send(i)`` sends the ``i``-th request of a point."""


# -- schedules -----------------------------------------------------------------------------------


async def run_open_loop(send: Send, count: int, rate: float, seed: int = 0,
                        max_seconds: float | None = None) -> tuple[list[RequestRecord], float]:
    """``count`` requests with Poisson arrivals at ``rate``/s (``inf``: all at once); the records and
    the duration from the first send to the last end. Arrivals stop after ``max_seconds``."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[RequestRecord]] = []
    at = 0.0
    for i in range(count):
        if max_seconds is not None and at > max_seconds:
            break
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i)))
        if math.isfinite(rate):
            at += float(rng.exponential(1.0 / rate))
    records = list(await asyncio.gather(*tasks))
    return records, time.perf_counter() - t0


async def run_closed_loop(send: Send, count: int, concurrency: int,
                          max_seconds: float | None = None) -> tuple[list[RequestRecord], float]:
    """``concurrency`` clients, each sending its next request when its last one ended, ``count`` in all
    (no new request after ``max_seconds``)."""
    records: list[RequestRecord] = []
    counter = iter(range(count))
    t0 = time.perf_counter()

    async def client() -> None:
        for i in counter:
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                return
            records.append(await send(i))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records, time.perf_counter() - t0


# -- the report ----------------------------------------------------------------------------------


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": round(float(a.mean()), 3), "p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3)}


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> dict[str, Any]:
    """One point's numbers: throughput, latency percentiles (ms), errors by kind, goodput."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    duration_s = max(duration_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    met = sum(1 for r in ok if slo.met(r))
    return {
        "requests": len(records),
        "completed": len(ok),
        "errors": errors,
        "duration_s": round(duration_s, 3),
        "request_throughput": round(len(ok) / duration_s, 4),
        "output_tok_s": round(out_tokens / duration_s, 2),
        "total_tok_s": round((out_tokens + sum(r.prompt_tokens for r in ok)) / duration_s, 2),
        "output_tokens": out_tokens,
        "ttft_ms": _dist([r.ttft_s for r in ok if not math.isnan(r.ttft_s)]),
        "itl_ms": _dist([g for r in ok for g in r.itl_s]),
        # per token: each request's (e2e - ttft) / (tokens - 1), as vLLM's TPOT (itl_ms is per chunk)
        "tpot_ms": _dist([(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
                          if r.output_tokens > 1 and not math.isnan(r.ttft_s)]),
        "e2e_ms": _dist([r.e2e_s for r in ok]),
        "goodput_req_s": round(met / duration_s, 4),
        "slo_met_fraction": round(met / len(records), 4) if records else None,
    }
