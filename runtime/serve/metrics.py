"""Prometheus metrics of one server, in their own ``CollectorRegistry`` (several apps per process
do not collide; ``/metrics`` renders this registry only).

Counted by the request handlers: requests by endpoint and outcome, prompt and generated tokens,
histograms of time to first token, inter-token latency, end-to-end latency and queue wait.
Read from ``engine.stats()`` at scrape time: queue depth, running batch size, the limits, steps
(decoders only: an encoder has no queue). For ``/v1/embeddings``: requests by outcome (endpoint
``embeddings``), inputs and tokens embedded, and a request latency histogram.

With ``lmforge serve --instances N`` (N whole servers) every worker process has its own registry,
and ``/metrics`` reports **the worker that answers the scrape** (not a sum):
``lmforge_worker_info{worker, pid}`` says which. With ``--api-workers N`` (N front-ends of one
engine core) the counters and histograms are **summed over the front-ends**: the server sets
``PROMETHEUS_MULTIPROC_DIR`` before they start, each writes its values there, and a scrape
renders prometheus-client's ``MultiProcessCollector`` over that folder, beside the gauges read
live (the core's queue, batch and steps, which every front-end sees alike; ``lmforge_core_pid``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["OUTCOMES", "ServeMetrics"]

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "cancelled", "deadline", "invalid", "unauthorized", "not_found", "too_large", "rejected",
            "error", "unavailable")
"""``ok``: finished by stop or length; ``cancelled``: the client went away; ``deadline``: ran out of
time; ``rejected``: queue full (429); ``unavailable``: draining or closed (503); ``error``: 500."""

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
        1.0, 2.5)
_E2E = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineCollector(Collector):
    """Gauges read from the engine (and this process) when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], Any] | None, draining: Callable[[], bool],
                 core_pid: Callable[[], int | None] | None = None) -> None:
        self._stats = stats
        self._draining = draining
        self._core_pid = core_pid
        self.worker: int | None = None

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("lmforge_draining", "1 while the server drains (new requests get 503).",
                                value=1.0 if self._draining() else 0.0)
        if self.worker is not None:
            info = GaugeMetricFamily("lmforge_worker_info", "The worker process answering (lmforge serve "
                                     "--instances / --api-workers).", labels=["worker", "pid"])
            info.add_metric([str(self.worker), str(os.getpid())], 1.0)
            yield info
        pid = self._core_pid() if self._core_pid is not None else None
        if pid is not None:
            yield GaugeMetricFamily("lmforge_core_pid", "The engine core process's pid (a new one after a restart).",
                                    value=float(pid))
        if self._stats is None:  # an encoder: no queue, no running batch
            return
        try:
            s = self._stats()
        except Exception as exc:  # noqa: BLE001 — a scrape must not fail because the engine is closing
            log.debug("engine.stats() failed during a scrape: %s", exc)
            return
        yield GaugeMetricFamily("lmforge_queue_depth", "Requests waiting for a slot in the running batch.",
                                value=s.queued)
        yield GaugeMetricFamily("lmforge_running_requests", "Requests in the running batch.", value=s.running)
        yield GaugeMetricFamily("lmforge_max_batch", "The engine's running-batch limit.", value=s.max_batch)
        yield GaugeMetricFamily("lmforge_max_queue", "The engine's queue limit.", value=s.max_queue)
        yield CounterMetricFamily("lmforge_engine_steps", "Steps the engine's loop has run.", value=s.steps)


class ServeMetrics:
    """The server's metrics; ``render()`` is the ``/metrics`` body and content type."""

    def __init__(self, stats: Callable[[], Any] | None, draining: Callable[[], bool],
                 endpoints: tuple[str, ...] = ("completions", "chat"),
                 core_pid: Callable[[], int | None] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self._live = _EngineCollector(stats, draining, core_pid)
        self._shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        if self._shared:  # --api-workers: counters summed over the front-ends' files, gauges live
            from prometheus_client.multiprocess import MultiProcessCollector

            self.render_registry = CollectorRegistry()
            MultiProcessCollector(self.render_registry, path=self._shared)
            self.render_registry.register(self._live)
        else:
            self.render_registry = r
        self.requests = Counter("lmforge_requests", "HTTP generation requests by endpoint and outcome.",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Tokens generated (streamed or returned).",
                                         registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds",
                              "Submission to first token, per choice (engine-side).", buckets=_LATENCY, registry=r)
        self.itl = Histogram("lmforge_inter_token_latency_seconds",
                             "Time between consecutive tokens of one choice.", buckets=_ITL, registry=r)
        self.e2e = Histogram("lmforge_e2e_request_latency_seconds",
                             "HTTP request arrival to its last token (whole request, all choices).",
                             buckets=_E2E, registry=r)
        self.queue_wait = Histogram("lmforge_queue_wait_seconds", "Submission to admission into the running batch.",
                                    buckets=_LATENCY, registry=r)
        self.embedding_inputs = Counter("lmforge_embedding_inputs", "Inputs (texts or token arrays) embedded.",
                                        registry=r)
        self.embedding_tokens = Counter("lmforge_embedding_tokens", "Tokens embedded (special tokens included).",
                                        registry=r)
        self.embedding_latency = Histogram("lmforge_embedding_request_latency_seconds",
                                           "HTTP request arrival to its embeddings, per /v1/embeddings request.",
                                           buckets=_LATENCY, registry=r)
        if not self._shared:
            r.register(self._live)
        for endpoint in endpoints:  # every series exists from the start (rates work at 0)
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)

    def set_worker(self, index: int) -> None:
        """Label this registry's scrapes with the worker index and this process's pid."""
        self._live.worker = index

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.render_registry), CONTENT_TYPE_LATEST
