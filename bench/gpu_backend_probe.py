"""The slots backend's captured step without the engine around it, one process per mode: which
part of what the engine does makes its batch-1 step replay slower (1.28 ms) than the same model
bound the same way in plain onnxruntime (1.125 ms; ``bench/gpu_graph_ab.py``)? Issue #11.

Modes (``--mode``):

* ``backend`` — :class:`runtime.kv_slots.SlotsBackend` alone in the main thread: one prefill,
  then decode blocks of 8 steps (no engine, no tokenizer, no loop thread);
* ``rowwriter`` — the same, after one run of a small session that copies host rows into the
  backend's buffers by address (an Identity a tensor), as the backend wrote a request's row
  before it kept host copies of its constants: that run alone slowed every later replay of the
  decoder's captured step (1.29 against 1.13 ms a step before the change);
* ``bare`` — no prefill: the row starts at a fixed length over zero KV.

Prints and writes ms a step, steps launched back to back (one sync a block) and synchronized one
by one::

    PYTHONPATH=$GPU_SITE:$PWD python3 bench/gpu_backend_probe.py ART --mode backend  # onnxruntime-gpu's site
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _row_writer_run(device: Any, backend: Any, slot: int) -> None:
    """One run of a session whose Identity nodes copy host rows into ``slot`` of the backend's
    constant buffers (bound by address)."""
    from runtime._onnx_proto import GraphBuilder
    from runtime.step_graph import CONSTANTS

    g = GraphBuilder("row_writer")
    arrays = {}
    for name, dtype in CONSTANTS:
        row = [1, *backend.consts[name].shape()[1:]]
        g.input(f"src.{name}", dtype, row)
        g.op("Identity", [f"src.{name}"], outputs=[f"dst.{name}"])
        g.output(f"dst.{name}", dtype, row)
        arrays[name] = backend._consts_host[name][slot:slot + 1].copy()
    session = device.session(g.to_bytes(), small=True)
    binding = session.io_binding()
    for name, value in arrays.items():
        binding.bind_cpu_input(f"src.{name}", value)
        device.bind_rows(binding, f"dst.{name}", backend.consts[name], slot, 1, output=True)
    device.run(session, binding)
    binding.synchronize_outputs()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--mode", default="backend", choices=["backend", "rowwriter", "bare"])
    parser.add_argument("--device", default="cuda", help="cpu: a dry run")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = parser.parse_args()
    import onnxruntime as ort

    if args.device == "cuda":
        ort.preload_dlls()
    from runtime import SamplingParams, kv_slots
    from runtime.artifact import load_artifact
    from runtime.device import Device
    from runtime.engine import decoder_layout
    from runtime.sampling import host_values, row_arrays

    artifact = load_artifact(args.artifact, verify_hashes=False)
    layout = decoder_layout(artifact, None, None, 1)
    device = Device(args.device)
    backend = kv_slots.SlotsBackend(artifact, device, layout, 1, 8, args.device == "cuda")
    params = SamplingParams(min_new_tokens=10**6)
    plan = host_values([params], 4096)
    slot = backend.allocate()
    prompt = list(range(3, 3 + args.prompt_len))
    arrays = row_arrays(params, prompt, sorted(layout["eos"]), layout["vocab"], layout["max_context"])
    if args.mode == "bare":  # the row's state as a prefill would leave it, KV zero
        backend._write_constants([(slot, arrays)])
        state = {"input_ids": [[5]], "position_ids": [[args.prompt_len]], kv_slots.SEQLENS_K: [args.prompt_len]}
        for name, value in state.items():
            buffer = backend.sets[backend.current][name]
            whole = buffer.numpy()
            whole[slot] = np.asarray(value)[0]
            buffer.update_inplace(whole)
    else:
        backend.prefill_many([(slot, prompt, arrays)], False, plan, lambda firsts: None)
    if args.mode == "rowwriter":
        _row_writer_run(device, backend, slot)
    backend.decode(1, 8, {slot: 0}, False, plan)  # capture
    result: dict[str, Any] = {"mode": args.mode, "artifact": str(args.artifact)}
    for label in ("async", "synced", "async", "synced"):
        t0 = time.perf_counter()
        for _ in range(args.blocks):
            backend.decode(1, 8, {slot: 0}, False, plan, interrupt=(lambda: False) if label == "synced" else None)
        result.setdefault(label, []).append(round(1e3 * (time.perf_counter() - t0) / (8 * args.blocks), 4))
    print(json.dumps(result), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_backend_probe-{args.mode}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
