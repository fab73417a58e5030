"""optimum-onnx's ``ORTModelForCausalLM`` as a bench peer, in its own interpreter.

optimum-onnx needs ``transformers < 4.58`` while lmforge runs on transformers 5, so this file runs
as a script (never imported as part of lmforge: it must not pull lmforge's imports) with a second
site first on ``PYTHONPATH``. It speaks JSON lines: every answer is one stdout line starting with
``@@bench `` (other stdout lines, from libraries, are ignored by the parent).

0. ``{"probe": true}`` → can ``optimum.onnxruntime`` be imported here? (answered before the
   parent saves a Hugging Face folder for it)
1. ``{"folder", "device", "dtype", "export_dir"}`` → export the HF folder once (in a child process
   of its own, so the torch model's memory is not this process's) with
   ``optimum.exporters.onnx.main_export``, load it with IO binding on CUDA, answer
   ``{"ok": true, "weight_bytes", "versions"}`` or ``{"ok": false, "reason"}``.
2. ``{"prompts": [[ids]], "new_tokens": N}`` → one greedy generation of exactly N tokens per row,
   answered ``{"ok": true, "ttft_s", "decode_s", "mem_mb"}``; ``mem_mb`` is this process's
   resident-set growth since start (load + peak during the runs) on the CPU.
3. ``{"quit": true}`` or end of input → exit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

MARK = "@@bench "
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return 0.0


class _Peak:
    def __init__(self) -> None:
        self.peak = _rss_mb()
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.01)


def _say(payload: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _export(folder: str, out: str, device: str, dtype: str) -> None:
    from optimum.exporters.onnx import main_export

    # no_post_process: the post-processing (deduplicating the tied embedding / lm_head) serializes
    # the whole model in memory, which fails past protobuf's 2 GB limit (the Llama-3.2-1B shape in
    # fp16: "Failed to serialize proto"); the export itself writes external data and is unaffected.
    main_export(folder, output=out, task="text-generation-with-past", device=device, dtype=dtype,
                local_files_only=True, do_validation=False, no_post_process=True)


def _load(request: dict[str, Any]) -> Any:
    export_dir = Path(request["export_dir"])
    if not (export_dir / "config.json").is_file():
        tmp = export_dir.with_name(export_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        done = subprocess.run([sys.executable, __file__, "--export", request["folder"], str(tmp), request["device"],
                               request["dtype"]], stdout=sys.stderr, stderr=sys.stderr)
        if done.returncode != 0 or not (tmp / "config.json").is_file():
            raise RuntimeError(f"optimum's ONNX export failed (exit {done.returncode}; its log is the worker's stderr)")
        tmp.rename(export_dir)
    from optimum.onnxruntime import ORTModelForCausalLM

    cuda = request["device"] == "cuda"
    model = ORTModelForCausalLM.from_pretrained(
        export_dir, provider="CUDAExecutionProvider" if cuda else "CPUExecutionProvider",
        use_io_binding=cuda, use_cache=True,
    )
    return model


def _generate(model: Any, request: dict[str, Any], cuda: bool) -> dict[str, Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.at = 0.0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    n = int(request["new_tokens"])
    ids = torch.tensor(request["prompts"], dtype=torch.long)
    mask = torch.ones_like(ids)
    if cuda:
        ids, mask = ids.to("cuda"), mask.to("cuda")
    clock = FirstToken()
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         pad_token_id=int(request.get("pad_token_id", 0)), streamer=clock)
    if cuda:
        torch.cuda.synchronize()
    end = time.perf_counter()
    got = int(out.shape[1]) - ids.shape[1]
    if got != n:
        raise RuntimeError(f"generated {got} tokens, asked for {n}")
    return {"ttft_s": clock.at - t0, "decode_s": end - clock.at}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--export":
        _export(*sys.argv[2:6])
        return 0
    start_rss = _rss_mb()
    peak: _Peak | None = None
    model = None
    cuda = False
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("quit"):
            break
        if request.get("probe"):  # can this site run optimum at all? (before anything is exported)
            try:
                import optimum.onnxruntime  # noqa: F401
            except BaseException as exc:  # noqa: BLE001 - answered, not raised
                _say({"ok": False, "reason": _reason(exc)})
                return 1
            _say({"ok": True})
            continue
        try:
            if model is None:
                cuda = request["device"] == "cuda"
                model = _load(request)
                import importlib.metadata as md

                folder = Path(request["export_dir"])
                weight = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".onnx_data", ".data"))
                peak = _Peak()
                versions = {}
                for dist in ("optimum-onnx", "optimum", "transformers", "onnxruntime", "onnxruntime-gpu"):
                    try:
                        versions[dist] = md.version(dist)
                    except md.PackageNotFoundError:
                        pass
                _say({"ok": True, "weight_bytes": weight, "versions": versions})
            else:
                result = _generate(model, request, cuda)
                result["mem_mb"] = (peak.peak if peak else _rss_mb()) - start_rss
                _say({"ok": True, **result})
        except BaseException as exc:  # noqa: BLE001 - every failure is answered, never a hang
            traceback.print_exc(file=sys.stderr)
            _say({"ok": False, "reason": _reason(exc)})
            if model is None:
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
