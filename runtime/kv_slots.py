"""The ``slots`` KV backend: a pool of fixed per-request rows for ``kv_mode: "shared-buffer"``.

Memory is allocated once, at load: for every layer one ``[max_batch, kv_heads, capacity,
head_dim]`` buffer that is bound as both the past input and the present output of
GroupQueryAttention, which writes each new K/V in place; and, row for row, the step model's
state (:data:`runtime.step_graph.STATE`, two sets that alternate as inputs and outputs) and the
requests' sampling constants. A request owns one row (its *slot*) from admission to release.

* **Prefill** runs the step model over the new requests' slots, eagerly, with the prompts as
  ``input_ids`` and every other tensor bound to those slots' rows by address: GroupQueryAttention
  fills their KV rows, the sampling nodes pick each first token (at the row's own last token,
  ``seqlens_k``), and the next step's inputs land in the slots' rows of the current state set.
  Requests in consecutive slots prefill together, right-padded to one length (GQA's first-prompt
  path takes a batch; the engine hands out slots in prompt-length order, so neighbours are of
  similar length). onnxruntime's GQA refuses a batch > 1 with seq > 1 when past is non-empty,
  so a prompt longer than ``prefill_chunk`` runs alone, in chunks (batch 1 with past is allowed).
  On CUDA a one-row prefill of a new request (no logits asked, its start state all zeros, a
  length bucket up to :data:`GRAPH_WIDTH`) is a CUDA graph too, per (slot, length bucket, state
  set, plan) seen before, at most :data:`PREFILL_GRAPHS` of them: its prompt goes into device buffers at fixed
  addresses and the graph replays, so its hundreds of kernels are not launched one by one from
  the host (an eager prefill of a 16-layer model is bound by those launches at batch 1). An idle
  engine (no other row held) prefills into the first state set, so its requests meet one graph
  per (slot, bucket, plan), and ``Engine.warm_up`` captures those of slot 0 for every bucket.
* **Decode** runs the step model over rows ``0:n`` (``n`` covers the highest occupied slot; slots
  are handed out lowest first). Free rows inside ``n`` compute harmless junk in their own rows
  (the step clamps positions below ``capacity``). Each step reads set ``d`` and writes set
  ``1 − d``; on CUDA each ``(n, d)`` is one captured graph (``n`` rounded up to a bucket: 1, 2,
  4, … ``max_batch``), replayed without a host sync until the last step of a block, after which
  the host reads the ``[n, window]`` id history once. The engine may launch the next block's
  first step before it handles the ids just read (:meth:`SlotsBackend.launch_next`), so the GPU
  is not idle while the host works.
* Per-request sampling parameters, seeds and lengths live in buffers the step reads, never in
  shapes, so one capture per bucket serves every mix of requests.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.artifact import Artifact, KvMode
from runtime.decoder_io import SEQLENS_K, TOTAL_SEQUENCE_LENGTH, DecoderIO
from runtime.device import NP_DTYPES, Device
from runtime.errors import GenerationError
from runtime.kv_backend import BackendOptions, Started, register_backend
from runtime.sampler_graph import ROW_INPUTS, STEP_HOST_INPUTS
from runtime.sampling import Plan, checked_row, is_neutral
from runtime.step_graph import CONSTANTS, FORMAT, PREFIX, STATE, step_io

__all__ = ["SlotsBackend", "padded_length", "prefill_groups"]

log = logging.getLogger(__name__)

_PREFILL_BINDINGS = 256  # cached prefill bindings (rows × first slot × state set), least recently used out
CAPTURE_PREFILL = True  # one-row prefills as CUDA graphs (see the module docstring); False: always eager
PREFILL_GRAPHS = 32  # captured prefills kept, first come: onnxruntime cannot release a captured graph
GRAPH_WIDTH = 256  # the longest prefill captured: its logits land in one [1, GRAPH_WIDTH, vocab] scratch
_SIGHTINGS = 4096  # keys remembered as seen once (forgotten all at once past this)
_PREFILL_GRAPH_IDS = 1 << 20  # onnxruntime graph ids of captured prefills start here (decode steps' are small)


def padded_length(n: int) -> int:
    """The prefill length bucket for an ``n``-token prompt on CUDA: 16, 32, 64, then powers of two
    and their halves (96, 128, 192, 256, 384, …), so padding adds at most a third.

    The attention kernels plan per shape, and a prompt length seen for the first time prefills
    several times slower than a repeated one (docs/benchmarks.md, "GPU: the engine under
    concurrent load").
    """
    size = 16
    while size < n:
        if size < 64:
            size *= 2
        elif size & (size - 1) == 0:  # a power of two: its one and a half next
            size = size * 3 // 2
        else:  # 1.5 × a power of two: the next power
            size = size * 4 // 3
    return size


def prefill_groups(items: list[tuple[int, int]], budget: int, padded: Callable[[int], int],
                   powers_of_two: bool = False) -> list[list[int]]:
    """Which slots prefill together: ``items`` are ``(slot, prompt length)``; a group is a run of
    consecutive slots whose padded batch (rows × ``padded(longest)``) stays within ``budget``
    tokens. A prompt longer than ``budget`` is a group of its own (it runs in chunks). With
    ``powers_of_two`` a group of 7 rows runs as 4 + 2 + 1 (fewer shapes for the kernels to plan).
    """
    groups: list[list[tuple[int, int]]] = []
    for slot, length in sorted(items):
        run = groups[-1] if groups else []
        longest = max([length, *(n for _, n in run)])
        if (run and slot == run[-1][0] + 1 and length <= budget and run[-1][1] <= budget
                and (len(run) + 1) * padded(longest) <= budget):
            run.append((slot, length))
        else:
            groups.append([(slot, length)])
    slots = [[slot for slot, _ in group] for group in groups]
    if not powers_of_two:
        return slots
    split = []
    for group in slots:
        while group:
            size = 1 << (len(group).bit_length() - 1)
            split.append(group[:size])
            group = group[size:]
    return split


@dataclasses.dataclass
class _Step:
    binding: Any
    run: ort.RunOptions | None
    run_async: ort.RunOptions | None


@dataclasses.dataclass
class _GraphInputs:
    """A captured prefill's host inputs, at fixed device addresses, per length bucket ``width``."""

    ids: ort.OrtValue  # [1, width] int64: the prompt, right-padded with zeros
    positions: ort.OrtValue  # [1, width] int64: 0 … width − 1, written once
    last: ort.OrtValue  # [1] int32: seqlens_k, the prompt's last position
    total: ort.OrtValue  # the int32 host scalar total_sequence_length (= width)
    host_ids: np.ndarray
    host_last: np.ndarray


@register_backend(KvMode.SHARED_BUFFER)
class SlotsBackend:
    """Fixed per-request KV rows updated in place; see the module docstring."""

    kind = "slots"
    preallocates = True  # max_batch rows × capacity positions, allocated at load
    captures = True  # one CUDA graph per (bucket, state set)
    can_launch_ahead = True  # launch_next(): the next block's first step while the host reads this one

    def __init__(self, artifact: Artifact, device: Device, io: DecoderIO, options: BackendOptions) -> None:
        self.device = device
        self.io = io
        self.max_batch = max_batch = options.max_batch
        read_every, cuda_graph, prefill_chunk = options.read_every, options.cuda_graph, options.prefill_chunk
        step = artifact.manifest.get("step")
        window = io.step_window
        if io.step_format != FORMAT or window is None:
            got = "no step model" if not isinstance(step, dict) else f"step model {step!r}"
            raise GenerationError(
                f"artifact {artifact.path}: its graph carries {got}; this lmforge serves format {FORMAT}",
                fix="re-run `lmforge optimize` on the converted artifact (it writes the step model into model.onnx)",
            )
        self.window = window
        self.max_block = window  # decode steps per call: the id history holds that many
        if read_every > self.window:
            raise GenerationError(
                f"read_every={read_every} exceeds the step model's id history of {self.window} steps",
                fix=f"pass read_every ≤ {self.window}",
            )
        self.cuda_graph = cuda_graph
        self.prefill_chunk = max(1, prefill_chunk)
        self.vocab = io.vocab
        self.capacity = options.capacity
        self._past, self._present = list(io.past), list(io.present)
        inputs = set(io.inputs)
        own = {t["name"] for t in step_io(self.vocab, self.window)["inputs"]}
        expected = {"input_ids", "position_ids", SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *self._past} | own
        if inputs != expected:
            raise GenerationError(
                f"artifact {artifact.path}: io.inputs does not follow the shared-buffer contract",
                expected="input_ids, position_ids, seqlens_k, total_sequence_length, "
                + ", ".join(self._past[:2])
                + ", …",
                got=str(sorted(inputs)),
                fix="re-run `lmforge optimize`",
            )
        if device.type == "cuda" and io.kv_dtype == "float32":
            raise GenerationError(
                f"artifact {artifact.path}: an fp32 shared-buffer artifact cannot run on CUDA",
                got="GroupQueryAttention has no fp32 CUDA kernel (its fallback gives wrong logits)",
                fix="optimize with --device cuda --precision fp16 (or int8/int4), or run this one on the CPU",
            )
        self.session = device.session(device.step_model(artifact.model_path.read_bytes(), self.vocab, self.window),
                                      cuda_graph=cuda_graph,
                                      weights_dir=artifact.model_path.parent)
        self._eager: ort.RunOptions | None = None
        if cuda_graph:
            self._eager = ort.RunOptions()
            self._eager.add_run_config_entry("gpu_graph_id", "-1")  # onnxruntime's "do not capture"

        b, v = max_batch, self.vocab
        kv_shape = [b, io.kv_heads, self.capacity, io.head_dim]
        self.kv = {name: device.sparse_zeros(kv_shape, io.kv_dtype) for name in self._past}
        self._logits_dtype = io.logits_dtype
        self.logits = device.zeros([b, 1, v], self._logits_dtype)
        shapes = self._row_shapes()
        self.sets = tuple({name: device.zeros([b, *shapes[name]], dtype) for name, _, dtype in STATE} for _ in range(2))
        # The requests' sampling constants: only the host writes them, so a host copy of every
        # buffer is kept and a prefill's new rows reach the device through Device.write_rows: the
        # changed rows alone (on CUDA through the CUDA runtime, runtime.device.CUDA_ROW_COPY; without
        # it each changed buffer whole: a stop mask or the uniforms of a 64-row pool are megabytes). Not a
        # small onnxruntime session copying rows into the buffers by address: on CUDA, one run of
        # such a session made every later replay of the decoder's captured step slower
        # (docs/benchmarks.md, "GPU: batch-1 greedy decode, and why the step is one CUDA graph").
        self._consts_host = {name: np.zeros([b, *shapes[name]], NP_DTYPES[dtype]) for name, dtype in CONSTANTS}
        # (own memory on the CPU too: a CPU OrtValue made from an array would share it)
        self.consts = {name: device.put(value.copy()) for name, value in self._consts_host.items()}
        self._changed: dict[str, set[int]] = {}  # constant → rows whose host copy changed since the last copy
        # per constant and slot: whether the row holds runtime.sampling.neutral_row's values, as the
        # buffers start (all zeros; only wide rows are ever shared, the others are compared)
        self._neutral_at = {name: [True] * b for name, _ in CONSTANTS}
        # what one request's row arrays must be (runtime.sampling.checked_row): the constants
        # and the state a prefill starts from
        self._row_layout = {name[len(PREFIX):]: (NP_DTYPES[dtype], tuple(shapes[name])) for name, dtype in CONSTANTS
                            if name != PREFIX + "last_position"}
        self._row_layout.update({name[len(PREFIX):]: (NP_DTYPES[dtype], tuple(shapes[name])) for name, _, dtype in STATE
                                 if name.startswith(PREFIX) and name != PREFIX + "history"})
        self.total = device.host_scalar(self.capacity)
        self.current = 0  # the state set holding the next decode step's inputs
        self._free = list(range(max_batch))
        self._steps: dict[tuple[int, int, Plan], _Step] = {}
        self._ahead: frozenset[int] | None = None  # the slots of a step launched ahead of its block
        self._host: dict[int, ort.OrtValue] = {}  # value → a host tensor at a fixed address
        # A prefill's bindings of what lives at fixed addresses (KV rows, state outputs, constants)
        # per (first slot, rows, state set): made once, then only the prompt and the start state
        # are bound per run: binding some 60 tensors by address is host time every prefill would
        # otherwise pay before its first token (docs/serving.md, "Time to first token").
        self._prefill_bindings: collections.OrderedDict[tuple[int, int, int], Any] = collections.OrderedDict()
        self._staged: dict[int, dict[str, np.ndarray]] = {}  # slot → the rows stage() returned, not yet uploaded
        # the state a prefill starts from: zeros for a new request (counts, step, history, and the
        # prompt mask without a repetition penalty), bound by address from device buffers that
        # stay zero; a prompt mask goes through host tensors per (name, m) that each such
        # prefill overwrites (onnxruntime copies them to the device when they are bound)
        self._zero_start = {name: device.zeros([b, *shapes[name]], dtype) for name, _, dtype in STATE
                            if name.startswith(PREFIX)}
        self._start: dict[tuple[str, int], ort.OrtValue] = {}
        # captured one-row prefills: (slot, length bucket, state set, plan) → its binding and run options
        self.graph_prefill = cuda_graph and CAPTURE_PREFILL
        self._prefill_graphs: dict[tuple[int, int, int, Plan], _Step] = {}
        self._graph_inputs: dict[int, _GraphInputs] = {}
        self._prefill_sightings: dict[tuple[int, int, int, Plan], int] = {}  # keys seen once, without a graph
        self._graph_logits: ort.OrtValue | None = None
        self.replays = 0
        self.prefill_runs = 0
        self.graph_prefills = 0  # prefills run through a prefill graph (its first, uncaptured run included)
        self.prefill_seen: set[tuple[int, int]] = set()  # (rows, length) of the one-run prefills so far
        mib = sum(int(np.prod(kv_shape)) for _ in self._past) * np.dtype(io.kv_dtype).itemsize / 2**20
        log.info("slots backend: %d rows × %d positions, KV %.0f MiB%s", b, self.capacity, mib,
                 ", CUDA graphs" if cuda_graph else "")

    def _row_shapes(self) -> dict[str, list[int]]:
        """One row's shape of every per-row tensor of the step model (sampling rows: :data:`ROW_INPUTS`)."""
        shapes: dict[str, list[int]] = {"input_ids": [1], "position_ids": [1], SEQLENS_K: [],
                                        PREFIX + "history": [self.window], PREFIX + "last_position": []}
        shapes.update({PREFIX + r.name: [int(d) for d in r.dims(self.vocab, self.capacity)] for r in ROW_INPUTS})
        return shapes

    # -- slots ----------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        self._free.sort()
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        if slot not in self._free:
            self._free.append(slot)
        if self._ahead is not None:  # a step launched ahead produced nothing for the slot's next request
            self._ahead -= {slot}

    def reset(self) -> None:
        """Every slot free (after a failed step failed all of its requests; rows are independent)."""
        self._free = list(range(self.max_batch))
        self._ahead = None
        self._staged.clear()

    # -- prefill --------------------------------------------------------------------------------

    def _bind_host(self, binding: Any, plan: Plan) -> None:
        """Bind the host inputs (:func:`runtime.sampling.host_values`) from tensors at fixed addresses."""
        for name, value in zip(STEP_HOST_INPUTS, plan, strict=True):
            if value not in self._host:
                self._host[value] = ort.OrtValue.ortvalue_from_numpy(np.array([value], np.int64))
            binding.bind_ortvalue_input(PREFIX + name, self._host[value])

    def prefill_many(self, admitted: list[tuple[int, list[int], dict[str, np.ndarray]]], want_logits: bool,
                     plan: Plan, started: Started) -> None:
        """Prefill ``(slot, prompt, row arrays)`` into their slots (the engine stages each row
        first, :meth:`stage`, so that a row that does not fit fails alone); after each run, hand
        ``started`` its slots' first tokens (and logits when asked), so that the first requests of
        a large admission need not wait for the last one's prefill.

        Requests in consecutive slots run together, right-padded to one length, in groups of at
        most ``prefill_chunk`` padded tokens (on CUDA: padded lengths from :func:`padded_length`
        and power-of-two group sizes, so the attention kernels meet few distinct shapes). A
        prompt longer than ``prefill_chunk`` runs alone, in chunks.
        """
        by_slot = {slot: (slot, prompt, rows) for slot, prompt, rows in admitted}
        if self.graph_prefill and len(self._free) + len(admitted) == self.max_batch:
            # no other request holds a row, so either state set can take the new ones: always the
            # first, so that an idle engine's prefills meet one graph per (slot, bucket, plan), not two
            self.current = 0
        self._write_constants([(slot, rows) for slot, _, rows in admitted])
        groups = prefill_groups([(slot, len(prompt)) for slot, prompt, _ in admitted], self.prefill_chunk,
                                self.padded, powers_of_two=self.device.type == "cuda")
        for group in groups:
            firsts = self._prefill_group([by_slot[slot] for slot in group], want_logits, plan)
            self.prefill_runs += 1
            started(firsts)

    def padded(self, length: int) -> int:
        """The length a prefill of ``length`` tokens runs at (CUDA: a :func:`padded_length` bucket)."""
        return min(padded_length(length), self.capacity) if self.device.type == "cuda" else length

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """The ``(rows, padded length)`` prefill runs worth planning before traffic arrives (CUDA:
        every length bucket and power-of-two group within ``prefill_chunk``; none on the CPU)."""
        if self.device.type != "cuda":
            return []
        shapes, length = [], 1
        while (length := padded_length(length)) <= min(self.prefill_chunk, self.capacity - 1):
            rows = 1
            while rows <= self.max_batch and rows * length <= self.prefill_chunk:
                shapes.append((rows, length))
                rows *= 2
            length += 1
        return shapes

    def stage(self, slot: int, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One admitted request's row arrays (:func:`runtime.sampling.row_arrays`), checked and
        cast (:func:`runtime.sampling.checked_row`), its sampling constants written into the
        slot's row of the host copies; they reach the device with the next prefill
        (:meth:`prefill_many`). A row that does not fit raises for this request alone, before
        anything of it is written. Only the buffers in which the row changed are copied then (a
        stop mask, ``[max_batch, vocab]``, is the largest and rarely differs from the row's
        previous request's)."""
        rows = checked_row(arrays, self._row_layout)
        for name, host in self._consts_host.items():
            short = name[len(PREFIX):]
            if short == "last_position":
                value = np.array(self.capacity - 1)
            else:
                neutral = is_neutral(rows[short])
                if neutral and self._neutral_at[name][slot]:
                    continue  # the slot's row holds the shared neutral row already: nothing to compare
                self._neutral_at[name][slot] = neutral
                value = rows[short][0]
            if not np.array_equal(host[slot], value):
                host[slot] = value
                self._changed.setdefault(name, set()).add(slot)
        self._staged[slot] = rows
        return rows

    def _write_constants(self, rows: Iterable[tuple[int, Mapping[str, np.ndarray]]] = ()) -> None:
        """``rows`` staged (:meth:`stage`; a row the engine staged already changes nothing), then
        the host copies of the constants that changed onto the device."""
        for slot, arrays in rows:
            if self._staged.pop(slot, None) is not arrays:  # not the rows stage() returned for it
                self.stage(slot, arrays)
                self._staged.pop(slot, None)
        for name in sorted(self._changed):
            self.device.write_rows(self.consts[name], self._consts_host[name], self._changed[name])
        self._changed.clear()

    def _prefill_group(self, group: list[tuple[int, list[int], dict[str, np.ndarray]]], want_logits: bool,
                       plan: Plan) -> dict[int, tuple[int, np.ndarray | None]]:
        """One prefill run over consecutive slots (or a long prompt's chunks, alone): the step
        state it starts from is bound from device zeros (a prompt mask from host memory), the
        constants from the slots' rows, and it writes the state the first decode step reads into
        the slots' rows of the current set."""
        into = self.current
        first, m = group[0][0], len(group)
        lengths = [len(prompt) for _, prompt, _ in group]
        chunked = m == 1 and lengths[0] > self.prefill_chunk
        starts = {name: [] if name == PREFIX + "history" else [rows[name[len(PREFIX):]] for _, _, rows in group]
                  for name, _, _ in STATE if name.startswith(PREFIX)}
        # (max: much faster than any() on floats)
        zero = {name for name, start in starts.items() if all(is_neutral(row) or not row.max() for row in start)}
        if m == 1 and not chunked and not want_logits and len(zero) == len(starts) and self._graph_run(group[0], plan):
            history = self.sets[into][PREFIX + "history"].numpy()  # the one host read
            return {first: (int(history[first, 0]), None)}
        # a cached binding leaves the logits unbound (onnxruntime computes and drops them); one
        # that keeps logits, or a chunked prompt, gets a binding of its own
        binding = self._fixed_binding(first, m, into, cached=not want_logits and not chunked)
        for name, start in starts.items():
            if name in zero:
                self.device.bind_rows(binding, name, self._zero_start[name], 0, m, output=False)
                continue
            value = self._start_value(name, m)
            dtype = next(dtype for state, _, dtype in STATE if state == name)
            value.update_inplace(np.ascontiguousarray(np.concatenate(start).astype(NP_DTYPES[dtype])))
            # bound after the update, every run: onnxruntime copies a host input meant for another
            # device when it is bound, so a binding made earlier would hold old values
            binding.bind_ortvalue_input(name, value)
        self._bind_host(binding, plan)
        if chunked:  # chunks: batch 1 with a past, exact lengths
            prompt = group[0][1]
            spans = [(s, min(len(prompt), s + self.prefill_chunk)) for s in range(0, len(prompt), self.prefill_chunk)]
            for begin, end in spans:
                ids = np.array([prompt[begin:end]], np.int64)
                last = self._run_prefill(binding, ids, begin, [end - 1], end, want_logits and end == len(prompt))
            logits = None if last is None else [last[0, -1]]
        else:  # one run, every row right-padded to the same length (its first prompt)
            width = self.padded(max(lengths))
            self.prefill_seen.add((m, width))
            ids = np.zeros((m, width), np.int64)
            for r, (_, prompt, _) in enumerate(group):
                ids[r, :len(prompt)] = prompt
            full = self._run_prefill(binding, ids, 0, [n - 1 for n in lengths], width, want_logits)
            logits = None if full is None else [full[r, n - 1] for r, n in enumerate(lengths)]
        history = self.sets[into][PREFIX + "history"].numpy()  # the one host read
        return {slot: (int(history[slot, 0]), None if logits is None else np.array(logits[r], dtype=np.float32))
                for r, (slot, _, _) in enumerate(group)}

    def captures_prefill(self, rows: int, length: int) -> bool:
        """Whether a plain prefill of ``rows`` new requests, padded to ``length``, can run as a CUDA
        graph (:meth:`_graph_run`; ``Engine.warm_up`` runs those three times)."""
        return self.graph_prefill and rows == 1 and self.padded(length) <= GRAPH_WIDTH

    def _graph_run(self, item: tuple[int, list[int], dict[str, np.ndarray]], plan: Plan) -> bool:
        """Prefill one new request (start state all zeros, no logits asked) through its captured
        graph: the prompt written into the length bucket's device buffers, then one run with the
        graph's id (onnxruntime runs a new id once uncaptured, captures it on the second run and
        replays it from then on). False, and nothing run, where no graph serves it: CUDA graphs
        off, a bucket longer than :data:`GRAPH_WIDTH`, a key seen for the first time,
        :data:`PREFILL_GRAPHS` taken by others, or a graph's run that failed (which turns the path
        off for this engine)."""
        slot, prompt, _ = item
        width = self.padded(len(prompt))
        if not self.captures_prefill(1, width):
            return False
        key = (slot, width, self.current, plan)
        step = self._prefill_graphs.get(key)
        if step is None:
            if len(self._prefill_graphs) >= PREFILL_GRAPHS:
                return False
            # a key gets a graph when it comes back: one-off shapes (the warm-up's dummies, a rare
            # slot or length) do not take the few graphs there are
            seen = self._prefill_sightings[key] = self._prefill_sightings.get(key, 0) + 1
            if seen < 2:
                if len(self._prefill_sightings) > _SIGHTINGS:
                    self._prefill_sightings.clear()
                return False
            del self._prefill_sightings[key]
            step = self._prefill_graphs[key] = self._prefill_graph(slot, width, plan)
        inputs = self._graph_inputs[width]
        inputs.host_ids[0, :len(prompt)] = prompt
        inputs.host_ids[0, len(prompt):] = 0
        inputs.host_last[0] = len(prompt) - 1
        self.device.write_rows(inputs.ids, inputs.host_ids, [0])
        self.device.write_rows(inputs.last, inputs.host_last, [0])
        try:
            self.device.run(self.session, step.binding, step.run)
        except GenerationError as exc:
            # the path is off from now on and this request prefills eagerly: its rows are written
            # again from the start, and a failure that is not the graph's fails the eager run too
            self.graph_prefill = False
            log.warning("a captured prefill failed (%s): prefills run eagerly from now on", exc)
            return False
        self.prefill_seen.add((1, width))
        self.graph_prefills += 1
        return True

    def _prefill_graph(self, slot: int, width: int, plan: Plan) -> _Step:
        """The binding and run options of a one-row prefill graph: everything it reads or writes
        at a fixed address (the slot's KV rows and state, the constants, the zero start state,
        the bucket's prompt buffers, a logits scratch), and a graph id of its own."""
        binding = self._fixed_binding(slot, 1, self.current, cached=False)
        for name, _, _ in STATE:
            if name.startswith(PREFIX):
                self.device.bind_rows(binding, name, self._zero_start[name], 0, 1, output=False)
        self._bind_host(binding, plan)
        inputs = self._graph_inputs.get(width)
        if inputs is None:
            host_ids, host_last = np.zeros([1, width], np.int64), np.zeros([1], np.int32)
            inputs = self._graph_inputs[width] = _GraphInputs(
                ids=self.device.put(host_ids), positions=self.device.put(np.arange(width, dtype=np.int64)[None]),
                last=self.device.put(host_last), total=self.device.host_scalar(width),
                host_ids=host_ids, host_last=host_last)
        binding.bind_ortvalue_input("input_ids", inputs.ids)
        binding.bind_ortvalue_input("position_ids", inputs.positions)
        binding.bind_ortvalue_input(SEQLENS_K, inputs.last)
        binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, inputs.total)
        if self._graph_logits is None:
            self._graph_logits = self.device.zeros([1, GRAPH_WIDTH, self.vocab], self._logits_dtype)
        binding.bind_output("logits", self.device.type, 0, NP_DTYPES[self._logits_dtype], [1, width, self.vocab],
                            self._graph_logits.data_ptr())
        run = ort.RunOptions()
        if self.cuda_graph:
            run.add_run_config_entry("gpu_graph_id", str(_PREFILL_GRAPH_IDS + len(self._prefill_graphs)))
        return _Step(binding, run, None)

    def _fixed_binding(self, first: int, m: int, into: int, cached: bool) -> Any:
        """A prefill binding of rows ``first:first + m`` with the KV rows, the state outputs of set
        ``into`` and the constants bound by address (kept for the next prefill of the same rows
        when ``cached``; at most :data:`_PREFILL_BINDINGS` kept)."""
        key = (first, m, into)
        if cached and (binding := self._prefill_bindings.get(key)) is not None:
            self._prefill_bindings.move_to_end(key)
            return binding
        binding = self.session.io_binding()
        bind = self.device.bind_rows
        for past, present in zip(self._past, self._present):
            bind(binding, past, self.kv[past], first, m, output=False)
            bind(binding, present, self.kv[past], first, m, output=True)
        for name, out, _ in STATE:
            bind(binding, out, self.sets[into][name], first, m, output=True)
        for name, value in self.consts.items():
            bind(binding, name, value, first, m, output=False)
        if cached:
            self._prefill_bindings[key] = binding
            if len(self._prefill_bindings) > _PREFILL_BINDINGS:
                self._prefill_bindings.popitem(last=False)
        return binding

    def _start_value(self, name: str, m: int) -> ort.OrtValue:
        """The host tensor a prefill of ``m`` rows reads state ``name`` from (made on first use)."""
        value = self._start.get((name, m))
        if value is None:
            dtype = next(dtype for state, _, dtype in STATE if state == name)
            shape = [m, *self._row_shapes()[name]]
            value = self._start[(name, m)] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, NP_DTYPES[dtype]))
        return value

    def _run_prefill(self, binding: Any, ids: np.ndarray, start: int, last: list[int], total: int,
                     keep_logits: bool) -> np.ndarray | None:
        """One prefill run: ``ids [m, seq]`` at positions ``start…``, rows ending at ``last``."""
        m, seq = ids.shape
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", np.broadcast_to(np.arange(start, start + seq, dtype=np.int64),
                                                               (m, seq)).copy())
        binding.bind_cpu_input(SEQLENS_K, np.array(last, np.int32))
        binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, self.device.host_scalar(total))
        out = self.device.zeros([m, seq, self.vocab], self._logits_dtype) if keep_logits else None
        if out is not None:
            binding.bind_ortvalue_output("logits", out)
        self.device.run(self.session, binding, self._eager)
        return None if out is None else out.numpy()

    # -- decode ---------------------------------------------------------------------------------

    def bucket(self, rows: int) -> int:
        """How many rows a step runs to cover ``rows`` (a CUDA-graph bucket when capturing)."""
        if not self.cuda_graph:
            return rows
        size = 1
        while size < rows:
            size *= 2
        return min(size, self.max_batch)

    def _step_binding(self, n: int, d: int, plan: Plan) -> _Step:
        key = (n, d, plan)
        if key in self._steps:
            return self._steps[key]
        binding = self.session.io_binding()
        bind = self.device.bind_rows
        for name, out, _dtype in STATE:
            bind(binding, name, self.sets[d][name], 0, n, output=False)
            bind(binding, out, self.sets[1 - d][name], 0, n, output=True)
        for name, value in self.consts.items():
            bind(binding, name, value, 0, n, output=False)
        binding.bind_ortvalue_input(TOTAL_SEQUENCE_LENGTH, self.total)
        self._bind_host(binding, plan)
        bind(binding, "logits", self.logits, 0, n, output=True)
        for past, present in zip(self._past, self._present):
            bind(binding, past, self.kv[past], 0, n, output=False)
            bind(binding, present, self.kv[past], 0, n, output=True)
        run = run_async = None
        if self.cuda_graph:
            run, run_async = ort.RunOptions(), ort.RunOptions()
            graph_id = 2 * (len(self._steps) + 1) + d  # unique per (rows, direction, host inputs)
            for options in (run, run_async):
                options.add_run_config_entry("gpu_graph_id", str(graph_id))
            run_async.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._steps[key] = _Step(binding, run, run_async)
        return self._steps[key]

    def launch_next(self, rows: int, plan: Plan, slots: Iterable[int]) -> None:
        """Launch the next block's first step over rows ``0:rows`` now, without waiting for it:
        the GPU runs it while the host handles the block just read (text, stop checks, events),
        which otherwise leaves the GPU idle between blocks. The next :meth:`decode_block` counts it as
        its first step for ``slots`` (the requests running now); a slot released before then
        (its request stopped inside the block just read) ignores its token, and a request
        admitted before then takes one step fewer in that block."""
        step = self._step_binding(self.bucket(rows), self.current, plan)
        self.device.run(self.session, step.binding, step.run_async)
        self.current = 1 - self.current
        self.replays += 1
        self._ahead = frozenset(slots)

    def decode_block(self, rows: int, steps: int, generated: dict[int, int], want_logits: bool,
                     plan: Plan, interrupt: Callable[[], bool] | None = None,
                     ) -> tuple[dict[int, list[int]], np.ndarray | None]:
        """Up to ``steps`` decode steps over rows ``0:rows`` (a step launched ahead among them);
        the new ids of every slot in ``generated`` (slot → tokens it had before the block), and
        the last step's logits ``[rows, vocab]`` when asked (then ``steps`` must be 1 and no step
        may have been launched ahead).

        ``interrupt`` is asked after each step but the last; when it answers True the block ends
        there (a request is waiting: its prefill should not wait for the whole block). The steps
        of a block whose ``interrupt`` can end it run one at a time, each finished before the next
        is launched; without one they are launched back to back and synchronized once.
        """
        if steps > self.window:
            raise ValueError(f"a block of {steps} steps exceeds the id history of {self.window}")
        # a step launched ahead is this block's first (not when logits are asked: they must come
        # from a step over the rows as they are now; its slots then get one token more)
        first = 1 if self._ahead is not None and not want_logits else 0
        ahead, self._ahead = self._ahead or frozenset(), None
        n = self.bucket(rows)
        done = 0
        try:
            for i in range(steps - first):
                step = self._step_binding(n, self.current, plan)
                last = i == steps - first - 1
                self.device.run(self.session, step.binding, step.run if last or interrupt else step.run_async)
                self.current = 1 - self.current
                self.replays += 1
                done += 1
                if not last and interrupt is not None and interrupt():
                    break
            if done == 0:  # only the step launched ahead: wait for it
                self._step_binding(n, self.current, plan).binding.synchronize_outputs()
        except BaseException:
            # earlier replays ran without a sync: let them finish before anything else runs
            self._step_binding(n, self.current, plan).binding.synchronize_outputs()
            raise
        history = self.sets[self.current][PREFIX + "history"].numpy()  # the one host read
        ids = {slot: [int(history[slot, (g + i) % self.window]) for i in range(done + (slot in ahead))]
               for slot, g in generated.items()}
        logits = np.array(self.logits.numpy()[:rows, -1], dtype=np.float32) if want_logits else None
        return ids, logits
