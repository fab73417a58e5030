"""Time to first token at batch 1 on the lent GPU: where a prefill's time goes, against onnxruntime-genai.

On one warm :class:`runtime.Engine` (CUDA graphs, a ``random:<shape>`` fp16 shared-buffer artifact
as ``bench/gpu_bench.py`` builds it) it times ``--repeats`` single requests of a ``--prompt-len``
token prompt, greedy and sampled (temperature 0.7 + top-p 0.9), and splits each one's TTFT into
the engine's phases by timing the backend's methods:

* ``queue``: submit → the loop's admission starts (the loop's wake-up);
* ``stage``: the request's sampling rows built and staged (``Engine._prepare_row``);
* ``constants``: the changed sampling constants copied to the device;
* ``bind``: the prefill's IO binding (KV rows, state, constants, host inputs);
* ``run``: ``run_with_iobinding`` of the prefill (decoder + sampling; synchronous on CUDA; for a
  prefill through its CUDA graph, with the prompt's writes into the graph's buffers);
* ``read``: the one host read of the first token;
* ``deliver``: the first token's event reaching the caller.

With ``--sampler`` greedy is timed again while `lmforge bench`'s memory sampler polls the device
(its thread wakes every 10 ms), to see what the harness's own polling costs a prefill. With
``--lengths 2,32`` greedy is timed once per request length (``min_new_tokens`` = the length, as
the harness asks), so a TTFT that follows the request's length shows phase by phase; with
``--alternate 2,32`` the lengths alternate request by request, so each length's predecessor is the
other one and a TTFT that follows the request's own length is told from one that follows its
predecessor's; with ``--eager-prefill`` every case runs again with one-row prefills eager
instead of through their CUDA graphs (``SlotsBackend.graph_prefill``), then captured again. Each case
also reports ``engine_ttft``, the engine's own ``GenerationResult.ttft_s`` (what `lmforge bench`
reports: from submission to the loop's accepting the first token, the delivery not included).

With ``--profile`` a second engine opens the same artifact with onnxruntime's profiler on and
sums the prefill runs' node times by operator type (CPU-side time per node: on CUDA that is
mostly the launch), and with ``--genai`` the harness behind ``lmforge bench`` times lmforge and
onnxruntime-genai (its own fp16 build of the same weights) at batch 1 in one run. Writes
``OUT/gpu_ttft-<shape>.json`` and prints a table.

    export PYTHONPATH=/tmp/gpu-site:/tmp/site:$PWD HF_HUB_OFFLINE=1
    python3 bench/gpu_ttft.py --shape llama-3.2-1b --genai --profile --out $OUT
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAMPLINGS = {"greedy": {}, "top-p 0.9": {"temperature": 0.7, "top_p": 0.9}}


class Phases:
    """Wall time per phase of the engine's admission, summed per request (one request at a time)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = collections.defaultdict(float)
        self.lock = threading.Lock()

    def wrap(self, obj: Any, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with self.lock:
                    self.times[phase] += time.perf_counter() - t0

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        with self.lock:
            out, self.times = dict(self.times), collections.defaultdict(float)
        return out


def instrument(engine: Any, phases: Phases) -> dict[str, float]:
    """Time the engine's admission phases (see the module docstring); returns the admit-start clock."""
    backend = engine.backend
    marks: dict[str, float] = {}
    admit = engine._admit

    def timed_admit() -> None:
        if engine._waiting:
            marks["admit"] = time.perf_counter()
        admit()

    engine._admit = timed_admit
    phases.wrap(engine, "_prepare_row", "stage")
    phases.wrap(backend, "_write_constants", "constants")
    phases.wrap(backend, "_run_prefill", "run")
    phases.wrap(backend, "_graph_run", "run")  # a captured prefill: its prompt's two writes and the replay
    phases.wrap(backend, "_prefill_group", "group")  # bind + run + read; bind = group - run - read
    sets = backend.sets
    for state in sets:
        history = state[next(k for k in state if k.endswith("history"))]
        numpy = history.numpy

        def timed_numpy(numpy: Any = numpy) -> Any:
            t0 = time.perf_counter()
            try:
                return numpy()
            finally:
                with phases.lock:
                    phases.times["read"] += time.perf_counter() - t0

        try:
            history.numpy = timed_numpy
        except (AttributeError, TypeError):  # an OrtValue may not take attributes: read stays in "group"
            break
    return marks


def ttft_probe(art: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from lmforge.benchmark.memory import MemorySampler
    from runtime import Engine

    engine = Engine.load(art, device=args.device, cuda_graph=args.device == "cuda", verify_hashes=False,
                         max_batch=args.max_batch)
    engine.warm_up()
    phases = Phases()
    marks = instrument(engine, phases)
    vocab = engine.vocab
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    cases = [(name, params, False, args.new_tokens) for name, params in SAMPLINGS.items()]
    if args.sampler:  # as `lmforge bench` runs it: a thread polling device memory every 10 ms
        method = MemorySampler(args.device).method
        cases.append((f"greedy, memory sampler on ({method})", SAMPLINGS["greedy"], True, args.new_tokens))
    for i, length in enumerate(args.lengths):  # a length given twice is timed twice (alternated A/B)
        again = f" #{args.lengths[:i].count(length) + 1}" if args.lengths.count(length) > 1 else ""
        cases.append((f"greedy, {length} new tokens{again}", SAMPLINGS["greedy"], False, length))
    if args.alternate:  # each length's predecessor is the other length: own length and predecessor's split
        cases.append(("alternate", SAMPLINGS["greedy"], False, args.alternate))
    if args.eager_prefill:  # the same cases again with one-row prefills eager, then captured again (A/B/A)
        cases += [(f"{name}, eager prefill", *rest) for name, *rest in cases]
        cases += [(f"{name}, captured again", *rest) for name, *rest in cases[:len(cases) // 2]]
    keys = ("ttft", "engine_ttft", "queue", "stage", "constants", "bind", "run", "read", "deliver")
    try:
        for name, params, polled, length in cases:
            engine.backend.graph_prefill = args.device == "cuda" and not name.endswith("eager prefill")
            polling = MemorySampler(args.device) if polled else contextlib.nullcontext()
            with polling:
                rows = _probe_rows(engine, phases, marks, rng, vocab, params, args, length)
            suffix = name.removeprefix("alternate")  # ", eager prefill" / ", captured again" or nothing
            groups = ({f"greedy, {n} new tokens, alternating {'/'.join(map(str, length))}{suffix}":
                       [r for r in rows if r["length"] == n] for n in dict.fromkeys(length)}
                      if isinstance(length, list) else {name: rows})
            for label, group in groups.items():
                out[label] = {k: round(1e3 * statistics.median(r.get(k, 0.0) for r in group), 3) for k in keys}
                print(f"lmforge {label:>10}: " + "  ".join(f"{k} {v:.3f}" for k, v in out[label].items())
                      + "  (ms, median)", flush=True)
    finally:
        engine.close(drain=False)
    return out


def _probe_rows(engine: Any, phases: Phases, marks: dict[str, float], rng: Any, vocab: int, params: dict[str, Any],
                args: argparse.Namespace, lengths: int | list[int]) -> list[dict[str, float]]:
    """One request at a time with ``params`` and ``lengths`` new tokens (each its ``min_new_tokens``
    too; a list is cycled, request by request): each one's TTFT and phases (after the warm-up ones)."""
    from runtime import SamplingParams

    cycle = lengths if isinstance(lengths, list) else [lengths]
    rows: list[dict[str, float]] = []
    for i in range(args.warmup + args.repeats * len(cycle)):
        new_tokens = cycle[i % len(cycle)]
        prompt = rng.integers(100, vocab - 100, args.prompt_len).tolist()
        sampling = SamplingParams(seed=i, min_new_tokens=new_tokens, **params)
        phases.take()
        t0 = time.perf_counter()
        request = engine.submit(prompt, max_new_tokens=new_tokens, sampling=sampling)
        first = None
        engine_ttft = float("nan")
        times: dict[str, float] = {}
        for event in request:
            if first is None and event.token_ids:
                first = time.perf_counter()
                times = phases.take()  # the prefill's phases alone, not the decode blocks' after it
            if event.result is not None:
                engine_ttft = event.result.ttft_s
        if i < args.warmup or first is None:
            continue
        group = times.pop("group", 0.0)
        row = {"length": new_tokens, "ttft": first - t0, "engine_ttft": engine_ttft,
               "queue": marks.get("admit", t0) - t0, **times}
        row["bind"] = group - times.get("run", 0.0) - times.get("read", 0.0)
        row["deliver"] = row["ttft"] - row["queue"] - row.get("stage", 0.0) - row.get("constants", 0.0) - group
        rows.append(row)
    return rows


def profile(art: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The prefill's node times by operator type (onnxruntime's profiler, a second engine)."""
    import numpy as np
    import onnxruntime as ort

    import runtime.device as device_mod
    from runtime import Engine, SamplingParams

    prefix = str(Path(args.out) / "ort_profile")

    class Profiled(ort.SessionOptions):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = prefix

    real = device_mod.ort
    shim = type("OrtShim", (), {})()
    for name in dir(real):
        if not name.startswith("__"):
            setattr(shim, name, getattr(real, name))
    shim.SessionOptions = Profiled
    device_mod.ort = shim
    try:
        engine = Engine.load(art, device=args.device, cuda_graph=args.device == "cuda", verify_hashes=False,
                             max_batch=args.max_batch)
    finally:
        device_mod.ort = real
    rng = np.random.default_rng(1)
    try:
        engine.warm_up()
        for params in SAMPLINGS.values():
            for i in range(5):
                prompt = rng.integers(100, engine.vocab - 100, args.prompt_len).tolist()
                engine.generate_results([prompt], 1, SamplingParams(seed=i, **params))
        path = engine.backend.session.end_profiling()
    finally:
        engine.close(drain=False)
    events = json.loads(Path(path).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    # the prefill runs: model_run spans whose nodes see input_ids of the prompt length
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    spans = sorted(((r["ts"], r["ts"] + r["dur"]) for r in runs), key=lambda s: s[1] - s[0], reverse=True)
    longest = spans[: max(1, len(spans) // 10)]
    count = 0
    for e in nodes:
        if any(a <= e["ts"] <= b for a, b in longest):
            by_type[e.get("args", {}).get("op_name", "?")].append(e["dur"])
            count += 1
    runs_ms = sorted(r["dur"] / 1e3 for r in runs)
    n_runs = max(1, len(longest))
    table = sorted(((op, len(v) / n_runs, sum(v) / 1e3 / n_runs) for op, v in by_type.items()), key=lambda t: -t[2])
    print(f"profile: {len(runs)} runs, longest {len(longest)} (prefills) median "
          f"{statistics.median(b - a for a, b in longest) / 1e3:.3f} ms; nodes per prefill "
          f"{count / max(1, len(longest)):.0f}", flush=True)
    for op, n, ms in table[:25]:
        print(f"  {op:<36} {n:6.1f} nodes  {ms:7.3f} ms", flush=True)
    return {"runs_ms": runs_ms[-20:], "prefill_ms_median": statistics.median(b - a for a, b in longest) / 1e3,
            "nodes_per_prefill": count / max(1, len(longest)),
            "by_op": [{"op": op, "nodes": n, "ms": round(ms, 4)} for op, n, ms in table]}


def genai_side_by_side(art: Path, args: argparse.Namespace) -> dict[str, Any]:
    from lmforge.benchmark.harness import BenchConfig, render_table, run_bench
    from lmforge.cmd_bench import parse_peers

    peers, explicit = parse_peers("genai,genai-graph" if args.device == "cuda" else "genai", args.device)
    config = BenchConfig(artifacts=(art,), device=args.device, batches=(1,), prompt_len=args.prompt_len,
                         new_tokens=32, peers=peers, peers_explicit=explicit, repeats=args.bench_repeats,
                         work=Path(args.work) / "bench", genai_precisions=("fp16",), peers_site=None,
                         command=tuple(sys.argv))
    report = run_bench(config)
    print(render_table(report), flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--artifact", type=Path, default=None, help="an fp16 shared-buffer artifact (else built)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bench-repeats", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run (tiny:llama, fp32 shared-buffer)")
    parser.add_argument("--genai", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sampler", action="store_true",
                        help="time greedy again with `lmforge bench`'s device-memory sampler polling")
    parser.add_argument("--lengths", type=lambda text: [int(v) for v in text.split(",") if v], default=[],
                        help="greedy again at each of these request lengths (comma-separated)")
    parser.add_argument("--alternate", type=lambda text: [int(v) for v in text.split(",") if v], default=[],
                        help="greedy with request lengths cycled request by request (e.g. 2,32), reported per "
                             "length: a TTFT that follows the request's own length, not its predecessor's")
    parser.add_argument("--eager-prefill", action="store_true",
                        help="every case again with one-row prefills eager (no prefill CUDA graphs), then "
                             "captured again")
    parser.add_argument("--work", default="/tmp/lmf-bench")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    if args.device == "cuda":
        ort.preload_dlls()
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_serving import build

    art = args.artifact or build(args.shape, Path(args.work), args.device)
    result: dict[str, Any] = {"shape": args.shape, "artifact": str(art), "prompt_len": args.prompt_len,
                              "onnxruntime": ort.__version__}
    result["phases_ms"] = ttft_probe(art, args)
    if args.profile:
        try:
            result["profile"] = profile(art, args)
        except Exception as exc:  # noqa: BLE001 - the probe's numbers stand without it
            print(f"profile failed: {type(exc).__name__}: {exc}", flush=True)
    if args.genai:
        report = genai_side_by_side(art, args)
        result["bench"] = [{k: r.get(k) for k in ("runtime", "batch", "ttft_ms", "decode_tok_s")}
                           for r in report.get("results", [])]
    path = Path(args.out) / f"gpu_ttft-{args.shape}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
