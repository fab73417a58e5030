"""``lmforge bench`` for encoder artifacts: lmforge's ``Encoder`` beside PyTorch and a default
onnxruntime session, in one process, on the same ids.

Per (sequence length, batch size): every runner is warmed up, then each round calls every runner
once on the same fixed ``[batch, seq]`` token ids (:func:`lmforge.benchmark.encoder_peers.fixed_ids`)
in rotating order, so each runner sees the same background load round by round — alternating is
what keeps the ratios meaningful on a shared machine. Reported per runner: the median, p50 and
p99 latency of one call over the rounds, and throughput = ``batch ÷ median`` (sentences/s).

Runners (:mod:`lmforge.benchmark.encoder_peers`): ``lmforge`` for every artifact given (e.g. fp32
and int8 of one model), then the peers once for the first artifact — ``ort`` (default session on
the unoptimized export) and ``pytorch`` (transformers ``AutoModel``, same pooling). A peer that
cannot run (torch not installed, no unoptimized export on disk) is listed with the reason.
CPU only: ``bench/encoder_gpu.py`` measures CUDA. ``lmforge tune`` answers a different question
(how many pinned instances), one configuration at a time in separate processes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.benchmark.encoder_peers import PEERS, fixed_ids, open_runner, peer_artifact
from runtime.cpu import available_cores, format_cpus, physical_cores
from runtime.errors import GenerationError

__all__ = ["EncoderBenchConfig", "run_encoder_bench", "render_encoder_table"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncoderBenchConfig:
    artifacts: tuple[Path, ...]
    batches: tuple[int, ...] = (1, 8, 32)
    seqs: tuple[int, ...] = (32, 128)
    threads: int | None = None  # None: one per physical core the process may use
    peers: tuple[str, ...] = PEERS
    rounds: int = 10
    warmup: int = 2
    seed: int = 0


@dataclasses.dataclass
class _Runner:
    name: str  # "lmforge" | "ort" | "pytorch"
    label: str  # what the table shows, e.g. "lmforge int8"
    artifact: str
    fn: Any = None
    error: str | None = None


def _open(name: str, label: str, path: Path | None, why: str | None, threads: int) -> _Runner:
    runner = _Runner(name, label, str(path) if path else "")
    if path is None:
        runner.error = why
        return runner
    try:
        runner.fn = open_runner(name, str(path), threads)
    except ModuleNotFoundError as exc:
        runner.error = f"skipped: {exc.name} is not installed (pip install 'lmforge[export]')"
    except Exception as exc:  # a peer that cannot open is reported, the bench goes on
        if name == "lmforge":
            raise
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        runner.error = f"skipped: {type(exc).__name__}: {first}"
    if runner.error:
        log.warning("%s: %s", label, runner.error)
    return runner


def _row(r: _Runner, seq: int, batch: int, threads: int, lat: list[float]) -> dict[str, Any]:
    ms = np.asarray(lat) * 1000.0
    median = float(np.median(ms))
    return {"runner": r.name, "label": r.label, "artifact": r.artifact, "seq": seq, "batch": batch,
            "threads": threads if r.name != "ort" else "default", "calls": int(ms.size),
            "median_ms": round(median, 3), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "throughput": round(batch / (median / 1000.0), 2), "error": None}


def run_encoder_bench(cfg: EncoderBenchConfig, progress: bool = False) -> dict[str, Any]:
    """Run every runner on every (seq, batch); return ``{"rows": [...], "machine": ..., ...}``."""
    from tqdm import tqdm

    from runtime.artifact import load_artifact
    from runtime.encoder import Encoder

    arts = [load_artifact(p) for p in cfg.artifacts]
    decoders = [str(a.path) for a in arts if a.is_decoder]
    if decoders:
        raise GenerationError(f"artifact {decoders[0]} is a decoder; the encoder bench times encoders",
                              fix="bench decoders and encoders in separate `lmforge bench` runs")
    cores = available_cores()
    threads = cfg.threads or max(1, len(physical_cores(cores)))
    probe = Encoder(arts[0], threads=1)
    specials, max_length = probe.tokenizer.encode("").ids, probe.max_length
    probe.close()
    too_long = [s for s in cfg.seqs if s > max_length]
    if too_long:
        raise GenerationError(f"--seq {too_long[0]} is longer than the model's maximum",
                              expected=f"at most {max_length}", fix="pass shorter --seq values")
    vocab = int(arts[0].architecture.get("vocab") or 30522)

    runners = [_open("lmforge", f"lmforge {a.precision} ({a.path.name})", a.path, None, threads) for a in arts]
    for peer in cfg.peers:
        path, why = peer_artifact(arts[0], peer)
        runners.append(_open(peer, {"ort": "ort default", "pytorch": "pytorch fp32"}[peer], path, why, threads))
    live = [r for r in runners if r.fn is not None]

    rows: list[dict[str, Any]] = []
    configs = [(seq, batch) for seq in cfg.seqs for batch in cfg.batches]
    bar = tqdm(configs, unit="config", disable=not progress, file=sys.stderr)
    for seq, batch in bar:
        bar.set_description_str(f"seq {seq} batch {batch}")
        ids = fixed_ids(vocab, specials, batch, seq, cfg.seed)
        for r in live:
            for _ in range(cfg.warmup):
                r.fn(ids)
        lat: dict[str, list[float]] = {r.label: [] for r in live}
        for round_ in range(cfg.rounds):
            shift = round_ % len(live)
            for r in live[shift:] + live[:shift]:
                t0 = time.perf_counter()
                r.fn(ids)
                lat[r.label].append(time.perf_counter() - t0)
        for r in runners:
            if r.fn is None:
                rows.append({"runner": r.name, "label": r.label, "artifact": r.artifact, "seq": seq, "batch": batch,
                             "threads": threads, "calls": 0, "median_ms": None, "p50_ms": None, "p99_ms": None,
                             "throughput": None, "error": r.error})
            else:
                rows.append(_row(r, seq, batch, threads, lat[r.label]))
    bar.close()
    return {
        "kind": "encoder",
        "artifacts": [str(a.path) for a in arts], "precisions": [a.precision for a in arts],
        "machine": {"cores": format_cpus(cores), "physical_cores": len(physical_cores(cores)),
                    "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())},
        "settings": {"threads": threads, "rounds": cfg.rounds, "warmup": cfg.warmup, "seed": cfg.seed,
                     "peers": list(cfg.peers)},
        "rows": rows,
    }


def render_encoder_table(report: dict[str, Any]) -> str:
    """The report as a markdown table with ratios to PyTorch and to the default ORT session."""
    lines = [f"encoder bench on CPUs {report['machine']['cores']} ({report['settings']['threads']} threads, "
             f"{report['settings']['rounds']} rounds after {report['settings']['warmup']} warm-up calls)", "",
             "| runner | seq | batch | p50 ms | p99 ms | sentences/s | vs pytorch | vs ort |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["runner"], r["seq"], r["batch"]): r["throughput"] for r in report["rows"]
            if r["runner"] in PEERS and r["throughput"]}
    for r in report["rows"]:
        if r["error"]:
            lines.append(f"| {r['label']} | {r['seq']} | {r['batch']} | — | — | — | — | — |  ({r['error']})")
            continue

        def ratio(peer: str, r: dict[str, Any] = r) -> str:
            b = base.get((peer, r["seq"], r["batch"]))
            return f"{r['throughput'] / b:.2f}×" if b else "—"

        lines.append(f"| {r['label']} | {r['seq']} | {r['batch']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['throughput']:.1f} | {ratio('pytorch')} | {ratio('ort')} |")
    return "\n".join(lines)
