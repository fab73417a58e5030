"""Replicas on Ray Serve (runtime/serve/ray_serve.py), on a one-node Ray cluster of this machine: two
CPU replicas of the tiny artifact behind one port answer the `openai` client with the engine's
greedy text; 32 concurrent requests spread over both (response headers and the deployment's
/metrics, labelled by replica); a replica killed mid-load fails only its own streams, each with
an error event that says so, while the other finishes its own, and Serve brings it back; a
replica's engine core (a child process of the replica) killed mid-load does the same; scaling
1 → 2 replicas (and 2 → 1) under load fails no request; and a replica with its engine in its own
process serves the same text."""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve replicas need the ray extra: pip install 'lmforge[ray]'")
openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray import serve  # noqa: E402

from runtime import Engine, SamplingParams  # noqa: E402
from runtime.serve.instances import ModelOptions  # noqa: E402
from runtime.serve.ray_serve import PROXY_CALLBACK, PUBLISH_S, REPLICA_HEADER, RayOptions, build_app  # noqa: E402

PROMPT = "Once upon a time"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, artifact: Path, url: str) -> None:
        self.model = ModelOptions(str(artifact), max_batch=16, verify_hashes=False, drain_timeout_s=30)
        self.url = url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

    def deploy(self, replicas: int, max_replicas: int | None = None, engine_process: bool = True) -> None:
        autoscale = dict(target_ongoing_requests=2.0, upscale_delay_s=0.5, downscale_delay_s=600.0,
                         look_back_period_s=1.0) if max_replicas else {}
        serve.run(build_app(self.model, RayOptions(replicas=replicas, max_replicas=max_replicas,
                                                   engine_process=engine_process, **autoscale)),
                  name="lmforge")

    def replicas(self) -> set[str]:
        return {a["name"].rsplit("#", 1)[1] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::lmforge#")}

    def running(self) -> int:
        status = serve.status().applications["lmforge"].deployments["lmforge"]
        return int(status.replica_states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path) -> Iterator[Cluster]:
    port = _free_port()
    previous = os.environ.get("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH")
    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = PROXY_CALLBACK  # Serve's proxy inherits it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        c = Cluster(tiny_llama, f"http://127.0.0.1:{port}")
        c.deploy(2)
        yield c
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if previous is None:
                os.environ.pop("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", None)
            else:
                os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = previous


@pytest.fixture(scope="module")
def greedy(tiny_llama: Path) -> dict[int, str]:
    """The engine's own greedy text (in this process) for PROMPT, by max_tokens."""
    with Engine.load(tiny_llama, max_batch=1) as engine:
        return {n: engine.submit(PROMPT, n, SamplingParams(temperature=0.0)).result(timeout=60).text
                for n in (12, 24)}


def _completion(client: Any, max_tokens: int = 12) -> tuple[str, str]:
    raw = client.completions.with_raw_response.create(model="tiny-llama", prompt=PROMPT, max_tokens=max_tokens,
                                                      temperature=0)
    return raw.parse().choices[0].text, raw.headers[REPLICA_HEADER]


def _ok_requests(url: str) -> dict[str, float]:
    """lmforge_requests_total{endpoint="completions", outcome="ok"} by replica, from /metrics."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            if (s.name == "lmforge_requests_total" and s.labels.get("endpoint") == "completions"
                    and s.labels.get("outcome") == "ok"):
                out[s.labels["replica"]] = s.value
    return out


def test_two_replicas_answer_the_openai_client_with_the_engines_greedy_text(cluster: Cluster,
                                                                           greedy: dict[int, str]) -> None:
    assert cluster.running() == 2
    text, replica = _completion(cluster.client, 12)
    assert text == greedy[12] and len(text) > 0
    assert replica in cluster.replicas()
    chunks = list(cluster.client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24,
                                                    temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy[24]  # SSE through Serve's proxy
    assert httpx.get(cluster.url + "/ready").status_code == 200
    assert cluster.client.models.list().data[0].id == "tiny-llama"


def test_32_concurrent_requests_spread_over_both_replicas(cluster: Cluster, greedy: dict[int, str]) -> None:
    deadline = time.monotonic() + 30
    while len(before := _ok_requests(cluster.url)) < 2:  # until both replicas are on the metrics board
        assert time.monotonic() < deadline, before
        time.sleep(0.5)
    time.sleep(2 * PUBLISH_S + 0.5)  # the board holds every request the first test made, and was read back
    before = _ok_requests(cluster.url)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda _: _completion(cluster.client, 24), range(32)))
    assert {text for text, _ in results} == {greedy[24]}
    by_header = collections.Counter(replica for _, replica in results)
    assert len(by_header) == 2 and min(by_header.values()) >= 4, by_header
    deadline = time.monotonic() + 10
    while True:  # the answering replica's counters are live, the other's at most PUBLISH_S old
        after = _ok_requests(cluster.url)
        delta = {r: after[r] - before.get(r, 0.0) for r in after}
        if sum(delta.values()) == 32 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {r: int(v) for r, v in delta.items() if v} == dict(by_header), (before, after)


def _stream(client: Any, max_tokens: int, started: threading.Barrier | None = None) -> tuple[str | None, str, int]:
    """(replica, "done" or the error's message, chunks) of one streamed completion."""
    raw = client.completions.with_raw_response.create(model="tiny-llama", prompt=PROMPT, max_tokens=max_tokens,
                                                      extra_body={"min_tokens": max_tokens}, temperature=0, stream=True)
    replica = raw.headers.get(REPLICA_HEADER)
    if started is not None:
        started.wait(timeout=60)
    n = 0
    try:
        for chunk in raw.parse():
            n += len(chunk.choices)
    except openai.APIError as exc:
        return replica, str(exc.message), n
    return replica, "done", n


def _kill_mid_load(cluster: Cluster, kill: Callable[[str], None], says: str) -> str:
    """16 long streams over both replicas; once every one has its first token, ``kill(victim)``.
    The victim's streams must end with an error containing ``says``, the other's complete.
    Returns the victim."""
    before = cluster.replicas()
    assert len(before) == 2
    streams = 16
    started = threading.Barrier(streams + 1)
    with ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(_stream, cluster.client, 480, started) for _ in range(streams)]
        started.wait(timeout=60)  # every stream has its first token, and its replica's name
        time.sleep(0.2)
        assert not [f for f in futures if f.done()], "the streams finished before the kill: make them longer"
        victim = sorted(before)[0]
        kill(victim)
        results = [f.result(timeout=120) for f in futures]
    on: collections.Counter[str | None] = collections.Counter()
    for replica, outcome, _ in results:
        on[replica] += 1
        if replica == victim:
            assert says in outcome, outcome
        else:
            assert outcome == "done", outcome
    assert set(on) == before and min(on.values()) >= 1, on
    return victim


def test_a_killed_replica_fails_only_its_own_requests_and_comes_back(cluster: Cluster) -> None:
    before = cluster.replicas()
    victim = _kill_mid_load(cluster, lambda replica: ray.kill(ray.get_actor(
        f"SERVE_REPLICA::lmforge#lmforge#{replica}", namespace="serve"), no_restart=True),
        "replica serving this request stopped")
    survivor = (before - {victim}).pop()
    assert _completion(cluster.client)[1] in {survivor} | (cluster.replicas() - before)  # the other keeps serving
    deadline = time.monotonic() + 90
    while cluster.running() < 2 or len(cluster.replicas() - before) != 1:
        assert time.monotonic() < deadline, "Serve did not bring the killed replica back"
        time.sleep(0.5)
    assert cluster.replicas() - before and survivor in cluster.replicas() and victim not in cluster.replicas()
    seen = {_completion(cluster.client)[1] for _ in range(24)}
    assert seen <= cluster.replicas()


def _core_pids(url: str) -> dict[str, int]:
    """Each replica's engine core process id, from lmforge_replica_info on /metrics."""
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == "lmforge_replica_info" and s.labels.get("core_pid"):
                out[s.labels["replica"]] = int(s.labels["core_pid"])
    return out


def test_a_replicas_engine_core_that_dies_fails_its_requests_and_serve_replaces_the_replica(cluster: Cluster) -> None:
    """Each decoder replica runs its engine in a core child process: killing that process fails the
    replica's streams in flight with an error that says so (the other replica's finish), the
    replica's health check fails, and Serve puts a new replica in its place."""
    before = cluster.replicas()
    deadline = time.monotonic() + 30
    while set(pids := _core_pids(cluster.url)) != before:  # both replicas on the metrics board
        assert time.monotonic() < deadline, (pids, before)
        time.sleep(0.5)
    victim = _kill_mid_load(cluster, lambda replica: os.kill(pids[replica], 9), "engine core process stopped")
    deadline = time.monotonic() + 120  # the health check (every 5 s) fails, Serve starts a new replica
    while victim in cluster.replicas() or cluster.running() < 2:
        assert time.monotonic() < deadline, "Serve did not replace the replica whose engine core died"
        time.sleep(0.5)
    seen = {_completion(cluster.client)[1] for _ in range(24)}
    assert seen <= cluster.replicas() and victim not in seen


def test_scaling_from_1_to_2_replicas_under_load_fails_no_request(cluster: Cluster, greedy: dict[int, str]) -> None:
    stop = threading.Event()
    failures: list[str] = []
    answered: collections.Counter[str] = collections.Counter()

    def load() -> None:
        while not stop.is_set():
            try:
                text, replica = _completion(cluster.client, 24)
            except Exception as exc:  # noqa: BLE001 — every failure is the test's finding
                failures.append(repr(exc))
                continue
            if text != greedy[24]:
                failures.append(f"wrong text {text!r}")
            answered[replica] += 1

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        # a new deployment, autoscaling from 1 replica: Serve replaces the two (draining them) by one
        cluster.deploy(1, max_replicas=2)
        assert cluster.running() >= 1
        time.sleep(2.0)  # answers of the replaced replicas' requests still in flight come in
        answered.clear()  # from here on, only the new deployment's replicas answer
        deadline = time.monotonic() + 60
        # 8 clients against a target of 2 per replica: up to 2, and both answer
        while cluster.running() < 2 or len(set(answered) & cluster.replicas()) < 2:
            assert time.monotonic() < deadline, f"Serve did not scale up: {cluster.running()} running, {answered}"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures[:3]
    assert cluster.running() == 2
    assert len(set(answered) & cluster.replicas()) == 2, answered  # the deployment's two replicas both served


def test_a_replica_can_run_its_engine_in_its_own_process(cluster: Cluster, greedy: dict[int, str]) -> None:
    """``engine_process=False`` (``--replicas N --in-process``): the replica serves the same greedy
    text with no core process (its ``core_pid`` label is empty)."""
    cluster.deploy(1, engine_process=False)
    text, replica = _completion(cluster.client, 12)
    assert text == greedy[12] and replica in cluster.replicas()
    deadline = time.monotonic() + 30
    while True:
        info = [s.labels for family in text_string_to_metric_families(httpx.get(cluster.url + "/metrics").text)
                for s in family.samples if s.name == "lmforge_replica_info" and s.labels["replica"] == replica]
        if info or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert info and info[0]["core_pid"] == "" and int(info[0]["pid"]) > 0, info


# -- the command line and the app builder (no cluster) ------------------------------------------


def test_missing_ray_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    from lmforge.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert main(["serve", "artifacts/none", "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'lmforge[ray]'" in err


@pytest.mark.parametrize("argv, says", [
    (["--replicas", "0"], "--replicas"),
    (["--replicas", "2", "--instances", "2"], "--instances"),
    (["--replicas", "2", "--api-workers", "2"], "--api-workers"),
    (["--replicas", "2", "--threads", "1"], "--threads"),
    (["--replicas", "2", "--max-replicas", "1"], "--max-replicas"),
    (["--replicas", "1", "--target-ongoing-requests", "0"], "--target-ongoing-requests"),
    (["--max-replicas", "3"], "--max-replicas without --replicas"),
    (["--cpus-per-replica", "2"], "--cpus-per-replica without --replicas"),
    (["--ray-haproxy"], "--ray-haproxy without --replicas"),
    (["--ray", "auto", "--ray-haproxy"], "--ray-haproxy with --ray"),
])
def test_bad_replica_flags_are_one_line_errors(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    assert main(["serve", "artifacts/none", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err, err


def test_app_builder_args_and_deployment_options(tiny_llama: Path) -> None:
    from runtime.errors import LmforgeError
    from runtime.serve.ray_serve import _typed, app_builder

    assert _typed(ModelOptions, "max_batch", "8") == 8
    assert _typed(ModelOptions, "verify_hashes", "false") is False
    assert _typed(ModelOptions, "prefill_tokens", "none") is None
    assert _typed(RayOptions, "target_ongoing_requests", "4") == 4.0
    with pytest.raises(LmforgeError, match="max_batchh"):
        app_builder({"artifact": str(tiny_llama), "max_batchh": "8"})
    model = ModelOptions(str(tiny_llama), max_batch=8, device="cuda")
    fixed = RayOptions(replicas=3).deployment_options(model)
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1.0}
    assert fixed["max_ongoing_requests"] == 16 and "autoscaling_config" not in fixed
    auto = RayOptions(replicas=1, max_replicas=4, cpus_per_replica=2).deployment_options(
        ModelOptions(str(tiny_llama), max_batch=8))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                                          "target_ongoing_requests": 8.0}
    assert auto["ray_actor_options"] == {"num_cpus": 2} and "num_replicas" not in auto
