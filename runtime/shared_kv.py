"""Running a ``kv_mode: "shared-buffer"`` artifact (:mod:`passes.shared_buffer`), optionally with
the decode step captured in a CUDA graph.

:class:`SharedBufferEngine` is the :class:`~runtime.engine.Engine` for these artifacts
(``Engine.load`` returns one when the manifest says ``shared-buffer``); validation, stop checks,
streaming, detokenization and the on-device sampler are the engine's. What differs:

* **KV buffers.** One ``[batch, kv_heads, capacity, head_dim]`` ``OrtValue`` per past tensor,
  allocated once per batch on the engine's device (zero-filled) and bound as *both* the
  ``past_key_values.{i}.*`` input and the ``present.{i}.*`` output: GroupQueryAttention writes
  the new K/V into it in place. ``capacity`` is the longest prompt + ``max_new_tokens`` (or the
  manifest's ``kv.max_context`` with CUDA graphs, so one capture serves every request of a batch
  size).
* **Lengths, not a mask.** Row ``b`` is right-aligned at position 0 of its buffer row. Its prompt
  is prefilled with ``seqlens_k = L − 1`` and ``total_sequence_length = L`` (GQA's first-prompt
  case); rows of equal length next to each other share one prefill run, each run bound to its
  rows of the batch buffers by address (``IOBinding.bind_input(..., buffer_ptr)``), so nothing
  is copied. A greedy batch on step buffers (below) prefills through the fused step model with
  its state bound by rows: one run per group prefills, picks the first token and writes the first
  decode step's inputs (the request's ``seen`` mask and ``step = 0`` are written into set 0 first),
  and the host reads the ids once. Otherwise a row's last-position logits go into a
  ``[batch, 1, vocab]`` buffer (a one-node ``Gather`` graph, bound the same way), then the
  sampler runs once for the batch.
  Decode steps feed all rows at once: ``position_ids = seqlens_k = prompt_len + generated − 1``
  per row, and a constant ``total_sequence_length`` (the buffer capacity: GQA's decode case needs
  ``seq = 1 ≠ total``, and the CUDA kernel reads this scalar on the host, so under a CUDA graph
  it must not change; onnxruntime-genai does the same, its ``Shape(attention_mask)[1]`` of a
  max-length mask). It is bound as a CPU tensor on every device.
  A batched prefill of unequal right-padded rows would save launches, but needs per-row logit
  positions and relies on the CUDA kernel honouring ``seqlens_k`` for padded first prompts;
  one run per equal-length group is correct on every kernel.
* **The fused step** (:mod:`runtime.step_graph`). Decode steps run the decoder with the greedy
  sampler and the next-input arithmetic appended, as one model: one ``run_with_iobinding`` a
  step. Its state (next ``input_ids``/``position_ids``/``seqlens_k``, the repetition mask, the
  step count, and a ``[batch, read_every]`` history of new ids) lives in two fixed sets of
  buffers that alternate as inputs and outputs (:class:`_StepBuffers`), so the host does nothing
  between steps and reads the ids back once per ``read_every`` steps (default 16 on CUDA, where a read is a
  device sync; 1 on the CPU, where it is free and streaming stays smooth) — a row that
  stops inside a block ignores the block's remaining ids (at most ``read_every − 1`` wasted
  steps). Rows that *sample* (temperature / top-k / top-p) take the three-session step instead:
  the decoder (direction 0 of the same buffers), the sampler graph, then a tiny "advance" graph
  that writes the next inputs into set 0, and a host read of the ids each step. The step model
  also runs every prefill and every uncaptured step (for a sampling batch its extra inputs are
  zeros and its extra outputs are ignored), so the weights are loaded once. Batches on step
  buffers keep finished rows (the buffers have fixed shapes); only the uncaptured fallback below
  compacts.
* **CUDA graph** (``Engine.load(..., cuda_graph=True)``, CUDA only): the step model's session has
  ``enable_cuda_graph=1`` and each direction of each batch size's buffers is one captured graph
  (``gpu_graph_id = 2·batch + d``), KV at the manifest's full ``max_context`` so one capture
  serves every request of that batch size; a request writes its constants (prompt lengths, stop
  mask, min-new-tokens, penalties) into the buffers in place (same addresses). All but the last
  replay of a block run with ``disable_synchronize_execution_providers`` so the host does not wait
  for the GPU between them. Prefill, whose shapes vary, runs on the same session with
  ``gpu_graph_id = -1`` (onnxruntime's "do not capture" annotation; onnxruntime-genai runs its
  prompts the same way), so the weights are on the device once. Buffers busy with another
  request make the second request run eagerly on the same session, without step buffers (the
  three-session step on its own KV), compacting finished rows as the concat engine does. Runs of
  the graph-enabled session are serialized by a lock, held over a block of replays, one eager
  decoder run, or a whole prefill (every group's run and the reading of its ORT-allocated logits):
  a captured graph's intermediate tensors live in arena memory that onnxruntime considers free
  between runs, so an eager run on another thread must not allocate it while a replay is in
  flight. (onnxruntime's CUDA provider keeps its graphs per thread, so a request served on
  another thread may capture its own.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort

from runtime._onnx_proto import GraphBuilder
from runtime.artifact import Artifact, KvMode
from runtime.compact_graph import COMPACT_INDEX
from runtime.engine import (
    _NP_DTYPES, _ORT_ERRORS, DecodeState, Engine, _Event, _providers, _Row, read_decoder_manifest,
)
from runtime.errors import GenerationError
from runtime.sampling import sampler_arrays
from runtime.step_graph import CONSTANTS, PREFIX, STATE, compose_step_model

__all__ = ["SharedBufferEngine", "SharedState", "build_advance_model", "build_last_logits_model"]

log = logging.getLogger(__name__)

SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"


def build_advance_model() -> bytes:
    """``next_ids [b,1]``, ``prompt_lens [b]``, ``step []`` → the next decoder inputs.

    ``step`` is the sampler's ``step_out`` (tokens generated so far, the new one included), so
    the new token sits at position ``prompt_len + step − 1``, which is also GQA's ``seqlens_k``
    (total length after the call − 1).
    """
    g = GraphBuilder("lmforge_advance")
    g.input("next_ids", "int64", ["batch", 1])
    g.input("prompt_lens", "int64", ["batch"])
    g.input("step", "int64", [])
    pos = g.op("Sub", [g.op("Add", ["prompt_lens", "step"]), g.const(1, "int64")])
    g.op("Identity", ["next_ids"], outputs=["input_ids"])
    g.op("Unsqueeze", [pos, g.const(np.array([1], np.int64))], outputs=["position_ids"])
    g.op("Cast", [pos], {"to": 6}, outputs=[SEQLENS_K])  # int32
    g.output("input_ids", "int64", ["batch", 1])
    g.output("position_ids", "int64", ["batch", 1])
    g.output(SEQLENS_K, "int32", ["batch"])
    return g.to_bytes()


def build_last_logits_model(dtype: str) -> bytes:
    """``logits [n, seq, vocab]`` → ``last [n, 1, vocab]`` (the last position)."""
    g = GraphBuilder("lmforge_last_logits")
    g.input("logits", dtype, ["n", "seq", "vocab"])
    g.op("Gather", ["logits", g.const(np.array([-1], np.int64))], {"axis": 1}, outputs=["last"])
    g.output("last", dtype, ["n", 1, "vocab"])
    return g.to_bytes()


@dataclasses.dataclass
class _StepBuffers:
    """Every tensor the fused step reads or writes, at fixed addresses, and its two bindings.

    ``sets[d]`` holds the ping-ponged state (:data:`runtime.step_graph.STATE` inputs);
    ``bindings[d]`` reads ``sets[d]`` and writes ``sets[1 − d]``; ``current`` is the set holding
    the next step's inputs. With CUDA graphs one ``_StepBuffers`` per batch size is made on first
    use and kept (each direction is one captured graph, ``gpu_graph_id = 2·batch + d``); without,
    each request makes its own.
    """

    batch: int
    capacity: int
    kv: dict[str, ort.OrtValue]
    logits: ort.OrtValue  # [batch, 1, vocab]
    sets: tuple[dict[str, ort.OrtValue], dict[str, ort.OrtValue]]
    consts: dict[str, ort.OrtValue]
    total: ort.OrtValue  # CPU int32 scalar = capacity
    bindings: tuple[Any, Any]
    options: tuple[ort.RunOptions | None, ort.RunOptions | None]
    async_options: tuple[ort.RunOptions | None, ort.RunOptions | None]
    captured: bool
    current: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    replays: int = 0
    prefill_bindings: dict[tuple[int, int], Any] = dataclasses.field(default_factory=dict)  # (start, rows) → binding


@dataclasses.dataclass
class SharedState(DecodeState):
    """A batch in flight on a shared-buffer artifact."""

    kv: dict[str, ort.OrtValue] = dataclasses.field(default_factory=dict)  # by past name; also the presents
    logits: ort.OrtValue | None = None  # [batch, 1, vocab] last-position logits
    prompt_lens: ort.OrtValue | None = None
    capacity: int = 0
    total: ort.OrtValue | None = None  # CPU int32 scalar for decode steps
    advance_binding: Any = None
    buffers: _StepBuffers | None = None  # None: the three-session step, the step model run eagerly
    fused: bool = False  # every row greedy: one fused run a step, ids read back per block
    fused_prefill: bool = False  # fused, and prefill is a step-model run (decided once, at allocation)
    extras: dict[str, ort.OrtValue] = dataclasses.field(default_factory=dict)  # zeros for the step inputs of plain runs


class SharedBufferEngine(Engine):
    """:class:`Engine` for ``kv_mode: "shared-buffer"`` artifacts; see the module docstring."""

    def __init__(self, artifact: Artifact, device: str = "cpu", cuda_graph: bool = False,
                 read_every: int | None = None) -> None:
        # Engine.__init__ validates the concat contract; the generic attributes are set here.
        if artifact.kv_mode is not KvMode.SHARED_BUFFER:
            raise GenerationError(f"artifact {artifact.path} has kv_mode {artifact.kv_mode.value}",
                                  expected="shared-buffer", fix="load it with Engine.load")
        providers, self.device_type = _providers(device)
        if cuda_graph and self.device_type != "cuda":
            raise GenerationError("cuda_graph=True needs device='cuda'", got=f"device={device!r}",
                                  fix="pass device='cuda', or leave cuda_graph off")
        if read_every is None:  # a host read is a device sync on CUDA, and free on the CPU
            read_every = 16 if self.device_type == "cuda" else 1
        if int(read_every) < 1:
            raise GenerationError("read_every must be at least 1", got=str(read_every))
        if self.device_type == "cuda" and artifact.precision == "fp32":
            providers[0][1]["use_tf32"] = "0"  # as Engine: fp32 artifacts promise fp32 numerics
        self.device = device
        self.artifact = artifact
        self.cuda_graph = bool(cuda_graph)
        self.read_every = int(read_every)
        manifest = artifact.manifest
        arch = artifact.architecture
        self.vocab = int(arch["vocab"])
        self.layers = int(arch["layers"])
        kv = manifest.get("kv", {})
        self.max_context = int(kv.get("max_context") or arch["max_context"])
        self._kv_heads, self._head_dim = int(arch["kv_heads"]), int(arch["head_dim"])
        self.compact_finished_rows = True
        (self.eos_token_ids, self.pad_token_id, self.kv_dtype,
         self._past, self._present) = read_decoder_manifest(artifact, self.layers)
        self._inputs = {t.name: t for t in artifact.inputs}
        expected = {"input_ids", "position_ids", SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *self._past}
        if set(self._inputs) != expected:
            raise GenerationError(
                f"artifact {artifact.path}: io.inputs does not follow the shared-buffer contract",
                expected="input_ids, position_ids, seqlens_k, total_sequence_length, " + ", ".join(self._past[:2]) + ", …",
                got=str(sorted(self._inputs)), fix="re-run `lmforge optimize`",
            )
        outputs = {t.name: t for t in artifact.outputs}
        if "logits" not in outputs or any(n not in outputs for n in self._present):
            raise GenerationError(f"artifact {artifact.path}: io.outputs lacks logits or present KV",
                                  fix="re-run `lmforge optimize`")
        self._logits_dtype = outputs["logits"].dtype
        self._output_names = ["logits", *self._present]
        if self.device_type == "cuda" and self.kv_dtype == "float32":
            raise GenerationError(
                f"artifact {artifact.path}: an fp32 shared-buffer artifact cannot run on CUDA",
                got="GroupQueryAttention has no fp32 CUDA kernel (its fallback gives wrong logits)",
                fix="optimize with --device cuda --precision fp16 (or int8/int4), or run this one on the CPU",
            )

        # The fused step model: the decoder with the greedy step appended (runtime.step_graph).
        # Its one session serves every run: captured decode steps, and (eagerly) prefill and the
        # uncaptured fallback.
        step_model = compose_step_model(artifact.model_path.read_bytes(), self.vocab, self.read_every)
        step_providers = providers
        if self.cuda_graph:
            step_providers = [("CUDAExecutionProvider", {**providers[0][1], "enable_cuda_graph": "1"}),
                              "CPUExecutionProvider"]
        try:
            self._step_session = self._open(step_model, step_providers, weights_dir=artifact.model_path.parent)
        except GenerationError as exc:
            if self.cuda_graph and "graph capture" in str(exc):
                raise GenerationError(
                    "cuda_graph=True: onnxruntime cannot place every node of this graph on CUDA",
                    got=f"a {artifact.precision} artifact whose graph has a node without a CUDA kernel",
                    fix="re-optimize with `lmforge optimize --device cuda` (fp16/int8/int4), or leave cuda_graph off",
                ) from exc
            raise
        graph_inputs = {i.name for i in self._step_session.get_inputs()}
        if not graph_inputs >= set(self._inputs):
            raise GenerationError(
                f"artifact {artifact.path}: the manifest's io.inputs and model.onnx disagree",
                expected=str(sorted(self._inputs)), got=str(sorted(graph_inputs)), fix="re-run `lmforge optimize`",
            )
        # One session serves every run: prefill and uncaptured steps run it eagerly with
        # ``gpu_graph_id = -1`` (onnxruntime's "skip capture" annotation), so the weights are on the
        # device once. Under CUDA graphs its runs are serialized (see the module docstring).
        self._session = self._step_session
        self._eager: ort.RunOptions | None = None
        if self.cuda_graph:
            self._eager = ort.RunOptions()
            self._eager.add_run_config_entry("gpu_graph_id", "-1")
        self._run_lock: Any = threading.Lock() if self.cuda_graph else contextlib.nullcontext()
        self.fuse_prefill = True  # False: prefill ends with the sampler + advance sessions (measurements)
        self._buffers: dict[int, _StepBuffers] = {}
        self._buffers_lock = threading.Lock()
        self.fused_steps = 0  # decode steps run fused, over the engine's life (benchmarks, tests)
        self.fuse_greedy = True  # False: greedy batches take the three-session step too (measurements)

        self._advance = self._open(build_advance_model(), providers, small=True)
        self._last = self._open(build_last_logits_model(self._logits_dtype), providers, small=True)
        row_tensors = [("input_ids", "int64", 2, 0), ("position_ids", "int64", 2, 0), (SEQLENS_K, "int32", 1, 0),
                       ("prompt_lens", "int64", 1, 0), ("attention_mask", "int64", 2, 0)]
        self._open_helpers(artifact, providers, row_tensors + [(n, self.kv_dtype, 4, 0) for n in self._past])
        log.info("loaded %s (shared-buffer KV%s) on %s (%d layers, vocab %d, max context %d)", artifact.path,
                 ", CUDA graph" if self.cuda_graph else "", device, self.layers, self.vocab, self.max_context)

    # ----------------------------------------------------------------------------------------
    # Buffers

    def _zeros(self, shape: list[int], dtype: str) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=_NP_DTYPES.get(dtype, dtype)), self.device_type, 0)

    @staticmethod
    def _host_scalar(value: int) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.array(value, dtype=np.int32))  # CPU: GQA reads it on the host

    def _kv_shape(self, batch: int, capacity: int) -> list[int]:
        return [batch, self._kv_heads, capacity, self._head_dim]

    def _state_shapes(self, batch: int) -> dict[str, tuple[list[int], str]]:
        shapes = {"input_ids": [batch, 1], "position_ids": [batch, 1], SEQLENS_K: [batch],
                  PREFIX + "seen": [batch, self.vocab], PREFIX + "step": [], PREFIX + "history": [batch, self.read_every]}
        return {name: (shapes[name], dtype) for name, _, dtype in STATE}

    def _new_buffers(self, batch: int, capacity: int, captured: bool) -> _StepBuffers:
        kv = {n: self._zeros(self._kv_shape(batch, capacity), self.kv_dtype) for n in self._past}
        logits = self._zeros([batch, 1, self.vocab], self._logits_dtype)
        shapes = self._state_shapes(batch)
        sets = tuple({n: self._zeros(*shapes[n]) for n in shapes} for _ in range(2))
        consts = {n: self._zeros([batch, self.vocab] if dtype == "bool" else [batch], dtype) for n, dtype in CONSTANTS}
        total = self._host_scalar(capacity)
        outputs = {inp: out for inp, out, _ in STATE}
        bindings, options, async_options = [], [], []
        for d in (0, 1):
            binding = self._step_session.io_binding()
            for name, value in sets[d].items():
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(outputs[name], sets[1 - d][name])
            for name, value in consts.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, total)
            binding.bind_ortvalue_output("logits", logits)
            for past, present in zip(self._past, self._present):
                binding.bind_ortvalue_input(past, kv[past])
                binding.bind_ortvalue_output(present, kv[past])
            bindings.append(binding)
            if captured:
                run, run_async = ort.RunOptions(), ort.RunOptions()
                for o in (run, run_async):
                    o.add_run_config_entry("gpu_graph_id", str(2 * batch + d))
                run_async.add_run_config_entry("disable_synchronize_execution_providers", "1")
                options.append(run)
                async_options.append(run_async)
            else:
                options.append(None)
                async_options.append(None)
        return _StepBuffers(batch, capacity, kv, logits, sets, consts, total, tuple(bindings),  # type: ignore[arg-type]
                            tuple(options), tuple(async_options), captured)  # type: ignore[arg-type]

    def _take_buffers(self, batch: int) -> _StepBuffers | None:
        """The captured-graph buffers for ``batch`` rows (made on first use), or None when busy."""
        with self._buffers_lock:
            buffers = self._buffers.get(batch)
            if buffers is None:
                buffers = self._new_buffers(batch, self.max_context, captured=True)
                self._buffers[batch] = buffers
                log.info("CUDA-graph buffers for batch %d: KV capacity %d", batch, self.max_context)
        return buffers if buffers.lock.acquire(blocking=False) else None

    def _allocate(self, rows: list[_Row], max_new_tokens: int) -> DecodeState:
        batch = len(rows)
        capacity = max(len(r.prompt) for r in rows) + max_new_tokens
        buffers = self._take_buffers(batch) if self.cuda_graph else self._new_buffers(batch, capacity, captured=False)
        try:
            sampler_np = sampler_arrays([r.params for r in rows], [r.prompt for r in rows],
                                        [sorted(r.stop_ids) for r in rows], self.vocab, max_new_tokens)
            prompt_lens = np.array([len(r.prompt) for r in rows], dtype=np.int64)
            if buffers is not None:
                kv, logits, capacity, total = buffers.kv, buffers.logits, buffers.capacity, buffers.total
                buffers.current = 0
                # this request's constants, written into the fixed buffers (same addresses)
                for name, source in ((PREFIX + "stop_mask", "stop_mask"), (PREFIX + "min_new_tokens", "min_new_tokens"),
                                     (PREFIX + "repetition_penalty", "repetition_penalty")):
                    buffers.consts[name].update_inplace(np.ascontiguousarray(sampler_np[source]))
                buffers.consts[PREFIX + "prompt_lens"].update_inplace(prompt_lens)
            else:  # CUDA graph buffers busy with another request: the three-session step, uncaptured
                kv = {n: self._zeros(self._kv_shape(batch, capacity), self.kv_dtype) for n in self._past}
                logits = self._zeros([batch, 1, self.vocab], self._logits_dtype)
                total = self._host_scalar(capacity)
            sampler_np["attention_mask"] = np.ones((batch, 1), dtype=np.int64)  # the sampler's next_* outputs are unused
            fused = buffers is not None and self.fuse_greedy and all(r.params.greedy for r in rows)
            fused_prefill = fused and self.fuse_prefill
            if fused_prefill:  # the prefill run starts the fused step: its state in set 0
                buffers.sets[0][PREFIX + "seen"].update_inplace(sampler_np["seen"])  # type: ignore[union-attr]
                buffers.sets[0][PREFIX + "step"].update_inplace(np.array(0, dtype=np.int64))  # type: ignore[union-attr]
                sampler_np = {}  # the sampler session never runs for this batch
            return SharedState(
                rows=rows, max_new_tokens=max_new_tokens, feeds={},
                sampler={k: self._put(v) for k, v in sampler_np.items()},
                decoder_binding=self._session.io_binding(), sampler_binding=self._sampler.io_binding(),
                started=time.perf_counter(), kv=kv, logits=logits,
                prompt_lens=self._put(prompt_lens),
                capacity=capacity, total=total, advance_binding=self._advance.io_binding(), buffers=buffers,
                fused=fused, fused_prefill=fused_prefill,
            )
        except BaseException:
            if buffers is not None and buffers.captured:
                buffers.lock.release()
            raise

    def _events(self, state: DecodeState) -> Iterator[_Event]:
        try:
            yield from super()._events(state)
        finally:
            buffers = getattr(state, "buffers", None)
            if buffers is not None:
                state.buffers = None  # type: ignore[attr-defined]
                if buffers.captured:
                    buffers.lock.release()

    # ----------------------------------------------------------------------------------------
    # Steps

    def _invoke(self, session: ort.InferenceSession, binding: Any, options: ort.RunOptions | None = None) -> None:
        try:
            session.run_with_iobinding(binding, options)
        except _ORT_ERRORS as exc:
            raise GenerationError(
                "generation failed inside onnxruntime", got=str(exc).splitlines()[0][:300],
                fix="this request failed and the engine stays usable; on out-of-memory, use fewer or shorter prompts",
            ) from exc

    def _bind_step_extras(self, binding: Any, state: SharedState, n: int) -> None:
        """Zero inputs for the fused step's extra nodes when the step model runs plainly (a prefill
        that ends with the sampler, or an uncaptured decoder step); their outputs are left to
        onnxruntime and ignored. The zeros are made once per batch and bound ``n`` rows at a time."""
        if not state.extras:
            batch = len(state.rows)
            shapes = self._state_shapes(batch)
            for name, _, _dtype in STATE:
                if name.startswith(PREFIX):
                    state.extras[name] = self._zeros(*shapes[name])
            for name, dtype in CONSTANTS:
                state.extras[name] = self._zeros([batch, self.vocab] if dtype == "bool" else [batch], dtype)
        for name, value in state.extras.items():
            self._bind_rows(binding, name, value, 0, n, output=False)
        for _, out, _dtype in STATE:
            binding.bind_output(out, self.device_type, 0)

    def _bind_rows(self, binding: Any, name: str, value: ort.OrtValue, start: int, n: int, output: bool) -> None:
        """Bind rows ``start:start + n`` of a ``[batch, …]`` buffer (by address: nothing is copied);
        a 0-d tensor (the step count) is bound whole."""
        shape = list(value.shape())
        if not shape or (start == 0 and n == shape[0]):  # the whole tensor: no pointer arithmetic
            (binding.bind_ortvalue_output if output else binding.bind_ortvalue_input)(name, value)
            return
        kind = value.data_type()[len("tensor("):-1]  # "tensor(float)" → "float"
        dtype = np.dtype(np.float32 if kind == "float" else kind)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.device_type, 0, dtype.type, [n, *shape[1:]], value.data_ptr() + start * row)

    def prefill(self, state: DecodeState) -> np.ndarray:
        """Each run of equal-length prompts alone, into its rows of the batch buffers; return the
        first new ids.

        A fused batch's prefill runs the step model with its state bound by rows (set 0 in, set 1
        out): the same run picks the first token and writes the first decode step's inputs, and
        the host reads the ids once. Otherwise each run's last-position logits go into
        ``state.logits`` and the sampler + advance sessions follow (:meth:`_sample`)."""
        assert isinstance(state, SharedState)
        if state.steps != 0:
            raise GenerationError("prefill on a batch that already started", fix="call start() again")
        buffers = state.buffers if state.fused_prefill else None
        lengths = [len(r.prompt) for r in state.rows]
        groups, start = [], 0
        while start < len(lengths):
            end = start
            while end < len(lengths) and lengths[end] == lengths[start]:
                end += 1
            groups.append((start, end - start, lengths[start]))
            start = end
        gather = buffers is None or state.keep_logits
        with self._run_lock:  # the ORT-allocated logits are read before any replay can reuse the memory
            for start, n, length in groups:
                binding = self._prefill_binding(state, buffers, start, n)
                prompts = np.array([r.prompt for r in state.rows[start:start + n]], np.int64)
                binding.bind_ortvalue_input("input_ids", self._put(prompts))
                binding.bind_ortvalue_input("position_ids", self._put(np.tile(np.arange(length, dtype=np.int64), (n, 1))))
                binding.bind_ortvalue_input(SEQLENS_K, self._put(np.full(n, length - 1, dtype=np.int32)))
                binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, self._host_scalar(length))
                try:
                    self._invoke(self._session, binding, self._eager)
                    if gather:
                        last = self._last.io_binding()
                        last.bind_ortvalue_input("logits", binding.get_outputs()[0])
                        self._bind_rows(last, "last", state.logits, start, n, output=True)  # type: ignore[arg-type]
                        self._invoke(self._last, last)
                finally:
                    binding.bind_output("logits", self.device_type, 0)  # drops this run's [n, length, vocab] logits
        if buffers is None:
            return self._sample(state)
        if state.keep_logits:
            state.last_logits = np.array(state.logits.numpy()[:, -1, :], dtype=np.float32)  # type: ignore[union-attr]
        buffers.current = 1
        state.steps = 1
        return np.array(buffers.sets[1][PREFIX + "history"].numpy()[:, 0], dtype=np.int64)  # the one host read

    def _prefill_binding(self, state: SharedState, buffers: _StepBuffers | None, start: int, n: int) -> Any:
        """The prefill binding of rows ``start:start + n`` with everything but the prompt bound:
        KV rows, and the step state (set 0 in, set 1 out) and constants for a fused batch, or zero
        extras otherwise. A captured batch size's buffers keep theirs (the same addresses every
        request), which saves ~130 bind calls a prefill on SmolLM2 (30 layers)."""
        cache = buffers.prefill_bindings if buffers is not None and buffers.captured else None
        if cache is not None and (start, n) in cache:
            return cache[(start, n)]
        binding = self._session.io_binding()
        binding.bind_output("logits", self.device_type, 0)
        for past, present in zip(self._past, self._present):
            self._bind_rows(binding, past, state.kv[past], start, n, output=False)
            self._bind_rows(binding, present, state.kv[past], start, n, output=True)
        if buffers is not None:
            outputs = {inp: out for inp, out, _ in STATE}
            for name, value in buffers.sets[0].items():
                if name.startswith(PREFIX):  # input_ids/position_ids/seqlens_k are the prompt's
                    self._bind_rows(binding, name, value, start, n, output=False)
                self._bind_rows(binding, outputs[name], buffers.sets[1][name], start, n, output=True)
            for name, value in buffers.consts.items():
                self._bind_rows(binding, name, value, start, n, output=False)
        else:
            self._bind_step_extras(binding, state, n)
        if cache is not None:
            if len(cache) >= 64:  # row groups of many different sizes: keep the cache bounded
                cache.clear()
            cache[(start, n)] = binding
        return binding

    def decode_step(self, state: DecodeState) -> np.ndarray:
        """One token for every row of the batch (finished rows included when the batch keeps them)."""
        return self._decode_block(state, 1)[0]

    def _decode_block(self, state: DecodeState, steps: int | None = None) -> list[np.ndarray]:
        """Fused greedy steps, up to ``read_every`` of them before one read of the ids; else one
        three-session step (decoder, sampler, advance)."""
        assert isinstance(state, SharedState)
        if not state.fused:
            self._decoder_run(state)
            return [self._sample(state)]
        buffers = state.buffers
        assert buffers is not None
        if steps is None:
            left = max(r.max_new - len(r.new_ids) for r in state.rows if not r.done)
            steps = 1 if state.keep_logits else max(1, min(self.read_every, left))
        first = state.steps  # tokens generated so far = the step input of the first run
        with self._run_lock:  # the last replay of the block synchronizes
            try:
                for i in range(steps):
                    d = buffers.current
                    options = buffers.options[d] if i == steps - 1 else buffers.async_options[d]
                    self._invoke(self._step_session, buffers.bindings[d], options)
                    buffers.current = 1 - d
                    buffers.replays += 1
            except BaseException:
                # earlier replays ran without a sync: let them finish before the lock is released
                with contextlib.suppress(*_ORT_ERRORS):
                    buffers.bindings[buffers.current].synchronize_outputs()
                raise
        state.steps += steps
        self.fused_steps += steps
        if state.keep_logits:
            state.last_logits = np.array(buffers.logits.numpy()[:, -1, :], dtype=np.float32)
        history = buffers.sets[buffers.current][PREFIX + "history"].numpy()  # the one host read
        return [np.array(history[:, (first + i) % self.read_every], dtype=np.int64) for i in range(steps)]

    def _decoder_run(self, state: SharedState) -> None:
        """The decoder alone, logits into ``state.logits``: direction 0 of the step buffers (the
        fused outputs are ignored; the sampler decides), or the step model run eagerly (no step
        buffers: its extra inputs zeros)."""
        buffers = state.buffers
        if buffers is not None:
            with self._run_lock:
                self._invoke(self._step_session, buffers.bindings[0], buffers.options[0])
            buffers.replays += 1
            return
        binding = state.decoder_binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in state.feeds.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, state.total)
        binding.bind_ortvalue_output("logits", state.logits)
        for past, present in zip(self._past, self._present):
            binding.bind_ortvalue_input(past, state.kv[past])
            binding.bind_ortvalue_output(present, state.kv[past])
        self._bind_step_extras(binding, state, len(state.rows))
        with self._run_lock:
            self._invoke(self._session, binding, self._eager)

    def _sample(self, state: SharedState) -> np.ndarray:
        """Sampler, then the advance graph into the next decoder inputs; the host reads the ids.

        With step buffers the next inputs go into set 0 (``buffers.current`` is 0 whenever this
        runs: after prefill, and on the three-session path, which only uses direction 0). After an
        unfused prefill of a fused batch (``fuse_prefill`` off, for measurements) the sampler's
        ``seen_out``/``step_out`` go there too, as the first fused step's state."""
        if state.keep_logits:
            state.last_logits = np.array(state.logits.numpy()[:, -1, :], dtype=np.float32)  # type: ignore[union-attr]
        buffers = state.buffers
        sampler_in = dict(state.sampler)
        sampler_in["logits"] = state.logits  # type: ignore[assignment]
        sampler_in.pop("prompt_lens", None)
        binding = state.sampler_binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in sampler_in.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("next_ids", self.device_type, 0)
        if state.fused and buffers is not None:
            binding.bind_ortvalue_output("seen_out", buffers.sets[0][PREFIX + "seen"])
            binding.bind_ortvalue_output("step_out", buffers.sets[0][PREFIX + "step"])
        else:
            binding.bind_output("seen_out", self.device_type, 0)
            binding.bind_output("step_out", self.device_type, 0)
        self._invoke(self._sampler, binding)
        next_ids, seen_out, step_out = binding.get_outputs()
        state.sampler["seen"] = seen_out
        state.sampler["step"] = step_out
        advance = state.advance_binding
        advance.clear_binding_inputs()
        advance.clear_binding_outputs()
        advance.bind_ortvalue_input("next_ids", next_ids)
        advance.bind_ortvalue_input("prompt_lens", state.prompt_lens)
        advance.bind_ortvalue_input("step", step_out)
        names = ("input_ids", "position_ids", SEQLENS_K)
        for name in names:
            if buffers is not None:
                advance.bind_ortvalue_output(name, buffers.sets[0][name])
            else:
                advance.bind_output(name, self.device_type, 0)
        self._invoke(self._advance, advance)
        state.feeds = dict(buffers.sets[0]) if buffers is not None else dict(zip(names, advance.get_outputs()))
        state.steps += 1
        return np.array(next_ids.numpy(), dtype=np.int64).reshape(-1)  # the one host read

    def _drop_rows(self, state: DecodeState, keep: list[int]) -> None:
        """Compact a batch on the plain path on the device (one gather run); a batch on step
        buffers keeps its rows (the fused step's buffers have fixed shapes)."""
        assert isinstance(state, SharedState)
        if state.buffers is not None:
            return
        inputs = {COMPACT_INDEX: self._put(np.asarray(keep, dtype=np.int64))}
        for name in self._compact_names:
            if name in state.feeds:
                inputs[name] = state.feeds[name]
            elif name in state.kv:
                inputs[name] = state.kv[name]
            elif name == "prompt_lens":
                inputs[name] = state.prompt_lens  # type: ignore[assignment]
            else:
                inputs[name] = state.sampler[name]
        out = self._run(self._compact, self._compact.io_binding(), inputs, [f"{n}__kept" for n in self._compact_names])
        for name in self._compact_names:
            value = out[f"{name}__kept"]
            if name in state.feeds:
                state.feeds[name] = value
            elif name in state.kv:
                state.kv[name] = value
            elif name == "prompt_lens":
                state.prompt_lens = value
            else:
                state.sampler[name] = value
        state.rows = [state.rows[i] for i in keep]
        state.logits = self._zeros([len(keep), 1, self.vocab], self._logits_dtype)
        k_cap = max(r.params.candidates(self.vocab) for r in state.rows)
        state.sampler["k_cap"] = self._put(np.array([k_cap], dtype=np.int64))

    def graph_replays(self) -> dict[int, int]:
        """Captured decode steps run so far, per batch size (for benchmarks and tests)."""
        return {b: s.replays for b, s in self._buffers.items()}
