"""bench-serve's load generator: flag parsing, the report, and bounded runs against a served fake engine."""

from __future__ import annotations

import asyncio
import json
import math
import time

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
