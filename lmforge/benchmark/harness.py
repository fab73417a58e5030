"""The bench harness: one model, same prompts and lengths for every runtime, alternating runs.

Order of a bench (all in one process run, so every runtime sees the same machine state):

1. validate the artifacts (decoders, one source) and measure the device's copy bandwidth;
2. prepare every runner (lmforge per artifact, then the peers); one that cannot run is kept in
   the report as ``not run: <reason>`` — never dropped;
3. per batch size: the same random prompt ids for everyone (fixed seed, ``prompt_len`` ids from
   the vocabulary), one warm-up per runner, then ``repeats`` rounds, each running every runner
   once, the order rotated each round so no runtime always follows the same neighbour;
4. medians per runner and batch: decode tok/s (``(new_tokens − 1) × batch`` over the time after
   the first token), time to first token, end-to-end throughput, memory (see
   :mod:`.memory`), and memory-bandwidth utilisation (see :mod:`.bandwidth`).

A runner that fails on one batch size is reported not run for that one and stays in the rounds
for the others. Tracebacks go to the debug log only.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.benchmark.bandwidth import bytes_per_step, copy_bandwidth, utilisation
from lmforge.benchmark.memory import MemorySampler
from lmforge.benchmark.runner import LmforgeRunner, NotRun, Runner, Timing
from runtime.errors import ArtifactError, GenerationError

__all__ = ["BenchConfig", "run_bench", "render_table", "SCHEMA", "make_prompts", "default_peers"]

log = logging.getLogger(__name__)

SCHEMA = "lmforge-bench/1"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything one bench run needs (the command line maps its flags onto this)."""

    artifacts: tuple[Path, ...]
    device: str = "cpu"
    batches: tuple[int, ...] = (1,)
    prompt_len: int = 128
    new_tokens: int = 256
    peers: tuple[str, ...] = ()
    peers_explicit: bool = False  # named by the user (hf-compile runs on the CPU only then)
    repeats: int = 3
    seed: int = 0
    work: Path = Path(".lmforge-bench")
    genai_precisions: tuple[str, ...] = ()  # empty: the artifacts' precisions
    peers_site: str | None = None
    source: str | None = None  # the peers' model; default: the artifact manifest's source
    command: tuple[str, ...] = ()


def default_peers(device: str) -> tuple[str, ...]:
    """Every peer that makes sense on the device (hf-compile on the CPU is reported, not run)."""
    if device == "cuda":
        return ("hf", "hf-compile", "genai", "genai-graph", "optimum")
    return ("hf", "hf-compile", "genai", "optimum")


def make_prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """``batch`` prompts of ``length`` random ids, the same for every runner and every run.

    Ids come from the upper part of the vocabulary: the first ids of real tokenizers are special
    tokens (BOS, EOS, chat markers) that would make prompts unlike text.
    """
    low = min(100, vocab // 4)
    rng = np.random.default_rng(seed + 1000 * batch)
    return rng.integers(low, vocab, size=(batch, length)).tolist()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NotRun):
        return str(exc)
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _device_name(device: str) -> str:
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                return str(torch.cuda.get_device_name(0))
        except ImportError:
            pass
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=10, check=True)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "CUDA device"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return f"{name}, {os.cpu_count()} logical cores"


def _versions() -> dict[str, str]:
    import importlib.metadata

    found = {"python": platform.python_version()}
    for dist in ("lmforge", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda",
                 "torch", "transformers", "numpy"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _check_artifacts(config: BenchConfig) -> list[Any]:
    from runtime.artifact import KvMode, load_artifact

    if not config.artifacts:
        raise ArtifactError("no artifact to bench", fix="pass an artifact folder written by `lmforge convert`")
    arts = []
    for path in config.artifacts:
        art = load_artifact(path, verify_hashes=False)  # Engine.load verifies the hashes
        if not art.is_decoder or art.kv_mode is KvMode.NONE:
            raise ArtifactError(f"artifact {path} is an encoder; bench measures text generation",
                                fix="pass a decoder artifact (Llama, Mistral, Qwen2, GPT-2, BLOOM)")
        need = config.prompt_len + config.new_tokens
        if need > int(art.architecture["max_context"]):
            raise GenerationError(f"artifact {path}: --prompt-len + --new-tokens exceeds its max context",
                                  expected=f"<= {art.architecture['max_context']}", got=str(need),
                                  fix="lower --prompt-len or --new-tokens")
        arts.append(art)
    shas = {(a.manifest.get("source") or {}).get("sha256") for a in arts}
    if len(shas) > 1:
        raise ArtifactError("the artifacts come from different source models",
                            got=", ".join(str(a.path) for a in arts),
                            fix="bench artifacts of one model together (variants of one `convert`)")
    return arts


def _lmforge_names(arts: list[Any]) -> list[str]:
    if len(arts) == 1:
        return ["lmforge"]
    names = [f"lmforge-{a.precision}" + ("-sb" if a.manifest.get("kv_mode") == "shared-buffer" else "") for a in arts]
    if len(set(names)) < len(names):
        names = [f"lmforge-{a.path.name}" for a in arts]
    return names


def _make_runners(config: BenchConfig, arts: list[Any]) -> tuple[list[Runner], Any]:
    from lmforge.benchmark.peers import make_peer
    from lmforge.benchmark.source import SharedSource, source_ref

    runners: list[Runner] = [LmforgeRunner(a.path, config.device, name)
                             for a, name in zip(arts, _lmforge_names(arts))]
    manifest = arts[0].manifest
    pad = (manifest.get("generation") or {}).get("pad_token_id")
    eos = (manifest.get("generation") or {}).get("eos_token_ids") or [0]
    pad_id = int(pad) if pad is not None else int(eos[0])
    if not config.peers:
        return runners, None
    ref = config.source or source_ref(manifest)
    sha = None if config.source else (manifest.get("source") or {}).get("sha256")
    config.work.mkdir(parents=True, exist_ok=True)
    source = SharedSource(ref, sha, config.work)
    precisions = list(dict.fromkeys(config.genai_precisions or [a.precision for a in arts]))
    for name in config.peers:
        if name in ("genai", "genai-graph"):
            for precision in precisions:
                label = name if len(precisions) == 1 else f"{name}-{precision}"
                runners.append(make_peer(name, source=source, device=config.device, work=config.work,
                                         pad_token_id=pad_id, explicit=config.peers_explicit,
                                         genai_precision=precision, peers_site=config.peers_site, label=label))
        else:
            runners.append(make_peer(name, source=source, device=config.device, work=config.work,
                                     pad_token_id=pad_id, explicit=config.peers_explicit,
                                     genai_precision=precisions[0], peers_site=config.peers_site))
    return runners, source


def _preload(source: Any, runners: list[Runner]) -> None:
    """Load the shared source model (and torch) before any runner's memory is measured.

    Otherwise the first peer to ask would be charged for the fp32 CPU copy every peer starts from
    (and for importing torch), which is bench machinery, not that runtime's cost. A failure here
    is left to the peers' own ``prepare`` to report.
    """
    from lmforge.benchmark.peers import HfEagerRunner

    if source is None:
        return
    needs_model = any(isinstance(r, HfEagerRunner) for r in runners)
    if not needs_model:
        from exporters.sources import resolve_source

        try:
            needs_model = resolve_source(source.ref).kind != "hf"
        except Exception:  # noqa: BLE001 - the peers report a bad source themselves
            return
    if needs_model:
        try:
            source.loaded()
        except Exception as exc:  # noqa: BLE001
            log.debug("preloading the source failed: %s", exc)


@dataclasses.dataclass
class _Cell:
    """One runner at one batch size, while the rounds run."""

    timings: list[Timing] = dataclasses.field(default_factory=list)
    warmup: Timing | None = None
    mem_rise: float = 0.0
    extras: dict[str, float] = dataclasses.field(default_factory=dict)
    reason: str | None = None


def _timed_run(runner: Runner, prompts: list[list[int]], config: BenchConfig, sampler: MemorySampler,
               cell: _Cell) -> Timing | None:
    if cell.reason is not None:
        return None
    level = sampler.mark()
    try:
        timing = runner.run(prompts, config.new_tokens)
    except Exception as exc:  # a failing runner is reported, the bench goes on
        log.debug("%s at batch %d failed", runner.name, len(prompts), exc_info=True)
        cell.reason = _reason(exc)
        log.warning("%s at batch %d: not run: %s", runner.name, len(prompts), cell.reason)
        return None
    cell.mem_rise = max(cell.mem_rise, sampler.peak_rise(level))
    for key, value in runner.run_extras.items():
        cell.extras[key] = max(cell.extras.get(key, 0.0), float(value))
    return timing


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the bench; return the JSON-ready report (see :func:`render_table` for the table)."""
    from tqdm import tqdm

    arts = _check_artifacts(config)
    arch = arts[0].architecture
    vocab = int(arch["vocab"])
    log.info("measuring the %s copy bandwidth …", config.device)
    bandwidth, bw_method = copy_bandwidth(config.device)
    log.info("copy bandwidth %.1f GB/s (%s)", bandwidth / 1e9, bw_method)
    runners, source = _make_runners(config, arts)
    mean_context = config.prompt_len + config.new_tokens / 2

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": list(config.command) or sys.argv,
        "device": {"type": config.device, "name": _device_name(config.device),
                   "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2), "bandwidth_method": bw_method},
        "versions": _versions(),
        "model": {"artifacts": [{"path": str(a.path), "precision": a.precision, "kv_mode": a.manifest.get("kv_mode"),
                                 "source": a.manifest.get("source"), "passes": len(a.manifest.get("passes") or [])}
                                for a in arts],
                  "peers_source": getattr(source, "ref", None), "architecture": arch},
        "settings": {"batches": list(config.batches), "prompt_len": config.prompt_len,
                     "new_tokens": config.new_tokens, "repeats": config.repeats, "seed": config.seed,
                     "peers": list(config.peers), "greedy": True, "eos_masked": True,
                     "mean_context_for_kv": mean_context},
        "runners": [], "results": [],
    }
    ready: list[Runner] = []
    _preload(source, runners)
    with MemorySampler(config.device) as sampler:
        report["device"]["memory_method"] = sampler.method
        load_mem: dict[str, float] = {}
        for runner in runners:
            entry: dict[str, Any] = {
                "name": runner.name,
                "kind": "lmforge" if isinstance(runner, LmforgeRunner) else "peer",
            }
            before = sampler.mark()
            t0 = time.perf_counter()
            log.info("preparing %s …", runner.name)
            try:
                runner.prepare()
            except Exception as exc:  # NotRun or any failure: reported, never dropped
                log.debug("%s: prepare failed", runner.name, exc_info=True)
                entry.update(status="not run", reason=_reason(exc))
                log.warning("%s: not run: %s", runner.name, entry["reason"])
                runner.close()
            else:
                load_mem[runner.name] = max(0.0, sampler.level() - before)
                entry.update(status="ok", prepare_s=round(time.perf_counter() - t0, 2),
                             load_mem_mb=round(load_mem[runner.name], 1), weight_bytes=runner.weight_bytes)
                ready.append(runner)
            entry["info"] = runner.info
            report["runners"].append(entry)
        if source is not None:
            source.release()  # every torch peer holds its own copy now
        gc.collect()

        total_runs = len(config.batches) * len(ready) * (config.repeats + 1)
        bar = tqdm(total=total_runs, unit="run", desc="bench", file=sys.stderr, disable=None, leave=False)
        cells: dict[tuple[str, int], _Cell] = {}
        try:
            for batch in config.batches:
                prompts = make_prompts(vocab, batch, config.prompt_len, config.seed)
                for runner in ready:
                    cell = cells.setdefault((runner.name, batch), _Cell())
                    bar.set_postfix_str(f"warm-up {runner.name} b{batch}")
                    cell.warmup = _timed_run(runner, prompts, config, sampler, cell)
                    bar.update(1)
                for round_ in range(config.repeats):
                    shift = round_ % max(1, len(ready))
                    for runner in ready[shift:] + ready[:shift]:
                        cell = cells[(runner.name, batch)]
                        bar.set_postfix_str(f"round {round_ + 1} {runner.name} b{batch}")
                        timing = _timed_run(runner, prompts, config, sampler, cell)
                        if timing is not None:
                            cell.timings.append(timing)
                            log.info("b%d round %d %-14s %8.1f tok/s  ttft %7.1f ms", batch, round_ + 1, runner.name,
                                     timing.decode_tok_s, timing.ttft_s * 1e3)
                        bar.update(1)
        finally:
            bar.close()
            for runner in ready:
                runner.close()

    for entry in report["runners"]:
        for batch in config.batches:
            report["results"].append(_result(entry, batch, cells.get((entry["name"], batch)), runners, arch,
                                             load_mem, mean_context, bandwidth, config))
    return report


def _result(entry: dict[str, Any], batch: int, cell: _Cell | None, runners: list[Runner], arch: dict[str, Any],
            load_mem: dict[str, float], mean_context: float, bandwidth: float, config: BenchConfig) -> dict[str, Any]:
    row: dict[str, Any] = {"runner": entry["name"], "kind": entry["kind"], "batch": batch}
    if entry["status"] != "ok":
        return {**row, "status": "not run", "reason": entry["reason"]}
    if cell is None or cell.reason is not None or not cell.timings:
        return {**row, "status": "not run", "reason": (cell.reason if cell else None) or "no timed run"}
    runner = next(r for r in runners if r.name == entry["name"])
    med = lambda values: statistics.median(values)  # noqa: E731
    decode = med([t.decode_tok_s for t in cell.timings])
    row.update(
        status="ok",
        decode_tok_s=round(decode, 2),
        per_row_tok_s=round(med([t.per_row_tok_s for t in cell.timings]), 2),
        ttft_ms=round(1e3 * med([t.ttft_s for t in cell.timings]), 2),
        throughput_tok_s=round(med([t.throughput_tok_s for t in cell.timings]), 2),
        repeats=[{"ttft_s": round(t.ttft_s, 6), "decode_s": round(t.decode_s, 6),
                  "decode_tok_s": round(t.decode_tok_s, 3)} for t in cell.timings],
        warmup=None if cell.warmup is None else {"ttft_s": round(cell.warmup.ttft_s, 6),
                                                 "decode_s": round(cell.warmup.decode_s, 6)},
    )
    own = runner.own_peak_memory_mb()
    if config.device == "cpu" and not runner.in_process:
        row["mem_mb"] = None if own is None else round(own, 1)
        row["mem_method"] = "the subprocess's own RSS growth"
    else:
        row["mem_mb"] = round(load_mem.get(runner.name, 0.0) + cell.mem_rise, 1)
        row["mem_method"] = "load delta + peak rise during its runs"
    if cell.extras:
        row["extras"] = {k: round(v, 1) for k, v in cell.extras.items()}
    if runner.weight_bytes and runner.kv_bytes_per_elem:
        step = bytes_per_step(runner.weight_bytes, arch, batch, mean_context, runner.kv_bytes_per_elem)
        row["bytes_per_step"] = int(step)
        row["bw_util"] = round(utilisation(step, decode / batch, bandwidth), 4)
    return row


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(report: dict[str, Any]) -> str:
    """The terminal table: one line per runner and batch size; not-run lines keep their reason."""
    head = ("runtime", "batch", "decode tok/s", "per row", "TTFT ms", "e2e tok/s", "mem MB", "bw util")
    lines: list[tuple[str, ...]] = []
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append((r["runner"], str(r["batch"]), f"not run: {r['reason']}"))
            continue
        util = r.get("bw_util")
        lines.append((r["runner"], str(r["batch"]), _fmt(r["decode_tok_s"], ",.1f"), _fmt(r["per_row_tok_s"], ",.1f"),
                      _fmt(r["ttft_ms"], ",.1f"), _fmt(r["throughput_tok_s"], ",.1f"), _fmt(r.get("mem_mb"), ",.0f"),
                      "-" if util is None else f"{100 * util:.1f}%"))
    widths = [max([len(head[i])] + [len(line[i]) for line in lines if len(line) == len(head)])
              for i in range(len(head))]
    widths[0] = max([widths[0]] + [len(line[0]) for line in lines])

    def fmt(cells: tuple[str, ...]) -> str:
        if len(cells) == 3:  # not run
            return f"{cells[0]:<{widths[0]}}  {cells[1]:>{widths[1]}}  {cells[2]}"
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    d, s = report["device"], report["settings"]
    title = (
        f"{d['name']} ({d['type']}), copy bandwidth {d['copy_bandwidth_gb_s']:.1f} GB/s; prompt {s['prompt_len']}, "
        f"{s['new_tokens']} new tokens, greedy, median of {s['repeats']}"
    )
    return "\n".join([title, fmt(head), *(fmt(line) for line in lines)])
