"""The interface every benchmarked runtime implements, and lmforge's own runner.

A runner is prepared once (load or build; it may refuse with :class:`NotRun` and a reason) and
then asked for one timed generation at a time. The harness owns warm-up, alternation and
medians, so a runner only has to generate exactly ``new_tokens`` greedy tokens for every prompt
of a batch and say how long the first token and the rest took. Keeping the interface this small
is what lets a peer run in another process (optimum) or fail without taking the others down.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["Timing", "NotRun", "Runner", "LmforgeRunner", "onnx_weight_bytes"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One timed generation of a batch.

    ``ttft_s``: from the call to the first new token of every row on the host (prefill included);
    ``decode_s``: from there to the last token, i.e. ``new_tokens - 1`` decode steps.
    """

    ttft_s: float
    decode_s: float
    new_tokens: int
    batch: int

    @property
    def decode_tok_s(self) -> float:
        """Decode tokens/s of the whole batch (tokens after the first, over the time after it)."""
        return (self.new_tokens - 1) * self.batch / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def per_row_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def throughput_tok_s(self) -> float:
        """End-to-end: every new token of the batch over the whole call, prefill included."""
        total = self.ttft_s + self.decode_s
        return self.new_tokens * self.batch / total if total > 0 else 0.0


class NotRun(Exception):
    """A runner cannot run here; ``str(exc)`` is the one-line reason the report shows.

    Not an :class:`~runtime.errors.LmforgeError`: it is no mistake of the user's (a peer that is
    not installed, a CUDA-only variant on CPU), and the bench goes on without that runner.
    """


class Runner:
    """Base class: a named runtime that generates exactly ``new_tokens`` greedy tokens per row.

    Subclasses set :attr:`name` and implement :meth:`prepare` and :meth:`run`; after
    :meth:`prepare` they fill :attr:`weight_bytes` (bytes of weights one decode step reads) and
    :attr:`kv_bytes_per_elem` (its KV cache element size) for the bandwidth estimate, and may add
    facts to :attr:`info` (precision, versions, how memory was measured) for the JSON report.
    """

    name = "runner"
    in_process = True  # False: its memory is not this process's (the harness asks the runner)

    def __init__(self) -> None:
        self.weight_bytes: int | None = None
        self.kv_bytes_per_elem: int | None = None
        self.info: dict[str, Any] = {}
        self.run_extras: dict[str, float] = {}  # per-run measurements the harness keeps the max of

    def prepare(self) -> None:
        raise NotImplementedError

    def run(self, prompt_ids: list[list[int]], new_tokens: int) -> Timing:
        raise NotImplementedError

    def own_peak_memory_mb(self) -> float | None:
        """For out-of-process runners: their own peak memory (MB), if they can tell."""
        return None

    def close(self) -> None:
        """Release what :meth:`prepare` loaded (sessions, subprocesses)."""


def onnx_weight_bytes(folder: Path) -> int:
    """Bytes of the ONNX graph and external weight files in ``folder`` (what a step reads, at most)."""
    total = 0
    for path in folder.iterdir():
        if path.is_file() and (path.suffix in (".onnx", ".data") or path.name.endswith(".onnx.data")):
            total += path.stat().st_size
    return total


class LmforgeRunner(Runner):
    """``runtime.Engine`` through its public API only (``Engine.load`` + ``generate_results``).

    On CUDA a ``shared-buffer`` artifact is opened with ``cuda_graph=True`` (the decode step
    replayed as a captured graph) and warmed up as ``lmforge serve`` does before it listens
    (``Engine.warm_up``: every decode bucket and one-row prefill captured, so the timed runs meet
    no capture); everything else opens plainly. EOS is masked with
    ``SamplingParams(min_new_tokens=new_tokens)`` so every row runs full length.
    """

    def __init__(self, artifact: Path, device: str, name: str = "lmforge") -> None:
        super().__init__()
        self.artifact = artifact
        self.device = device
        self.name = name
        self._engine: Any = None

    def prepare(self) -> None:
        from runtime import Engine
        from runtime.artifact import KvMode

        manifest = json.loads((self.artifact / "manifest.json").read_text())
        graph = self.device == "cuda" and manifest.get("kv_mode") == KvMode.SHARED_BUFFER.value
        self._engine = Engine.load(self.artifact, device=self.device, cuda_graph=graph)
        warm_up_s = self._engine.warm_up() if graph else 0.0
        kv_dtype = str(manifest.get("kv", {}).get("dtype", "float32"))
        self.kv_bytes_per_elem = 2 if kv_dtype == "float16" else 4
        self.weight_bytes = onnx_weight_bytes(self.artifact)
        self.info.update({
            "artifact": str(self.artifact), "precision": manifest.get("precision"),
            "kv_mode": manifest.get("kv_mode"), "cuda_graph": graph, "engine": type(self._engine).__name__,
            "warm_up_s": round(warm_up_s, 2),
        })

    def run(self, prompt_ids: list[list[int]], new_tokens: int) -> Timing:
        from runtime import SamplingParams

        params = SamplingParams(min_new_tokens=new_tokens)
        results = self._engine.generate_results(prompt_ids, new_tokens, params)
        short = [r.new_tokens for r in results if r.new_tokens != new_tokens]
        if short:
            raise RuntimeError(f"rows stopped early ({short[:4]} of {new_tokens} tokens)")
        ttft = max(r.ttft_s for r in results)
        total = max(r.total_s for r in results)
        return Timing(ttft_s=ttft, decode_s=total - ttft, new_tokens=new_tokens, batch=len(prompt_ids))

    def close(self) -> None:
        self._engine = None
