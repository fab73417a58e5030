"""onnxruntime-genai's continuous-batching ``Engine`` under a concurrent load, beside lmforge's.

``build`` makes the genai model folder from the same weights lmforge's peers use
(:class:`lmforge.benchmark.peers.GenaiRunner`'s builder call and cache; ``paged=True`` adds
``--extra_options use_paged_attention=true``, which genai's builder allows only for CUDA fp16/bf16).
``run_load`` submits ``concurrency`` requests at t=0, drives ``Engine.run`` until all finish and
reports output tokens/s (new tokens / wall time, prefill included), time to first token per
request (p50/p99) and errors; it never raises.

The Engine API of onnxruntime-genai 0.18 (read from the installed package, not the older
``add_request``/``step`` examples upstream): ``engine.create_request(options=RequestOptions)``,
``request.begin_turn(int32 ids, TurnOptions)``, then ``engine.run(event_buffer)`` fills the
buffer with ``EngineEvent`` s (``request``, ``token``, ``flags`` TOKEN / TURN_FINISHED / FAILED /
CAPACITY_BLOCKED / RETRYABLE, ``error_code``, ``finish_reason``, ``usage``). Events arrive per
``run`` call, so TTFT has the resolution of one engine step.

    python bench/genai_engine.py --model-dir DIR --concurrency 16,64 --prompt-len 128 \\
        --new-tokens 128 [--sampled] [--device cpu|cuda] --json OUT.json
    python bench/genai_engine.py --build-from ARTIFACT_OR_SOURCE --work W --precision fp16 --paged ...
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.genai_engine")

SAMPLED = {"temperature": 0.7, "top_p": 0.9}  # as bench/gpu_serving.py's "temperature 0.7 + top-p 0.9"


# ------------------------------------------------------------------------------------------------
# build


def _source_of(source: str | Path) -> tuple[str, str | None]:
    """(source ref, sha256) for an lmforge artifact folder, an HF folder or a source string."""
    path = Path(source)
    if (path / "manifest.json").is_file():
        from lmforge.benchmark.source import source_ref

        manifest = json.loads((path / "manifest.json").read_text())
        return source_ref(manifest), (manifest.get("source") or {}).get("sha256")
    return str(source), None


def _last_error_line(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:300]
    return (lines[-1] if lines else "")[:300]


def build(source: str | Path, out_dir: str | Path, precision: str = "fp16", device: str = "cuda",
          paged: bool = True, extra_options: dict[str, Any] | None = None) -> Path:
    """The genai model folder for ``source`` (an lmforge artifact folder, whose manifest names its
    source; an HF folder; or a source string such as ``tiny:llama``), built under ``out_dir``.

    ``paged=False`` is exactly :meth:`GenaiRunner.build` (same command, same cached folder, so the
    Generator peer and this share it). ``paged=True`` runs the same builder command plus
    ``--extra_options use_paged_attention=true`` (and ``extra_options``, e.g. ``max_batch_size``,
    ``num_blocks``, ``paged_block_size``) into ``genai-<sha>-<precision>-<ep>-paged``.
    Raises :class:`lmforge.benchmark.runner.NotRun` with the builder's last error line on failure.
    """
    from lmforge.benchmark.peers import GenaiRunner
    from lmforge.benchmark.runner import NotRun
    from lmforge.benchmark.source import SharedSource

    work = Path(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    ref, sha = _source_of(source)
    shared = SharedSource(ref, sha, work)
    if not paged and not extra_options:
        return GenaiRunner(shared, device, precision, work, cuda_graph=False, name="genai-engine").build()

    # GenaiRunner.build's command and folder discipline, with --extra_options (peers.py has no hook for it)
    ep = "cuda" if device == "cuda" else "cpu"
    options = {"use_paged_attention": "true"} if paged else {}
    options.update({k: str(v) for k, v in (extra_options or {}).items()})
    tag = "-paged" if paged else ""
    tag += "".join(f"-{k}{v}" for k, v in sorted(options.items()) if k != "use_paged_attention")
    out = work / f"genai-{(sha or 'src')[:16]}-{precision}-{ep}{tag}"
    if (out / "genai_config.json").is_file():
        return out
    folder = shared.hf_folder()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log_path = work / f"{out.name}.build.log"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(tmp),
           "-p", precision, "-e", ep, "-c", str(work / "genai-cache"),
           "--extra_options", *(f"{k}={v}" for k, v in options.items())]
    log.warning("building the onnxruntime-genai %s %s%s model (log in %s) …", precision, ep, tag, log_path)
    with open(log_path, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (tmp / "genai_config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise NotRun(f"onnxruntime-genai's builder failed (exit {done.returncode}): {_last_error_line(log_path)}")
    if out.exists():
        raise NotRun(f"{out} exists but has no genai_config.json; remove it")
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------------------------------
# load


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


class GenaiEngineLoad:
    """One ``og.Model`` + ``og.Engine`` on a device, reused across loads (so a paged KV pool is
    allocated once). ``open`` raises; :func:`run_load` wraps it into ``{"error": …}``."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.device = device
        self.model: Any = None
        self.engine: Any = None
        self.info: dict[str, Any] = {}

    def open(self) -> None:
        import onnxruntime_genai as og

        if not hasattr(og, "Engine"):
            raise RuntimeError(f"onnxruntime-genai {og.__version__} has no Engine")
        if self.device == "cuda" and not og.is_cuda_available():
            raise RuntimeError("this onnxruntime-genai has no CUDA support (pip install onnxruntime-genai-cuda)")
        gconf = json.loads((self.model_dir / "genai_config.json").read_text())
        config = og.Config(str(self.model_dir))
        config.clear_providers()
        if self.device == "cuda":
            config.append_provider("cuda")
        self.model = og.Model(config)
        self.engine = og.Engine(self.model)
        caps = self.engine.get_capabilities()
        model_conf = gconf.get("model") or {}
        self.info = {
            "onnxruntime_genai": og.__version__,
            "model_dir": str(self.model_dir),
            "device": self.device,
            "paged": bool((gconf.get("engine") or {}).get("dynamic_batching")),
            "dynamic_batching": (gconf.get("engine") or {}).get("dynamic_batching"),
            "vocab_size": model_conf.get("vocab_size"),
            "eos_token_id": model_conf.get("eos_token_id"),
            "capabilities": {"configured_max_batch_size": caps.configured_max_batch_size,
                             "max_request_length": caps.max_request_length,
                             "max_scheduled_tokens": caps.max_scheduled_tokens},
        }

    def close(self) -> None:
        self.engine = None
        self.model = None
        gc.collect()

    def load(self, prompts: list[list[int]], new_tokens: int, sampled: bool, concurrency: int,
             timeout_s: float = 600.0, seed: int = 0) -> dict[str, Any]:
        """``concurrency`` requests (prompt ``i % len(prompts)``), all begun at t=0, each exactly
        ``new_tokens`` new tokens (min = max generated tokens, so EOS is masked); drives the engine
        until none is pending. Raises only on API misuse; request failures land in ``errors``."""
        import onnxruntime_genai as og

        if not prompts or concurrency < 1 or new_tokens < 1:
            raise ValueError("need prompts, concurrency >= 1 and new_tokens >= 1")
        engine = self.engine
        longest = max(len(p) for p in prompts[:concurrency]) + new_tokens
        limit = self.info["capabilities"]["max_request_length"]
        if limit and longest > limit:
            raise ValueError(f"prompt + new tokens = {longest} exceeds the engine's max_request_length {limit}")
        token_flag, done_flag = int(og.EngineEventFlags.TOKEN), int(og.EngineEventFlags.TURN_FINISHED)
        failed_flag = int(og.EngineEventFlags.FAILED)
        blocked_flag, retry_flag = int(og.EngineEventFlags.CAPACITY_BLOCKED), int(og.EngineEventFlags.RETRYABLE)

        requests: list[Any] = []
        slot: dict[int, int] = {}  # id(request) -> index
        first: list[float | None] = [None] * concurrency
        last: list[float | None] = [None] * concurrency
        counts = [0] * concurrency
        finished = [False] * concurrency
        errors: list[str] = []
        blocked = retryable = 0
        buffer = engine.create_event_buffer(max(64, 2 * concurrency))

        t0 = time.perf_counter()
        for i in range(concurrency):
            prompt = np.asarray(prompts[i % len(prompts)], dtype=np.int32)
            options = og.RequestOptions()
            options.set_max_session_tokens(len(prompt) + new_tokens)
            request = engine.create_request(options=options)
            turn = og.TurnOptions(request)
            turn.set_max_generated_tokens(new_tokens)
            turn.set_min_generated_tokens(new_tokens)
            if sampled:
                turn.set_do_sample(True)
                turn.set_temperature(SAMPLED["temperature"])
                turn.set_top_p(SAMPLED["top_p"])
                turn.set_top_k(0)  # no top-k, as lmforge's temperature + top-p case
                if self.info["paged"]:  # 0.18: "A per-turn seed requires an Engine configured for dynamic batching"
                    turn.set_seed(seed + i)
            else:
                turn.set_do_sample(False)
            request.begin_turn(prompt, turn)
            requests.append(request)
            slot[id(request)] = i
        submitted = time.perf_counter()

        steps = 0
        while engine.has_pending_requests():
            if time.perf_counter() - t0 > timeout_s:
                errors.append(f"timed out after {timeout_s:.0f} s with {finished.count(False)} requests unfinished")
                break
            engine.run(buffer)
            steps += 1
            now = time.perf_counter()
            for j in range(len(buffer)):
                event = buffer[j]
                flags = int(event.flags)
                i = slot.get(id(event.request), -1)
                if flags & blocked_flag:
                    blocked += 1
                if flags & retry_flag:
                    retryable += 1
                if i < 0:
                    if flags & (token_flag | failed_flag):
                        errors.append("an event for an unknown request")
                    continue
                if flags & token_flag:
                    counts[i] += 1
                    last[i] = now
                    if first[i] is None:
                        first[i] = now
                if flags & failed_flag:
                    errors.append(f"request {i} failed: {event.error_code.name}")
                if flags & done_flag:
                    finished[i] = True
                    reason = event.finish_reason
                    if reason not in (og.FinishReason.MAX_GENERATED_TOKENS, og.FinishReason.MAX_SESSION_TOKENS):
                        errors.append(f"request {i} finished by {reason.name} after {counts[i]} tokens")
        wall = time.perf_counter() - t0
        for request in requests:
            request.close()

        short = [i for i in range(concurrency) if counts[i] != new_tokens]
        if short:
            errors.append(f"{len(short)} requests got a token count other than {new_tokens} "
                          f"(e.g. request {short[0]}: {counts[short[0]]})")
        ttft = [(f - t0) * 1e3 for f in first if f is not None]
        tpot = [((lt - f) * 1e3) / (n - 1) for f, lt, n in zip(first, last, counts)
                if f is not None and lt is not None and n > 1]
        total = sum(counts)
        return {
            "concurrency": concurrency,
            "prompt_len": round(statistics.mean(len(prompts[i % len(prompts)]) for i in range(concurrency)), 1),
            "new_tokens": new_tokens,
            "sampled": sampled,
            "wall_s": round(wall, 4),
            "submit_ms": round((submitted - t0) * 1e3, 3),
            "steps": steps,
            "output_tokens": total,
            "output_tok_s": round(total / wall, 2) if wall > 0 else None,
            "ttft_ms_p50": _pct(ttft, 50),
            "ttft_ms_p99": _pct(ttft, 99),
            "tpot_ms_p50": _pct(tpot, 50),
            "completed": sum(finished),
            "capacity_blocked_events": blocked,
            "retryable_events": retryable,
            "errors": errors[:20],
        }


def run_load(model_dir: str | Path, prompts: list[list[int]], new_tokens: int, sampled: bool, concurrency: int,
             device: str = "cpu", *, warmup: bool = True, timeout_s: float = 600.0) -> dict[str, Any]:
    """One load on a fresh Engine (see :meth:`GenaiEngineLoad.load`), after a short warm-up load.
    Returns the numbers plus the engine's info, or ``{"error": "<one line why>"}``; never raises."""
    runner = GenaiEngineLoad(model_dir, device)
    try:
        runner.open()
    except Exception as exc:  # noqa: BLE001 - the Engine refusing the model or device is a result
        runner.close()
        return {"error": f"onnxruntime-genai's Engine refused {model_dir} on {device}: {_one_line(exc)}"}
    try:
        if warmup:
            runner.load(prompts, min(new_tokens, 4), sampled, min(concurrency, 4), timeout_s=timeout_s)
        return {**runner.info, **runner.load(prompts, new_tokens, sampled, concurrency, timeout_s=timeout_s)}
    except Exception as exc:  # noqa: BLE001
        return {"error": _one_line(exc)}
    finally:
        runner.close()


# ------------------------------------------------------------------------------------------------
# CLI


def random_prompts(n: int, length: int, vocab: int, avoid: set[int], seed: int = 0) -> list[list[int]]:
    """``n`` distinct prompts of ``length`` random ids (no special ids: nothing for prefix caching to share)."""
    rng = np.random.default_rng(seed)
    low = min(100, vocab // 4)
    out = []
    for _ in range(n):
        ids = rng.integers(low, vocab, size=length)
        out.append([int(t) if int(t) not in avoid else low for t in ids])
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'conc':>5} {'mode':>7} {'tok/s':>10} {'wall s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'TPOT p50':>9} {'done':>5}  errors")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r.get('concurrency', '?'):>5} {'':>7} error: {r['error']}")
            continue
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"{r['concurrency']:>5} {'sampled' if r['sampled'] else 'greedy':>7} {r['output_tok_s']:>10.1f} "
                     f"{r['wall_s']:>8.3f} {fmt(r['ttft_ms_p50']):>9} {fmt(r['ttft_ms_p99']):>9} "
                     f"{fmt(r['tpot_ms_p50']):>9} {r['completed']:>5}  {'; '.join(r['errors'])[:80]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, help="a genai model folder (genai_config.json)")
    ap.add_argument("--build-from", help="build the model first: an lmforge artifact folder, HF folder or source")
    ap.add_argument("--work", type=Path, default=Path("bench-work"), help="where --build-from builds")
    ap.add_argument("--precision", default="fp16", help="builder precision for --build-from")
    ap.add_argument("--paged", action=argparse.BooleanOptionalAction, default=None,
                    help="build with use_paged_attention=true (default: on for cuda, off for cpu)")
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--sampled", action="store_true", help="temperature 0.7 + top-p 0.9 (default greedy)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=1, help="loads per level on one warm engine; the median is kept")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per load")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    levels = [int(c) for c in args.concurrency.split(",") if c]

    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    model_dir = args.model_dir
    if args.build_from:
        paged = args.paged if args.paged is not None else args.device == "cuda"
        extra = {"max_batch_size": min(256, max(levels))} if paged and max(levels) > 100 else None
        try:
            model_dir = build(args.build_from, args.work, args.precision, args.device, paged, extra)
        except Exception as exc:  # noqa: BLE001
            result["error"] = f"build failed: {_one_line(exc)}"
    if model_dir is None and "error" not in result:
        ap.error("give --model-dir or --build-from")

    rows: list[dict[str, Any]] = []
    if "error" not in result:
        runner = GenaiEngineLoad(model_dir, args.device)
        try:
            runner.open()
        except Exception as exc:  # noqa: BLE001
            result["error"] = f"onnxruntime-genai's Engine refused {model_dir} on {args.device}: {_one_line(exc)}"
        else:
            result["engine"] = runner.info
            conf = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]
            eos = conf.get("eos_token_id")
            avoid = set(eos if isinstance(eos, list) else [eos]) | {conf.get("pad_token_id"), conf.get("bos_token_id")}
            prompts = random_prompts(max(levels), args.prompt_len, int(conf["vocab_size"]), avoid)
            try:
                runner.load(prompts, min(args.new_tokens, 4), args.sampled, min(max(levels), 4), args.timeout)
                for c in levels:
                    tries = []
                    for _ in range(max(1, args.repeats)):
                        try:
                            tries.append(runner.load(prompts, args.new_tokens, args.sampled, c, args.timeout))
                        except Exception as exc:  # noqa: BLE001
                            tries.append({"concurrency": c, "error": _one_line(exc)})
                    good = sorted((t for t in tries if "error" not in t), key=lambda t: t["output_tok_s"])
                    row = good[len(good) // 2] if good else tries[0]
                    row["repeats_tok_s"] = [t.get("output_tok_s") for t in tries]
                    rows.append(row)
            except Exception as exc:  # noqa: BLE001
                result["error"] = f"warm-up failed: {_one_line(exc)}"
            finally:
                runner.close()
    result["runs"] = rows
    if "engine" in result:
        info = result["engine"]
        print(f"onnxruntime-genai {info['onnxruntime_genai']} Engine  {info['model_dir']}  device={args.device} "
              f"paged={info['paged']}  caps={info['capabilities']}")
    print(_table(rows) if rows else "")
    if "error" in result:
        print(f"error: {result['error']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
