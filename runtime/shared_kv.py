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
  is copied. A row's last-position logits go into a ``[batch, 1, vocab]`` buffer (a one-node
  ``Gather`` graph, bound the same way), then the sampler runs once for the batch.
  Decode steps feed all rows at once: ``position_ids = seqlens_k = prompt_len + generated − 1``
  per row, and a constant ``total_sequence_length`` (the buffer capacity: GQA's decode case needs
  ``seq = 1 ≠ total``, and the CUDA kernel reads this scalar on the host, so under a CUDA graph
  it must not change; onnxruntime-genai does the same, its ``Shape(attention_mask)[1]`` of a
  max-length mask). It is bound as a CPU tensor on every device.
  A batched prefill of unequal right-padded rows would save launches, but needs per-row logit
  positions and relies on the CUDA kernel honouring ``seqlens_k`` for padded first prompts;
  one run per equal-length group is correct on every kernel.
* **Next inputs on the device.** After the sampler, a tiny "advance" graph turns ``next_ids``,
  the per-row ``prompt_lens`` (uploaded once) and the sampler's ``step`` into the next
  ``input_ids [batch, 1]``, ``position_ids [batch, 1]`` and ``seqlens_k [batch]`` int32 — a pure
  function, so its outputs can be written into fixed buffers. The host reads only the ``[batch]``
  ids per step.
* **CUDA graph** (``Engine.load(..., cuda_graph=True)``, CUDA only): a second decoder session
  with ``enable_cuda_graph=1`` runs the decode steps (one captured graph per batch size,
  ``gpu_graph_id = batch``); prefill uses the ordinary session (variable shapes). Per batch size a
  :class:`_GraphSlot` holds every tensor the captured step reads or writes at fixed addresses —
  ``input_ids``, ``position_ids``, ``seqlens_k``, ``total_sequence_length`` (CPU), the KV buffers
  at full ``max_context`` and ``logits [batch, 1, vocab]`` — with the decoder's IO binding made
  once; the advance graph writes the next inputs into those buffers, so a step is one
  ``run_with_iobinding`` replay. The sampler stays an ordinary (uncaptured) session. The two
  decoder sessions each hold the weights (2× weight memory on the device); a slot busy with
  another request makes the second request run uncaptured with its own buffers (thread-safe).
  Finished rows are *kept* in a captured batch (a smaller batch would need another capture and
  a KV gather), and compacted otherwise (``compact_finished_rows``), as the concat engine does.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort

from runtime._onnx_proto import GraphBuilder
from runtime.artifact import Artifact, KvMode
from runtime.chat import load_chat_template, special_tokens
from runtime.compact_graph import COMPACT_INDEX, build_compact_model
from runtime.engine import (
    _NP_DTYPES, _ORT_ERRORS, _ROW_STATE, DecodeState, Engine, _Event, _providers, _Row, read_decoder_manifest,
)
from runtime.errors import GenerationError
from runtime.sampler_graph import build_sampler_model
from runtime.sampling import sampler_arrays

__all__ = ["SharedBufferEngine", "SharedState", "build_advance_model", "build_last_logits_model"]

log = logging.getLogger(__name__)

SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
_STEP_OUTPUTS = ("next_ids", "seen_out", "step_out")


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
class _GraphSlot:
    """Fixed-address tensors and the decoder binding of one captured batch size."""

    batch: int
    capacity: int
    kv: dict[str, ort.OrtValue]
    logits: ort.OrtValue
    feeds: dict[str, ort.OrtValue]  # input_ids, position_ids, seqlens_k (device)
    total: ort.OrtValue  # CPU scalar int32 = capacity
    binding: Any
    run_options: ort.RunOptions
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    replays: int = 0


@dataclasses.dataclass
class SharedState(DecodeState):
    """A batch in flight on a shared-buffer artifact."""

    kv: dict[str, ort.OrtValue] = dataclasses.field(default_factory=dict)  # by past name; also the presents
    logits: ort.OrtValue | None = None  # [batch, 1, vocab] last-position logits
    prompt_lens: ort.OrtValue | None = None
    capacity: int = 0
    total: ort.OrtValue | None = None  # CPU int32 scalar for decode steps
    advance_binding: Any = None
    slot: _GraphSlot | None = None


class SharedBufferEngine(Engine):
    """:class:`Engine` for ``kv_mode: "shared-buffer"`` artifacts; see the module docstring."""

    def __init__(self, artifact: Artifact, device: str = "cpu", cuda_graph: bool = False) -> None:
        # Engine.__init__ validates the concat contract; the generic attributes are set here.
        if artifact.kv_mode is not KvMode.SHARED_BUFFER:
            raise GenerationError(f"artifact {artifact.path} has kv_mode {artifact.kv_mode.value}",
                                  expected="shared-buffer", fix="load it with Engine.load")
        providers, self.device_type = _providers(device)
        if cuda_graph and self.device_type != "cuda":
            raise GenerationError("cuda_graph=True needs device='cuda'", got=f"device={device!r}",
                                  fix="pass device='cuda', or leave cuda_graph off")
        if self.device_type == "cuda" and artifact.precision == "fp32":
            providers[0][1]["use_tf32"] = "0"  # as Engine: fp32 artifacts promise fp32 numerics
        self.device = device
        self.artifact = artifact
        self.cuda_graph = bool(cuda_graph)
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

        self._session = self._open(str(artifact.model_path), providers)
        graph_inputs = {i.name for i in self._session.get_inputs()}
        if graph_inputs != set(self._inputs):
            raise GenerationError(
                f"artifact {artifact.path}: the manifest's io.inputs and model.onnx disagree",
                expected=str(sorted(self._inputs)), got=str(sorted(graph_inputs)), fix="re-run `lmforge optimize`",
            )
        self._graph_session: ort.InferenceSession | None = None
        if self.cuda_graph:
            graph_providers = [("CUDAExecutionProvider", {**providers[0][1], "enable_cuda_graph": "1"}),
                               "CPUExecutionProvider"]
            self._graph_session = self._open(str(artifact.model_path), graph_providers)
        self._slots: dict[int, _GraphSlot] = {}
        self._slots_lock = threading.Lock()

        self._sampler = self._open(build_sampler_model(self._logits_dtype), providers, small=True)
        self._advance = self._open(build_advance_model(), providers, small=True)
        self._last = self._open(build_last_logits_model(self._logits_dtype), providers, small=True)
        row_tensors = [("input_ids", "int64", 2, 0), ("position_ids", "int64", 2, 0), (SEQLENS_K, "int32", 1, 0),
                       ("prompt_lens", "int64", 1, 0), ("attention_mask", "int64", 2, 0)]
        row_tensors += [(n, self.kv_dtype, 4, 0) for n in self._past]
        row_tensors += [(n, self._sampler_dtype(n), 2 if n in ("stop_mask", "seen") else 1, 0) for n in _ROW_STATE]
        row_tensors.append(("uniforms", "float32", 2, 1))
        self._compact_names = [t[0] for t in row_tensors]
        self._compact = self._open(build_compact_model(row_tensors), providers, small=True)

        self.tokenizer = self._load_tokenizer(artifact.tokenizer_dir)
        self.chat_template = load_chat_template(artifact.tokenizer_dir)
        self._special_tokens = special_tokens(artifact.tokenizer_dir)
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

    def _take_slot(self, batch: int) -> _GraphSlot | None:
        """The captured-graph buffers for ``batch`` rows (made on first use), or None when busy."""
        assert self._graph_session is not None
        with self._slots_lock:
            slot = self._slots.get(batch)
            if slot is None:
                capacity = self.max_context
                kv = {n: self._zeros(self._kv_shape(batch, capacity), self.kv_dtype) for n in self._past}
                feeds = {"input_ids": self._zeros([batch, 1], "int64"), "position_ids": self._zeros([batch, 1], "int64"),
                         SEQLENS_K: self._zeros([batch], "int32")}
                logits = self._zeros([batch, 1, self.vocab], self._logits_dtype)
                total = self._host_scalar(capacity)
                binding = self._graph_session.io_binding()
                for name, value in feeds.items():
                    binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, total)
                binding.bind_ortvalue_output("logits", logits)
                for past, present in zip(self._past, self._present):
                    binding.bind_ortvalue_input(past, kv[past])
                    binding.bind_ortvalue_output(present, kv[past])
                options = ort.RunOptions()
                options.add_run_config_entry("gpu_graph_id", str(batch))
                slot = _GraphSlot(batch, capacity, kv, logits, feeds, total, binding, options)
                self._slots[batch] = slot
                log.info("CUDA-graph slot for batch %d: KV capacity %d", batch, capacity)
        return slot if slot.lock.acquire(blocking=False) else None

    def _allocate(self, rows: list[_Row], max_new_tokens: int) -> DecodeState:
        batch = len(rows)
        slot = self._take_slot(batch) if self._graph_session is not None else None
        try:
            if slot is not None:
                kv, logits, capacity = slot.kv, slot.logits, slot.capacity
            else:
                capacity = max(len(r.prompt) for r in rows) + max_new_tokens
                kv = {n: self._zeros(self._kv_shape(batch, capacity), self.kv_dtype) for n in self._past}
                logits = self._zeros([batch, 1, self.vocab], self._logits_dtype)
            sampler = sampler_arrays([r.params for r in rows], [r.prompt for r in rows],
                                     [sorted(r.stop_ids) for r in rows], self.vocab, max_new_tokens)
            sampler["attention_mask"] = np.ones((batch, 1), dtype=np.int64)  # the sampler's next_* outputs are unused
            return SharedState(
                rows=rows, max_new_tokens=max_new_tokens, feeds={},
                sampler={k: self._put(v) for k, v in sampler.items()},
                decoder_binding=self._session.io_binding(), sampler_binding=self._sampler.io_binding(),
                started=time.perf_counter(), kv=kv, logits=logits,
                prompt_lens=self._put(np.array([len(r.prompt) for r in rows], dtype=np.int64)),
                capacity=capacity, total=slot.total if slot else self._host_scalar(capacity),
                advance_binding=self._advance.io_binding(), slot=slot,
            )
        except BaseException:
            if slot is not None:
                slot.lock.release()
            raise

    def _events(self, state: DecodeState) -> Iterator[_Event]:
        try:
            yield from super()._events(state)
        finally:
            slot = getattr(state, "slot", None)
            if slot is not None:
                state.slot = None  # type: ignore[attr-defined]
                slot.lock.release()

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

    def prefill(self, state: DecodeState) -> np.ndarray:
        """Each run of equal-length prompts alone, into its rows of the batch buffers; then sample."""
        assert isinstance(state, SharedState)
        if state.steps != 0:
            raise GenerationError("prefill on a batch that already started", fix="call start() again")
        np_kv = _NP_DTYPES[self.kv_dtype]
        row_bytes = self._kv_heads * state.capacity * self._head_dim * np.dtype(np_kv).itemsize
        np_logits = _NP_DTYPES[self._logits_dtype]
        logit_row = self.vocab * np.dtype(np_logits).itemsize
        lengths = [len(r.prompt) for r in state.rows]
        start = 0
        while start < len(lengths):
            end = start
            while end < len(lengths) and lengths[end] == lengths[start]:
                end += 1
            n, length = end - start, lengths[start]
            binding = self._session.io_binding()
            binding.bind_ortvalue_input("input_ids", self._put(np.array([r.prompt for r in state.rows[start:end]], np.int64)))
            binding.bind_ortvalue_input("position_ids", self._put(np.tile(np.arange(length, dtype=np.int64), (n, 1))))
            binding.bind_ortvalue_input(SEQLENS_K, self._put(np.full(n, length - 1, dtype=np.int32)))
            binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, self._host_scalar(length))
            binding.bind_output("logits", self.device_type, 0)
            shape = self._kv_shape(n, state.capacity)
            for past, present in zip(self._past, self._present):
                ptr = state.kv[past].data_ptr() + start * row_bytes
                binding.bind_input(past, self.device_type, 0, np_kv, shape, ptr)
                binding.bind_output(present, self.device_type, 0, np_kv, shape, ptr)
            self._invoke(self._session, binding)
            full = binding.get_outputs()[0]
            last = self._last.io_binding()
            last.bind_ortvalue_input("logits", full)
            last.bind_output("last", self.device_type, 0, np_logits, [n, 1, self.vocab],
                             state.logits.data_ptr() + start * logit_row)  # type: ignore[union-attr]
            self._invoke(self._last, last)
            start = end
        return self._sample(state)

    def decode_step(self, state: DecodeState) -> np.ndarray:
        """One token for every row of the batch (finished rows included when the batch is captured)."""
        assert isinstance(state, SharedState)
        if state.slot is not None:
            self._invoke(self._graph_session, state.slot.binding, state.slot.run_options)  # type: ignore[arg-type]
            state.slot.replays += 1
        else:
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
            self._invoke(self._session, binding)
        return self._sample(state)

    def _sample(self, state: SharedState) -> np.ndarray:
        """Sampler, then the advance graph (into the slot's fixed buffers when captured); host ids."""
        if state.keep_logits:
            state.last_logits = np.array(state.logits.numpy()[:, -1, :], dtype=np.float32)  # type: ignore[union-attr]
        sampler_in = dict(state.sampler)
        sampler_in["logits"] = state.logits  # type: ignore[assignment]
        sampler_in.pop("prompt_lens", None)
        nxt = self._run(self._sampler, state.sampler_binding, sampler_in, _STEP_OUTPUTS)
        state.sampler["seen"] = nxt["seen_out"]
        state.sampler["step"] = nxt["step_out"]
        binding = state.advance_binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_ortvalue_input("next_ids", nxt["next_ids"])
        binding.bind_ortvalue_input("prompt_lens", state.prompt_lens)
        binding.bind_ortvalue_input("step", nxt["step_out"])
        names = ("input_ids", "position_ids", SEQLENS_K)
        for name in names:
            if state.slot is not None:
                binding.bind_ortvalue_output(name, state.slot.feeds[name])
            else:
                binding.bind_output(name, self.device_type, 0)
        self._invoke(self._advance, binding)
        state.feeds = state.slot.feeds if state.slot is not None else dict(zip(names, binding.get_outputs()))
        state.steps += 1
        return np.array(nxt["next_ids"].numpy(), dtype=np.int64).reshape(-1)  # the one host read

    def _drop_rows(self, state: DecodeState, keep: list[int]) -> None:
        """Compact an uncaptured batch on the device (one gather run); a captured batch keeps its rows."""
        assert isinstance(state, SharedState)
        if state.slot is not None:
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
        return {b: s.replays for b, s in self._slots.items()}
