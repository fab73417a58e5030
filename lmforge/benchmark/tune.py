"""The CPU instance sweep behind ``lmforge tune``: how many pinned instances, how many threads each.

For every (sequence length, batch size, instance count) the machine's allowed cores are split into
``instances`` equal slices (:func:`runtime.cpu.split_cores`); one worker *process* per slice pins
itself to its slice (before it loads anything, so onnxruntime's threads and the weights' first
touch land there), opens the artifact with :class:`runtime.Encoder`, warms up, waits at a barrier
so every instance starts together, then sends the same request — ``batch`` rows of ``seq`` fixed
token ids — back to back for ``seconds``. Reported per configuration: p50/p99 latency of one
request over every instance's requests, and the *summed* throughput (each instance's sequences ÷
its own elapsed time, added up) — the table of the CPU-scaling write-up this command automates.

Peers run once per (seq, batch) as one instance over all the cores, same ids, same pooling:
``ort`` (a default onnxruntime session on the unoptimized export) and ``pytorch`` (transformers
``AutoModel``), the runners of :mod:`lmforge.benchmark.encoder_peers` that ``lmforge bench`` shares.

A peer that cannot run (no recorded fp32 artifact, no torch) is reported with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.benchmark.encoder_peers import PEERS, fixed_ids, open_runner, peer_artifact
from runtime.cpu import available_cores, format_cpus, physical_cores, split_cores
from runtime.errors import GenerationError

__all__ = ["TuneConfig", "TuneRow", "PEERS", "fixed_ids", "run_tune", "recommend", "render_tune"]


log = logging.getLogger(__name__)

_WORKER_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    artifact: Path
    batches: tuple[int, ...] = (1, 8, 32)
    seqs: tuple[int, ...] = (32, 128, 384)
    instances: tuple[int, ...] = (1, 2, 4)
    threads: int | None = None  # per instance; None: the physical cores of its slice
    peers: tuple[str, ...] = PEERS
    seconds: float = 3.0
    warmup: int = 2
    seed: int = 0
    cpus: tuple[int, ...] | None = None  # the cores to split; None: the process's affinity


@dataclasses.dataclass(frozen=True)
class TuneRow:
    runner: str  # "lmforge" | "ort" | "pytorch"
    seq: int
    batch: int
    instances: int
    threads: int  # per instance
    cpus: str  # the slices, e.g. "0|1"
    requests: int
    p50_ms: float
    p99_ms: float
    throughput: float  # sequences / s, summed over instances
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Workers (top-level functions: they run in spawned processes)


def _worker(index: int, runner: str, path: str, cpus: list[int], threads: int, ids: np.ndarray, seconds: float,
            warmup: int, barrier: Any, results: Any) -> None:
    try:
        os.sched_setaffinity(0, cpus)  # before anything loads: threads and first touch on this slice
        fn = open_runner(runner, path, threads)
        for _ in range(warmup):
            fn(ids)
    except Exception as exc:  # noqa: BLE001 - reported as the row's error, the sweep goes on
        barrier.abort()
        results.put((index, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
        return
    try:
        barrier.wait(timeout=_WORKER_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a sibling failed: it reports the error
        results.put((index, None, "another instance failed to start"))
        return
    latencies: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn(ids)
        latencies.append(time.perf_counter() - t0)
        if time.perf_counter() - started >= seconds and len(latencies) >= 2:
            break
    results.put((index, (latencies, time.perf_counter() - started), None))


def _measure(runner: str, path: Path, slices: list[list[int]], threads: int, ids: np.ndarray, cfg: TuneConfig,
             seq: int, batch: int) -> TuneRow:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(slices))
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, runner, str(path), cpus, threads, ids, cfg.seconds, cfg.warmup,
                                               barrier, results), daemon=True)
             for i, cpus in enumerate(slices)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    error: str | None = None
    deadline = time.monotonic() + _WORKER_TIMEOUT_S + cfg.seconds
    while len(got) < len(procs) and time.monotonic() < deadline:
        try:
            index, value, err = results.get(timeout=1.0)
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
            continue
        got[index] = value
        error = error or err
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    cpus_text = "|".join(format_cpus(s) for s in slices)
    if error or len(got) < len(procs) or any(v is None for v in got.values()):
        reason = error or "a worker exited without a result"
        log.warning("%s seq %d batch %d × %d instances: %s", runner, seq, batch, len(slices), reason)
        return TuneRow(runner, seq, batch, len(slices), threads, cpus_text, 0, float("nan"), float("nan"), 0.0, reason)
    lat = np.concatenate([np.asarray(v[0]) for v in got.values()]) * 1000.0
    throughput = sum(batch * len(v[0]) / v[1] for v in got.values())
    return TuneRow(runner, seq, batch, len(slices), threads, cpus_text, int(lat.size),
                   round(float(np.percentile(lat, 50)), 3), round(float(np.percentile(lat, 99)), 3),
                   round(float(throughput), 2))


# --------------------------------------------------------------------------------------------


def run_tune(cfg: TuneConfig, progress: bool = False) -> dict[str, Any]:
    """Run the sweep; return ``{"rows": [...], "recommended": [...], "machine": {...}}``."""
    from tqdm import tqdm

    from runtime.artifact import load_artifact
    from runtime.encoder import Encoder

    art = load_artifact(cfg.artifact)
    if art.is_decoder:
        raise GenerationError(f"artifact {art.path} is a decoder; tune sweeps encoder instances",
                              fix="pass an encoder artifact (e.g. from `lmforge convert builtin:minilm-l6`)")
    cores = sorted(cfg.cpus) if cfg.cpus else available_cores()
    plans = [(n, split_cores(cores, n)) for n in cfg.instances]  # refuses more instances than cores first
    for n, slices in plans:
        if cfg.threads is not None and cfg.threads > len(slices[0]):
            raise GenerationError(f"--threads {cfg.threads} with {n} instance(s) over {len(cores)} cores",
                                  expected=f"at most {len(slices[0])} threads per instance",
                                  fix="lower --threads, use --threads auto, or fewer --instances")
    probe = Encoder(art, threads=1)
    specials = probe.tokenizer.encode("").ids
    vocab = int(art.architecture.get("vocab") or 30522)
    probe.close()
    too_long = [s for s in cfg.seqs if s > probe.max_length]
    if too_long:
        raise GenerationError(f"--seq {too_long[0]} is longer than the model's maximum",
                              expected=f"at most {probe.max_length}", fix="pass shorter --seq values")

    jobs: list[tuple[str, Path | None, str | None, list[list[int]], int, int]] = []
    for seq in cfg.seqs:
        for batch in cfg.batches:
            for _n, slices in plans:
                jobs.append(("lmforge", art.path, None, slices, seq, batch))
            for peer in cfg.peers:
                path, why = peer_artifact(art, peer)
                jobs.append((peer, path, why, [cores], seq, batch))
    rows: list[TuneRow] = []
    bar = tqdm(jobs, unit="config", disable=not progress, file=sys.stderr)
    for runner, path, why, slices, seq, batch in bar:
        bar.set_description_str(f"{runner} seq {seq} batch {batch} ×{len(slices)}")
        threads = cfg.threads or len(physical_cores(slices[0]))
        if path is None:
            rows.append(TuneRow(runner, seq, batch, 1, threads, format_cpus(cores), 0, float("nan"), float("nan"),
                                0.0, why))
            continue
        ids = fixed_ids(vocab, specials, batch, seq, cfg.seed)
        rows.append(_measure(runner, path, slices, threads, ids, cfg, seq, batch))
    bar.close()
    return {
        "artifact": str(art.path), "precision": art.precision,
        "machine": {"cores": format_cpus(cores), "physical_cores": len(physical_cores(cores)),
                    "cpu_count": os.cpu_count()},
        "settings": {"seconds": cfg.seconds, "warmup": cfg.warmup, "seed": cfg.seed, "threads": cfg.threads or "auto"},
        "rows": [r.to_json() for r in rows],
        "recommended": recommend(rows),
    }


def recommend(rows: list[TuneRow]) -> list[dict[str, Any]]:
    """Per sequence length: the lmforge configuration with the highest summed throughput, and at
    batch 1 the one with the lowest p99 (the latency-bound choice)."""
    out = []
    for seq in sorted({r.seq for r in rows}):
        ok = [r for r in rows if r.runner == "lmforge" and r.seq == seq and r.error is None]
        if not ok:
            continue
        best = max(ok, key=lambda r: r.throughput)
        entry: dict[str, Any] = {"seq": seq, "throughput": {"batch": best.batch, "instances": best.instances,
                                                             "threads": best.threads, "seq_per_s": best.throughput}}
        single = [r for r in ok if r.batch == 1]
        if single:
            fast = min(single, key=lambda r: r.p99_ms)
            entry["latency"] = {"batch": 1, "instances": fast.instances, "threads": fast.threads,
                                "p99_ms": fast.p99_ms}
        out.append(entry)
    return out


def render_tune(report: dict[str, Any]) -> str:
    """The sweep as a markdown table, peers' ratios and the recommendations."""
    lines = [f"tune {report['artifact']} ({report['precision']}) on CPUs {report['machine']['cores']} "
             f"({report['machine']['physical_cores']} physical cores)", "",
             "| runner | seq | batch | instances × threads | p50 ms | p99 ms | seq/s (sum) | vs pytorch | vs ort |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    rows = report["rows"]
    base = {(r["runner"], r["seq"], r["batch"]): r["throughput"] for r in rows if r["instances"] == 1}
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['runner']} | {r['seq']} | {r['batch']} | {r['instances']} × {r['threads']} | "
                         f"— | — | — | — | — |  ({r['error']})")
            continue

        def ratio(peer: str, r: dict[str, Any] = r) -> str:
            b = base.get((peer, r["seq"], r["batch"]))
            return f"{r['throughput'] / b:.2f}×" if b else "—"

        lines.append(f"| {r['runner']} | {r['seq']} | {r['batch']} | {r['instances']} × {r['threads']} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput']:.1f} | {ratio('pytorch')} | "
                     f"{ratio('ort')} |")
    lines.append("")
    for rec in report["recommended"]:
        t = rec["throughput"]
        text = (f"seq {rec['seq']}: for throughput {t['instances']} instance(s) × {t['threads']} thread(s) at batch "
                f"{t['batch']} ({t['seq_per_s']:.1f} seq/s)")
        if "latency" in rec:
            lt = rec["latency"]
            text += f"; for latency at batch 1, {lt['instances']} × {lt['threads']} (p99 {lt['p99_ms']:.1f} ms)"
        lines.append(text)
    return "\n".join(lines)
