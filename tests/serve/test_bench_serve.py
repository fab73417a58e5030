"""bench-serve's load generator: flag parsing, the report, bounded runs against a served fake engine, and an
artifact served by `lmforge serve` as its own process (started, measured, stopped; never left behind)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

from lmforge.benchmark import serve_load
from lmforge.benchmark.serve_load import RequestRecord, Slo
from lmforge.cli import main
from runtime.errors import GenerationError


def test_parse_flags() -> None:
    assert serve_load.parse_rates("1, 2.5,inf") == (1.0, 2.5, math.inf)
    assert serve_load.parse_mix("greedy:1,sampled:3").greedy == 0.25
    assert serve_load.parse_mix("sampled:1").greedy == 0.0
    slo = serve_load.parse_slo("ttft=200ms,itl=50,e2e=2s")
    assert (slo.ttft_s, slo.itl_s, slo.e2e_s) == (0.2, 0.05, 2.0)
    for bad in ("0", "x", "-1"):
        with pytest.raises(GenerationError, match="--rates"):
            serve_load.parse_rates(bad)
    with pytest.raises(GenerationError, match="--mix"):
        serve_load.parse_mix("greedy:x")
    with pytest.raises(GenerationError, match="--slo"):
        serve_load.parse_slo("tpot=5ms")


def test_summarize_percentiles_errors_and_goodput() -> None:
    recs = [RequestRecord(ok=True, ttft_s=0.1 * (i + 1), itl_s=[0.01, 0.03], e2e_s=1.0, output_tokens=3,
                          prompt_tokens=5) for i in range(4)]
    recs += [RequestRecord(error="http_429"), RequestRecord(error="http_429"), RequestRecord(error="timeout")]
    s = serve_load.summarize(recs, 2.0, Slo(ttft_s=0.25, itl_s=0.025))
    assert s["requests"] == 7 and s["completed"] == 4
    assert s["errors"] == {"http_429": 2, "timeout": 1}
    assert s["output_tok_s"] == 6.0 and s["request_throughput"] == 2.0 and s["total_tok_s"] == 16.0
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0) and s["itl_ms"]["p50"] == pytest.approx(20.0)
    assert s["goodput_req_s"] == 1.0  # ttft 100 and 200 ms meet it; mean ITL 20 ms meets 25 ms


def test_random_prompts_lengths_and_ids() -> None:
    prompts = serve_load.random_prompts(50, 20, vocab=300, seed=1)
    lengths = [len(p.prompt) for p in prompts]
    assert min(lengths) >= 10 and max(lengths) <= 30 and len(set(lengths)) > 5
    assert all(100 <= i < 300 for p in prompts for i in p.prompt)
    assert serve_load.random_prompts(5, 20, 300, seed=1) == prompts[:5]


def test_schedules_on_the_fake_engine() -> None:
    from tests.serve.fake_engine import FakeEngine, expected_text

    engine = FakeEngine(max_batch=4, step_s=0.002)
    target = serve_load.EngineTarget(engine)
    prompts = [serve_load.LoadPrompt((1, 2, 3))]

    async def go() -> tuple[list[RequestRecord], float, list[RequestRecord], float]:
        send = lambda i: target.send(prompts[0], 6, {"temperature": 0.0})  # noqa: E731
        open_records, open_s = await serve_load.run_open_loop(send, 6, 200.0, seed=3)
        closed_records, closed_s = await serve_load.run_closed_loop(send, 5, 2)
        return open_records, open_s, closed_records, closed_s

    try:
        open_records, _, closed_records, _ = asyncio.run(go())
    finally:
        engine.close()
    assert len(open_records) == 6 and len(closed_records) == 5
    for r in open_records + closed_records:
        assert r.ok and r.output_tokens == 6 and len(r.itl_s) == 5 and r.ttft_s > 0 and r.e2e_s >= r.ttft_s
    assert all(len(req.prompt_ids) == 3 for req in engine.submitted)
    assert engine.submitted[0].result().text == expected_text([1, 2, 3], 6)


def test_bench_serve_against_a_served_fake_engine(fake_server, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    server, engine = fake_server(max_batch=4, max_queue=64, step_s=0.002)
    out = tmp_path / "report.json"
    t0 = time.perf_counter()
    code = main(["bench-serve", server.url, "--rates", "50,inf", "--concurrency", "1,4", "--requests", "8",
                 "--prompt-len", "12", "--new-tokens", "6", "--slo", "ttft=5s,itl=1s", "--json", str(out),
                 "--plot", str(tmp_path / "plot.png"), "--max-seconds", "20"])
    assert code == 0 and time.perf_counter() - t0 < 30
    report = json.loads(out.read_text())
    assert [(p["mode"], p["value"]) for p in report["results"]] == [("rate", 50.0), ("rate", "inf"),
                                                                    ("concurrency", 1), ("concurrency", 4)]
    for p in report["results"]:
        assert p["errors"] == {} and p["completed"] == p["requests"] == 8
        assert p["output_tokens"] == 8 * 6 and p["output_tok_s"] > 0
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            d = p[key]
            assert 0 < d["p50"] <= d["p90"] <= d["p99"]
        assert p["goodput_req_s"] == p["request_throughput"]
    assert (tmp_path / "plot.png").stat().st_size > 1000
    # half the requests sampled (seeded), half greedy; every request asked for exactly 6 tokens
    samples = [r.sampling for r in engine.submitted]
    assert 0 < sum(s.temperature > 0 for s in samples) < len(samples)
    assert all(s.min_new_tokens == 6 for s in samples)
    assert "concurrency" in capsys.readouterr().out


def test_bench_serve_counts_refusals_by_kind(fake_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    server, _ = fake_server(max_batch=1, max_queue=1, step_s=0.01)
    out = tmp_path / "r.json"
    assert main(["bench-serve", server.url, "--rates", "inf", "--requests", "6", "--prompt-len", "4",
                 "--new-tokens", "5", "--warmup", "0", "--json", str(out)]) == 0
    (point,) = json.loads(out.read_text())["results"]
    assert point["errors"].get("http_429", 0) >= 3 and point["completed"] + point["errors"]["http_429"] == 6


def test_sampled_requests_carry_valid_seeds_for_warm_up_indices() -> None:
    """Warm-up requests use negative indices; their seeds must still be valid (a negative seed is a 400)."""
    import random

    from runtime import SamplingParams

    mix = serve_load.Mix(greedy=0.0)
    for i in (-100_003, -1, 0, 7):
        params = mix.params(random.Random(i), i)
        SamplingParams(temperature=params["temperature"], top_p=params["top_p"], seed=params["seed"])


# -- an artifact served by `lmforge serve` as its own process ------------------------------------------------------

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds child processes in /proc")


def _serve_children() -> list[int]:
    """Pids of this process's children (or their children) running `lmforge serve`."""
    parents, found = {os.getpid()}, []
    procs = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                procs.append((int(d.name), ppid, (d / "cmdline").read_bytes().split(b"\0")))
            except (OSError, IndexError, ValueError):
                continue
    for _ in range(3):
        parents |= {pid for pid, ppid, _ in procs if ppid in parents}
    for pid, ppid, cmd in procs:
        if ppid in parents and b"lmforge" in cmd and b"serve" in cmd:
            found.append(pid)
    return found


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()  # a zombie (exited, never waited for) still counts as left behind


@needs_proc
def test_bench_serve_serves_an_artifact_in_its_own_process(tiny_llama: Path, tmp_path: Path, monkeypatch,
                                                           capsys) -> None:  # type: ignore[no-untyped-def]
    from runtime import Engine

    real_load = Engine.load
    servers_at_load: list[list[int]] = []

    engine_threads: list[int | None] = []

    def load(*args, **kwargs):  # type: ignore[no-untyped-def]
        servers_at_load.append(_serve_children())
        engine_threads.append(kwargs.get("threads"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Engine, "load", load)
    out = tmp_path / "report.json"
    t0 = time.perf_counter()
    assert main(["bench-serve", str(tiny_llama), "--concurrency", "2", "--requests", "4", "--prompt-len", "16",
                 "--new-tokens", "8", "--warmup", "1", "--max-batch", "4", "--compare-engine",
                 "--threads", "2", "--server-threads", "1", "--json", str(out)]) == 0
    assert time.perf_counter() - t0 < 60
    report = json.loads(out.read_text())
    served, engine = report["targets"]
    pid = served["pid"]
    assert served["served"] == f"separate process, pid {pid}" and pid != os.getpid()
    assert served["command"].startswith(f"{sys.executable} -m lmforge serve {tiny_llama} --host 127.0.0.1 --port 0")
    assert "--max-batch 4" in served["command"] and served["url"].startswith("http://127.0.0.1:")
    # each side at its own thread count: the server --server-threads, the engine --threads
    assert "--threads 1" in served["command"] and "--threads 2" not in served["command"]
    assert engine_threads == [2, 2]
    assert not served["url"].endswith(":0") and served["target"].endswith(served["url"])
    assert "in-process" in engine["served"]
    # the HTTP points came from the child; the engine was loaded here before the child started and
    # again after it had stopped, never beside it
    assert servers_at_load == [[], []]
    assert [(p["kind"], p["target"]) for p in report["results"]] == [
        ("http", served["target"]), ("engine (in-process)", engine["target"]),
        ("engine (in-process, after)", engine["target"])]
    (ratio,) = report["http_over_engine"]
    tok_s = [p["output_tok_s"] for p in report["results"]]
    assert ratio["engine_output_tok_s"] == tok_s[1:]
    assert ratio["output_tok_s"] == pytest.approx(tok_s[0] / ((tok_s[1] + tok_s[2]) / 2), abs=1e-3)
    for p in report["results"]:
        assert p["errors"] == {} and p["completed"] == 4 and p["output_tokens"] == 4 * 8
    # CPU a token: the server's processes (the `lmforge serve` parent, its core and front-end) and
    # this process for the HTTP point; this process alone (engine and callers) for the engine's
    http_cpu = report["results"][0]["cpu_us_per_token"]
    assert str(pid) in http_cpu["server_processes"] and len(http_cpu["server_processes"]) >= 3
    assert http_cpu["server"] == pytest.approx(sum(http_cpu["server_processes"].values()), abs=0.2)
    assert http_cpu["server"] > 0 and http_cpu["bench_serve"] > 0
    for p in report["results"][1:]:
        assert set(p["cpu_us_per_token"]) == {"bench_serve"} and p["cpu_us_per_token"]["bench_serve"] > 0
    assert ratio["cpu_us_per_token"] == pytest.approx(http_cpu["server"] + http_cpu["bench_serve"], abs=0.2)
    printed = capsys.readouterr().out
    assert f"pid {pid}" in printed and "cpu/token server " in printed
    assert _gone(pid) and _serve_children() == []


@needs_proc
@pytest.mark.parametrize("broken", ["missing", "corrupt"])
def test_a_server_that_does_not_start_is_one_line_and_exit_2(broken: str, tiny_llama: Path, tmp_path: Path,
                                                             capsys) -> None:  # type: ignore[no-untyped-def]
    import shutil

    artifact = tmp_path / "art"
    if broken == "corrupt":
        shutil.copytree(tiny_llama, artifact)
        (artifact / "manifest.json").write_text("{not json", encoding="utf-8")
    assert main(["bench-serve", str(artifact), "--concurrency", "1", "--requests", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("lmforge bench-serve: error: the server for") and "did not start" in err
    assert "exited with code 2" in err and "lmforge serve: error:" in err  # the child's own one-line error
    assert _serve_children() == []


@needs_proc
def test_a_server_that_never_listens_is_stopped_at_the_deadline() -> None:
    server = serve_load.ServerProcess("unused", start_timeout_s=1.0, stop_timeout_s=5.0)
    server.command = [sys.executable, "-c", "import sys, time; print('loading', file=sys.stderr, flush=True); "
                      "time.sleep(60)"]
    t0 = time.perf_counter()
    with pytest.raises(GenerationError, match=r"no URL printed within 1 s; its stderr ends: loading"):
        server.start()
    assert time.perf_counter() - t0 < 10
    assert server.pid is not None and _gone(server.pid)


@needs_proc
def test_an_interrupted_run_stops_its_server(tiny_llama: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from lmforge import cmd_bench_serve

    seen: list[int] = []

    async def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.extend(_serve_children())
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd_bench_serve, "_sweep", interrupted)
    assert main(["bench-serve", str(tiny_llama), "--concurrency", "1", "--requests", "1"]) == 130
    assert len(seen) == 1 and _gone(seen[0]) and _serve_children() == []


@needs_proc
def test_cpu_time_counts_a_servers_child_processes_per_token() -> None:
    import subprocess

    from lmforge.benchmark.cpu_time import CpuSampler, per_token

    # a parent that starts a child spending 0.3 s of CPU and then staying alive: the child's CPU
    # is the server's, counted under the child's pid
    child = ("import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
             "print('done', flush=True)\ntime.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               f"{child!r}])"], stdout=subprocess.PIPE, text=True)
    try:
        sampler = CpuSampler(parent.pid)
        before = sampler.sample()
        assert before is not None and parent.pid in before.server_s
        assert parent.stdout is not None and parent.stdout.readline() == "done\n"
        after = sampler.sample()
        cpu = per_token(before, after, 1000)  # 0.3 s over 1,000 tokens: about 300 µs a token
        assert cpu is not None and set(cpu) == {"bench_serve", "server", "server_processes"}
        children = {pid: us for pid, us in cpu["server_processes"].items() if pid != str(parent.pid)}
        assert len(children) == 1 and 200 <= next(iter(children.values())) <= 2000, cpu
        assert cpu["server"] == pytest.approx(sum(cpu["server_processes"].values()), abs=0.2)
        assert per_token(before, None, 10) is None and per_token(before, after, 0) is None
    finally:
        for pid in _descendant_pids(parent.pid):
            os.kill(pid, 9)
        parent.wait()


def _descendant_pids(root: int) -> list[int]:
    from lmforge.benchmark.cpu_time import _descendants

    return [p for p in _descendants(root) if p != root] + [root]
