"""Captured step graphs side by side in a neutral harness (plain onnxruntime, no lmforge runtime):
ms a replay of each model, all with the same weights file, batch 1, attention over a fixed
length, inputs constant between replays (no state carried), launched back to back. It tells a
slower graph from a slower way of running one (issue #11, batch-1 greedy: this tree's step runs
1.28–1.32 ms where the pre-engine runtime's ran 1.14 on the same kernels).

Each MODEL is an ONNX graph whose initializers live in ``model.onnx.data`` beside it (a step model
of this tree, the pre-engine runtime's composed step, or the decoder alone: the same decoder
nodes and weights). Inputs: zeros, except the lengths (``seqlens_k``, ``position_ids``,
``prompt_lens`` = ``--length``; ``total_sequence_length`` and positions at ``--capacity``), the
neutral sampling values (``top_p``, ``repetition_penalty`` = 1, ``candidates`` = 1) and the host
inputs in host memory::

    PYTHONPATH=/tmp/gpu-site:$PWD python3 bench/gpu_graph_ab.py DIR/new_step.onnx DIR/old_step.onnx
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

HOST = {"total_sequence_length", "lmforge_step.candidates", "lmforge_step.sampled_rows",
        "lmforge_step.penalized_rows", "lmforge_step.filtered_rows", "lmforge_step.parted_rows"}
DTYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def feeds(sess: Any, length: int, capacity: int) -> dict[str, np.ndarray]:
    dims = {"batch": 1, "seq": 1, "max_context": capacity, "steps": capacity}
    out = {}
    for spec in sess.get_inputs():
        shape = [dims.get(d, 1) if isinstance(d, str) or d is None else d for d in spec.shape]
        value = np.zeros(shape, DTYPES[spec.type])
        short = spec.name.removeprefix("lmforge_step.")
        if spec.name in ("seqlens_k", "position_ids") or short == "prompt_lens":
            value[...] = length
        elif spec.name == "total_sequence_length":
            value = np.array(capacity, np.int32)
        elif short in ("top_p", "repetition_penalty", "candidates"):
            value[...] = 1
        elif short == "last_position":
            value[...] = capacity - 1
        out[spec.name] = value
    return out


def time_model(path: Path, length: int, capacity: int, replays: int, device: str = "cuda") -> dict[str, Any]:
    return time_prepared(prepare(path, length, capacity, device), replays)


def prepare(path: Path, length: int, capacity: int, device: str = "cuda", graph_id: int = 1,
            before: Any = None, from_bytes: bool = False, runs: int = 5) -> dict[str, Any]:
    """A session on ``path`` with every input and output bound, and its run options; ``before``
    (session, bound inputs) runs before the first decode run; ``from_bytes`` opens the model as
    the engine does (its bytes, the weights folder in the session config)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    cuda = ("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1"})
    providers = [cuda, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    model: str | bytes = str(path)
    if from_bytes:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        model = path.read_bytes()
    sess = ort.InferenceSession(model, options, providers=providers)
    values = {k: ort.OrtValue.ortvalue_from_numpy(v, "cpu" if k in HOST else device, 0)
              for k, v in feeds(sess, length, capacity).items()}
    binding = sess.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    dims = {"batch": 1, "seq": 1, "max_context": capacity, "steps": capacity}
    outputs = {}
    for spec in sess.get_outputs():
        if spec.name.startswith("present."):  # written in place into the past buffer
            past = spec.name.replace("present.", "past_key_values.")
            binding.bind_ortvalue_output(spec.name, values[past])
            continue
        shape = [dims.get(d, 1) if isinstance(d, str) or d is None else d for d in spec.shape]
        outputs[spec.name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, DTYPES[spec.type], device, 0)
        binding.bind_ortvalue_output(spec.name, outputs[spec.name])
    if before is not None:
        before(sess, values)
    run = ort.RunOptions()
    run.add_run_config_entry("gpu_graph_id", str(graph_id))
    run_async = ort.RunOptions()
    run_async.add_run_config_entry("gpu_graph_id", str(graph_id))
    run_async.add_run_config_entry("disable_synchronize_execution_providers", "1")
    prepared = {"path": path, "sess": sess, "binding": binding, "run": run, "run_async": run_async,
                "keep": (values, outputs)}
    return finish(prepared, runs)


def finish(p: dict[str, Any], runs: int = 5) -> dict[str, Any]:
    """``runs`` regular runs of a prepared session: warm-up runs, then the capture."""
    for _ in range(runs):
        p["sess"].run_with_iobinding(p["binding"], p["run"])
    return p


def time_prepared(p: dict[str, Any], replays: int) -> dict[str, Any]:
    if "bindings" in p:  # the engine's way: two graphs alternating over swapped state buffers
        return time_alternating(p, replays)
    sess, binding, run, run_async = p["sess"], p["binding"], p["run"], p["run_async"]
    result: dict[str, Any] = {"model": p["path"].name}
    for label, options_, sync_every in (("async", run_async, 8), ("synced", run, 1)):
        t0 = time.perf_counter()
        for i in range(replays):
            sess.run_with_iobinding(binding, run if (i + 1) % sync_every == 0 else options_)
        binding.synchronize_outputs()
        result[f"ms_per_replay_{label}"] = round((time.perf_counter() - t0) / replays * 1e3, 4)
    return result


def time_alternating(p: dict[str, Any], replays: int) -> dict[str, Any]:
    sess, bindings, runs = p["sess"], p["bindings"], p["runs"]
    result: dict[str, Any] = {"model": p["path"].name, "rows": p["rows"], "graphs": len(bindings)}
    for label, sync_every in (("async", 8), ("synced", 1)):
        t0 = time.perf_counter()
        for i in range(replays):
            d = i % len(bindings)
            sess.run_with_iobinding(bindings[d], runs[d][0] if (i + 1) % sync_every == 0 else runs[d][1])
        bindings[0].synchronize_outputs()
        result[f"ms_per_replay_{label}"] = round((time.perf_counter() - t0) / replays * 1e3, 4)
    return result


def prepare_like_engine(path: Path, length: int, capacity: int, device: str, rows: int, graphs: int) -> dict[str, Any]:
    """The model as the engine's slots backend runs it: every buffer ``rows`` rows tall, row 0
    bound by address; with ``graphs`` 2, two state sets (each step reads one and writes the
    other) and one captured graph per direction, replayed alternately."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    cuda = ("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1"})
    sess = ort.InferenceSession(str(path), options, providers=[cuda, "CPUExecutionProvider"] if device == "cuda"
                                else ["CPUExecutionProvider"])
    one = feeds(sess, length, capacity)
    state = {o.name: o.name for o in sess.get_outputs()}  # output → the input it feeds next step
    pairs = {"lmforge_step.next_input_ids": "input_ids", "lmforge_step.next_position_ids": "position_ids",
             "lmforge_step.next_seqlens_k": "seqlens_k"}
    for out in state:
        short = out.removeprefix("lmforge_step.")
        state[out] = pairs.get(out) or ("lmforge_step." + short[:-4] if short.endswith("_out") else "")

    def tall(value: np.ndarray) -> Any:
        big = np.zeros((rows, *value.shape[1:]), value.dtype)
        big[:1] = value
        return ort.OrtValue.ortvalue_from_numpy(big, device, 0)

    def bind_row(binding: Any, name: str, value: Any, output: bool) -> None:
        shape = [1, *value.shape()[1:]]
        dtype = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(bool)": np.bool_}[value.data_type()]
        (binding.bind_output if output else binding.bind_input)(name, device, 0, dtype, shape, value.data_ptr())

    state_inputs = set(state.values()) - {""}
    shared = {k: (ort.OrtValue.ortvalue_from_numpy(v) if k in HOST else tall(v))
              for k, v in one.items() if k not in state_inputs}
    sets = [{k: tall(one[k]) for k in state_inputs} for _ in range(2)]
    spec = next(o for o in sess.get_outputs() if o.name == "logits")
    logits = tall(np.zeros([1, 1, spec.shape[-1]], DTYPES[spec.type]))
    bindings, runs = [], []
    for d in range(graphs):
        binding = sess.io_binding()
        src, dst = sets[d], sets[1 - d]  # one graph: reads set 0, writes set 1, inputs never change
        for name, value in shared.items():
            if name in HOST:
                binding.bind_ortvalue_input(name, value)
            else:
                bind_row(binding, name, value, False)
        for name, value in src.items():
            bind_row(binding, name, value, False)
        for out, feeds_next in state.items():
            if out.startswith("present."):
                bind_row(binding, out, shared[out.replace("present.", "past_key_values.")], True)
            elif out == "logits":
                bind_row(binding, out, logits, True)
            else:
                bind_row(binding, out, dst[feeds_next], True)
        run, run_async = ort.RunOptions(), ort.RunOptions()
        for o in (run, run_async):
            o.add_run_config_entry("gpu_graph_id", str(2 + 3 * d))
        run_async.add_run_config_entry("disable_synchronize_execution_providers", "1")
        bindings.append(binding)
        runs.append((run, run_async))
    for _ in range(3):
        for d in range(graphs):
            sess.run_with_iobinding(bindings[d], runs[d][0])
    return {"path": path, "sess": sess, "bindings": bindings, "runs": runs, "rows": rows,
            "keep": (shared, sets, logits)}


VARIANTS = {
    "fresh": "the model first in a fresh process",
    "tiny-gone": "a tiny CUDA session run once and destroyed, then the model",
    "tiny-alive": "a tiny CUDA session run once and kept, then the model",
    "twice-alive": "the model timed, then a second session on it timed while the first lives, then the first",
    "twice-gone": "the model timed and destroyed, then a second session on it",
    "two-ids": "the model timed, then a second captured graph of its session, then the first again",
    "prefill-first": "one eager prefill-shaped run (128 tokens) of the session before its decode capture",
    "bytes": "the model opened from its bytes with the weights folder in the session config, as the engine does",
    "thread": "the session opened in the main thread, its runs (capture included) in another (the engine loop)",
    "thread-replay": "captured in the main thread, replayed in another",
    "ballast-before": "3 GiB of device memory allocated before the session opens (an engine's KV pool)",
    "ballast-after": "the model captured and timed, then 3 GiB allocated, then timed again",
    "tiny-after": "the model captured and timed, then a tiny CUDA session created and run, then the model again",
    "tiny-before-run-after": "a tiny CUDA session created first, run only after the model is captured and timed",
    "rows16": "every buffer 16 rows tall, row 0 bound by address (the engine's slots), one graph",
    "pingpong": "two state sets and two graphs replayed alternately (the engine's step directions), 1 row",
    "engine-like": "both: 16-row buffers bound by address, two graphs alternating",
    "shapes-first": "eager runs at 6 prefill lengths (16–512 tokens), twice each, before the decode capture",
}


def _prefill(device: str, tokens: int = 128) -> Any:
    """An eager run of ``tokens`` positions over the bound KV buffers (what the engine does to a
    request before its decode steps), ``gpu_graph_id`` -1: never captured."""
    import onnxruntime as ort

    def run(sess: Any, values: dict[str, Any]) -> None:
        binding = sess.io_binding()
        for name, value in values.items():
            if name in ("input_ids", "position_ids"):
                value = ort.OrtValue.ortvalue_from_numpy(np.arange(tokens, dtype=np.int64)[None, :], device, 0)
            elif name == "seqlens_k":
                value = ort.OrtValue.ortvalue_from_numpy(np.array([tokens - 1], np.int32), device, 0)
            elif name == "total_sequence_length":
                value = ort.OrtValue.ortvalue_from_numpy(np.array(tokens, np.int32))
            binding.bind_ortvalue_input(name, value)
        for spec in sess.get_outputs():
            if spec.name.startswith("present."):
                binding.bind_ortvalue_output(spec.name, values[spec.name.replace("present.", "past_key_values.")])
            else:
                binding.bind_output(spec.name, device)
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", "-1")
        sess.run_with_iobinding(binding, options)

    return run


def _shapes(device: str) -> Any:
    """Eager runs at 6 prefill lengths (16–512 tokens, one row), twice each, before the decode capture."""
    runs = [_prefill(device, tokens) for tokens in (16, 32, 64, 128, 256, 512)]

    def run(sess: Any, values: dict[str, Any]) -> None:
        for one in runs:
            one(sess, values)
            one(sess, values)

    return run


def _ballast(device: str, gib: int = 3) -> Any:
    """``gib`` GiB of device memory, in 1 GiB tensors (kept while the result lives)."""
    import onnxruntime as ort

    return [ort.OrtValue.ortvalue_from_shape_and_type([2**28], np.float32, device, 0) for _ in range(gib)]


def _tiny(device: str) -> Any:
    import onnxruntime as ort

    from runtime._onnx_proto import GraphBuilder

    g = GraphBuilder("tiny")
    g.input("x", "float32", [4])
    g.op("Identity", ["x"], outputs=["y"])
    g.output("y", "float32", [4])
    providers = [("CUDAExecutionProvider", {"device_id": "0"})] if device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(g.to_bytes(), providers=providers)
    sess.run(None, {"x": np.ones(4, np.float32)})
    return sess


def variant(name: str, path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One of :data:`VARIANTS`, in this (fresh) process."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rows: list[dict[str, Any]] = []

    def timed(p: dict[str, Any], label: str) -> None:
        r = time_prepared(p, args.replays) | {"variant": name, "step": label}
        rows.append(r)
        print(json.dumps(r), flush=True)

    before = _prefill(args.device) if name == "prefill-first" else _shapes(args.device) if name == "shapes-first" \
        else None
    prep = lambda graph_id=1: prepare(path, args.length, args.capacity, args.device, graph_id, before,  # noqa: E731
                                      from_bytes=name == "bytes")
    if name == "tiny-gone":
        _tiny(args.device)
    keep = _tiny(args.device) if name in ("tiny-alive", "tiny-before-run-after") else None
    if name == "ballast-before":
        keep = _ballast(args.device)
    if name in ("rows16", "pingpong", "engine-like"):
        rows_, graphs = (16, 1) if name == "rows16" else (1, 2) if name == "pingpong" else (16, 2)
        timed(prepare_like_engine(path, args.length, args.capacity, args.device, rows_, graphs), name)
        return rows
    if name in ("thread", "thread-replay"):
        import threading

        if name == "thread":  # the session here, every run there
            opened = prepare(path, args.length, args.capacity, args.device, runs=0)
            work = lambda: timed(finish(opened), "opened here, run in a thread")  # noqa: E731
        else:
            captured = prep()
            timed(captured, "captured here")
            work = lambda: timed(captured, "replayed in a thread")  # noqa: E731
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        if name == "thread-replay":
            timed(captured, "here again")
        return rows
    first = prep()
    timed(first, "first")
    if name == "tiny-after":
        keep = _tiny(args.device)
        timed(first, "first, after a tiny session was created and run")
    if name == "tiny-before-run-after":
        keep.run(None, {"x": np.ones(4, np.float32)})
        timed(first, "first, after the earlier tiny session ran again")
    if name == "ballast-after":
        keep = _ballast(args.device)
        timed(first, "first, after 3 GiB allocated")
    if name == "twice-alive":
        second = prep()
        timed(second, "second, first alive")
        timed(first, "first again")
    elif name == "twice-gone":
        del first
        timed(prep(), "second, first destroyed")
    elif name == "two-ids":
        import onnxruntime as ort

        sess, (values, outputs) = first["sess"], first["keep"]
        binding = sess.io_binding()
        for k, v in values.items():
            binding.bind_ortvalue_input(k, v)
        for spec in sess.get_outputs():
            bound = values[spec.name.replace("present.", "past_key_values.")] if spec.name.startswith("present.") \
                else outputs[spec.name]
            binding.bind_ortvalue_output(spec.name, bound)
        run, run_async = ort.RunOptions(), ort.RunOptions()
        for o in (run, run_async):
            o.add_run_config_entry("gpu_graph_id", "2")
        run_async.add_run_config_entry("disable_synchronize_execution_providers", "1")
        for _ in range(5):
            sess.run_with_iobinding(binding, run)
        timed(first | {"binding": binding, "run": run, "run_async": run_async}, "second graph id, same session")
        timed(first, "first again")
    del keep
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--capacity", type=int, default=8192)
    parser.add_argument("--replays", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run")
    parser.add_argument("--variant", default="", help="what runs before the first model (see VARIANTS)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    import onnxruntime as ort

    if args.device == "cuda":
        ort.preload_dlls()
    if args.variant:
        rows = variant(args.variant, args.models[0], args)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"gpu_graph_ab-{args.variant}.json").write_text(json.dumps(rows, indent=1))
        return 0
    rows = []
    for _ in range(args.rounds):
        for path in args.models:
            try:
                r = time_model(path, args.length, args.capacity, args.replays, args.device)
            except Exception as exc:  # noqa: BLE001 - reported, the next model runs
                r = {"model": path.name, "error": f"{type(exc).__name__}: {exc}"[:400]}
            rows.append(r)
            print(json.dumps(r), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_graph_ab.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
