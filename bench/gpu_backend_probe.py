"""The slots backend's captured step without the engine around it, one process per mode: which
part of what the engine does makes its batch-1 step replay slower (1.28 ms) than the same model
bound the same way in plain onnxruntime (1.125 ms; ``bench/gpu_graph_ab.py``)? Issue #11.

Modes (``--mode``):

* ``backend`` — :class:`runtime.kv_slots.SlotsBackend` alone in the main thread: its row writer
  session, one prefill, then decode blocks of 8 steps (no engine, no tokenizer, no loop thread);
* ``bare`` — the same backend with its row writes done by ``OrtValue.update_inplace`` (no row
  writer session) and no prefill (the row starts at a fixed length over zero KV);
* ``nowriter`` — no row writer session, one prefill;
* ``noprefill`` — the row writer session, no prefill;
* ``writer-after`` — ``backend`` with a second row writer opened after the decoder's session and
  used for the prefill's row writes (the order before the backend opened its writer first).

Prints and writes ms a step, steps launched back to back (one sync a block) and synchronized one
by one::

    PYTHONPATH=/tmp/gpu-site:$PWD python3 bench/gpu_backend_probe.py ART --mode backend
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


def _inplace_writer(backend_module: Any) -> None:
    """Replace the row writer session by host copies of whole buffers (``update_inplace``)."""

    class HostWriter:
        def __init__(self, device: Any, specs: Any) -> None:
            self.names = list(specs)

        def write(self, row: int, arrays: Any, buffers: Any) -> None:
            for name in self.names:
                whole = buffers[name].numpy()
                whole[row] = np.asarray(arrays[name]).reshape(whole.shape[1:])
                buffers[name].update_inplace(np.ascontiguousarray(whole))

    backend_module.RowWriter = HostWriter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--mode", default="backend", choices=["backend", "bare", "nowriter", "noprefill",
                                                                  "writer-after"])
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
    from runtime.step_graph import PREFIX

    if args.mode in ("bare", "nowriter"):
        _inplace_writer(kv_slots)
    artifact = load_artifact(args.artifact, verify_hashes=False)
    layout = decoder_layout(artifact, None, None, 1)
    device = Device(args.device)
    backend = kv_slots.SlotsBackend(artifact, device, layout, 1, 8, args.device == "cuda")
    shapes = backend._row_shapes()
    dtypes = {name: dtype for name, _, dtype in kv_slots.STATE} | dict(kv_slots.CONSTANTS)
    if args.mode == "writer-after":  # a writer session opened after the decoder's
        backend._writer = kv_slots.RowWriter(device, {n: (dtypes[n], shapes[n]) for n in backend._writer.names})
    params = SamplingParams(min_new_tokens=10**6)
    plan = host_values([params], 4096)
    slot = backend.allocate()
    prompt = list(range(3, 3 + args.prompt_len))
    arrays = row_arrays(params, prompt, sorted(layout["eos"]), layout["vocab"], layout["max_context"])
    if args.mode in ("bare", "noprefill"):  # the row's state as a prefill would leave it, KV zero
        rows = {PREFIX + k: v for k, v in arrays.items()}
        rows.update({"input_ids": np.array([[5]], np.int64), "position_ids": np.array([[args.prompt_len]], np.int64),
                     kv_slots.SEQLENS_K: np.array([args.prompt_len], np.int32),
                     PREFIX + "history": np.zeros((1, backend.window), np.int64),
                     PREFIX + "step": np.zeros((1,), np.int64),
                     PREFIX + "last_position": np.array([backend.capacity - 1], np.int64)})
        targets = {**backend.sets[1 - backend.current], **backend.consts}
        rows = {k: np.asarray(v).reshape([1, *targets[k].shape()[1:]]) for k, v in rows.items() if k in targets}
        if args.mode == "noprefill":  # a row writer session
            kv_slots.RowWriter(device, {k: (dtypes[k], shapes[k]) for k in rows}).write(slot, rows, targets)
        else:
            kv_slots.RowWriter(device, dict.fromkeys(rows)).write(slot, rows, targets)
        backend.current = 1 - backend.current  # as after a prefill: the written set feeds the next step
    else:
        backend.prefill_many([(slot, prompt, arrays)], False, plan, lambda firsts: None)
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
