"""The ``concat`` KV backend: the portable contract (standard ONNX ops, every execution provider).

The running batch is one set of device tensors: the decoder's next inputs (``input_ids [n, 1]``,
``attention_mask [n, P + 1]``, ``position_ids``, ``past [n, …, P, …]``) and the sampler's per-row
tensors (:mod:`runtime.sampler_graph`). A step runs the decoder, then the sampler, whose outputs
are the next step's inputs as they are; the host reads only the ``[n]`` new ids.

Continuous batching regroups that batch on the device (:func:`build_regroup_model`, one run):
requests admitted at a step boundary are prefilled together as their own left-padded batch, then
merged with the running rows — both sides left-padded along the past axis to a common length —
and released rows are dropped in the same run, which also trims leading columns that every
remaining row masks. Left padding is exact for this contract: masked positions get zero
attention weight and positions come from the mask, so a row's tokens do not depend on its
neighbours (up to the kernels' own batch-size-dependent rounding, which the tests bound).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnxruntime as ort

from runtime._onnx_proto import GraphBuilder
from runtime.artifact import Artifact, KvMode
from runtime.decoder_io import DecoderIO
from runtime.device import NP_DTYPES, Device
from runtime.errors import GenerationError
from runtime.kv_backend import BackendOptions, Started, register_backend
from runtime.sampler_graph import HOST_INPUTS, ROW_CONSTANTS, ROW_INPUTS, ROW_STATE, SAMPLER_FORMAT
from runtime.sampling import Plan, checked_row

__all__ = ["ConcatBackend", "build_regroup_model"]

log = logging.getLogger(__name__)

_INT64_MAX = np.iinfo(np.int64).max


def _sampler_bytes(artifact: Artifact) -> bytes:
    """The sampler the artifact ships (``manifest["sampler"]``, a file hashed with the rest)."""
    record = artifact.manifest.get("sampler")
    name = record.get("file") if isinstance(record, dict) else None
    shipped = name in artifact.manifest.get("files", {})
    if (not isinstance(record, dict) or record.get("format") != SAMPLER_FORMAT or not shipped
            or not isinstance(name, str)):
        got = "no sampler" if not isinstance(record, dict) else f"sampler {record!r}"
        raise GenerationError(
            f"artifact {artifact.path}: it carries {got}; this lmforge samples with format {SAMPLER_FORMAT}",
            fix="re-run `lmforge convert` (and `lmforge optimize` on the new conversion); they write sampler.onnx",
        )
    return (artifact.path / name).read_bytes()


def build_regroup_model(tensors: list[tuple[str, str, int, int | None]]) -> bytes:
    """Keep rows ``keep`` of every ``a.{name}``, append the rows of ``b.{name}``, as ``out.{name}``.

    ``tensors``: ``(name, dtype, rank, past_axis)``. A tensor with a past axis is trimmed on
    the A side (columns before ``trim``) and both sides are left-padded with zeros by
    ``pads_a{rank}_{axis}`` / ``pads_b{rank}_{axis}`` (ONNX ``Pad`` vectors) before the
    concatenation.
    """
    g = GraphBuilder("lmforge_regroup")
    keep = g.input("keep", "int64", ["kept"])
    trim = g.input("trim", "int64", [1])
    pads: dict[tuple[int, int], tuple[str, ...]] = {}
    for rank, past_axis in sorted({(r, int(axis)) for _, _, r, axis in tensors if axis is not None}):
        pads[(rank, past_axis)] = tuple(g.input(f"pads_{side}{rank}_{past_axis}", "int64", [2 * rank])
                                        for side in "ab")
    for name, dtype, rank, axis in tensors:
        dims: list[int | str] = [f"{name}_d{i}" for i in range(rank)]
        a = g.input(f"a.{name}", dtype, dims)
        b = g.input(f"b.{name}", dtype, [f"{name}_b{i}" for i in range(rank)])
        kept = g.op("Gather", [a, keep], {"axis": 0})
        if axis is not None:
            axes = g.const(np.array([axis], np.int64))
            kept = g.op("Slice", [kept, trim, g.const(np.array([_INT64_MAX], np.int64)), axes])
            kept = g.op("Pad", [kept, pads[(rank, axis)][0]])
            b = g.op("Pad", [b, pads[(rank, axis)][1]])
        g.op("Concat", [kept, b], {"axis": 0}, outputs=[f"out.{name}"])
        g.output(f"out.{name}", dtype, [f"{name}_o{i}" for i in range(rank)])
    return g.to_bytes()


@register_backend(KvMode.CONCAT)
class ConcatBackend:
    """The running batch as concat-contract tensors, regrouped at step boundaries."""

    kind = "concat"
    preallocates = False  # the batch's KV grows with its longest row
    captures = False
    can_launch_ahead = False  # the next step's rows are regrouped from this one's on the host
    max_block = 1  # decode steps per call: the host read after a step is what regroups the batch

    def __init__(self, artifact: Artifact, device: Device, io: DecoderIO, options: BackendOptions) -> None:
        self.device = device
        self.io = io
        self.max_batch = options.max_batch
        self.vocab = io.vocab
        self.capacity = options.capacity
        self._past, self._present = list(io.past), list(io.present)
        self._kv_dtype = io.kv_dtype
        self._inputs = dict(io.inputs)
        known = {"input_ids", "attention_mask", "position_ids", *self._past}
        unknown = sorted(set(self._inputs) - known)
        missing = [n for n in ("input_ids", "attention_mask", *self._past) if n not in self._inputs]
        if unknown or missing:
            raise GenerationError(
                f"artifact {artifact.path}: io.inputs does not follow the concat contract",
                expected="input_ids, attention_mask, [position_ids], " + ", ".join(self._past[:2]) + ", …",
                got=f"unknown {unknown}, missing {missing}", fix="re-export the artifact",
            )
        self._positions = io.takes_positions
        self._past_axis = {name: io.past_axis(name) for name in self._past}
        self.session = device.session(str(artifact.model_path))
        graph_inputs = {i.name for i in self.session.get_inputs()}
        if graph_inputs != set(self._inputs):
            raise GenerationError(
                f"artifact {artifact.path}: the manifest's io.inputs and model.onnx disagree",
                expected=str(sorted(self._inputs)), got=str(sorted(graph_inputs)), fix="re-export the artifact",
            )
        self.sampler = device.session(_sampler_bytes(artifact), small=True)
        row: list[tuple[str, str, int, int | None]] = [
            (r.name, r.dtype, 1 + len(r.dims(self.vocab, self.capacity)), None) for r in ROW_INPUTS]
        feeds: list[tuple[str, str, int, int | None]] = [("input_ids", "int64", 2, None),
                                                         ("attention_mask", "int64", 2, 1)]
        if self._positions:
            feeds.append(("position_ids", "int64", 2, None))
        feeds += [(n, self._kv_dtype, len(self._inputs[n].shape), self._past_axis[n]) for n in self._past]
        self._tensors = feeds + row
        self._row_names = [t[0] for t in row]
        # what one request's row arrays must be (runtime.sampling.checked_row)
        self._row_layout = {r.name: (NP_DTYPES[r.dtype], tuple(int(d) for d in r.dims(self.vocab, self.capacity)))
                            for r in ROW_INPUTS}
        self.regroup = device.session(build_regroup_model(self._tensors), small=True)
        self.order: list[int] = []  # slot of each batch row
        self.state: dict[str, ort.OrtValue] = {}  # every per-row tensor of the running batch, by name
        self.length: dict[int, int] = {}  # slot → valid KV entries
        self._dropped: set[int] = set()
        self._free = list(range(self.max_batch))
        self.replays = 0

    # -- slots ----------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free) + len(self._dropped)

    def allocate(self) -> int:
        if not self._free and self._dropped:
            self._merge(None, [], 0)  # released rows leave the batch now, and their slots are free
        self._free.sort()
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        if slot in self.length:
            self._dropped.add(slot)
        elif slot not in self._free:
            self._free.append(slot)

    def bucket(self, rows: int) -> int:
        return rows

    def reset(self) -> None:
        """Forget the running batch (after a failed step failed all of its requests)."""
        self.order, self.state, self.length, self._dropped = [], {}, {}, set()
        self._free = list(range(self.max_batch))

    def stage(self, slot: int, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One admitted request's row arrays (:func:`runtime.sampling.row_arrays`), checked and
        cast (:func:`runtime.sampling.checked_row`) before its prefill: a row that does not fit
        raises for this request alone. Nothing is written: :meth:`prefill_many` uploads the rows."""
        return checked_row(arrays, self._row_layout)

    # -- runs -----------------------------------------------------------------------------------

    def _forward(self, feeds: dict[str, ort.OrtValue], rows: dict[str, ort.OrtValue], want_logits: bool,
                 plan: Plan) -> tuple[dict[str, ort.OrtValue], np.ndarray, np.ndarray | None]:
        """Decoder, then sampler: the next per-row tensors, the new ids, the last logits."""
        dev = self.device
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if name in self._inputs:
                binding.bind_ortvalue_input(name, value)
        outputs = ["logits", *self._present]
        for name in outputs:
            binding.bind_output(name, dev.type, 0)
        dev.run(self.session, binding)
        out = dict(zip(outputs, binding.get_outputs()))
        logits = np.array(out["logits"].numpy()[:, -1], dtype=np.float32) if want_logits else None
        sb = self.sampler.io_binding()
        sb.bind_ortvalue_input("logits", out["logits"])
        sb.bind_ortvalue_input("attention_mask", feeds["attention_mask"])
        for name in self._row_names:
            sb.bind_ortvalue_input(name, rows[name])
        for name, value in zip(HOST_INPUTS, plan[:len(HOST_INPUTS)]):  # the sampler has no filtered_rows
            sb.bind_cpu_input(name, np.array([value], np.int64))
        names = ["next_ids", "next_attention_mask", "next_position_ids", *(o for _, o, _ in ROW_STATE)]
        for name in names:
            sb.bind_output(name, dev.type, 0)
        dev.run(self.sampler, sb)
        got = dict(zip(names, sb.get_outputs()))
        nxt = {"input_ids": got["next_ids"], "attention_mask": got["next_attention_mask"]}
        if self._positions:
            nxt["position_ids"] = got["next_position_ids"]
        nxt.update(zip(self._past, (out[n] for n in self._present)))
        nxt.update({name: rows[name] for name, _ in ROW_CONSTANTS})
        nxt.update({s: got[o] for s, o, _ in ROW_STATE})
        ids = np.array(got["next_ids"].numpy(), dtype=np.int64).reshape(-1)  # the one host read
        return nxt, ids, logits

    def prefill_many(self, admitted: list[tuple[int, list[int], dict[str, np.ndarray]]], want_logits: bool,
                     plan: Plan, started: Started) -> None:
        """Prefill ``(slot, prompt, row arrays)`` as one left-padded batch, then merge it into
        the running batch (dropping released rows in the same run); hand ``started`` each slot's
        first token (and logits when asked)."""
        m, longest = len(admitted), max(len(p) for _, p, _ in admitted)
        ids = np.zeros((m, longest), np.int64)
        mask = np.zeros((m, longest), np.int64)
        for r, (_, prompt, _) in enumerate(admitted):
            ids[r, longest - len(prompt):] = prompt
            mask[r, longest - len(prompt):] = 1
        feeds = {k: self.device.put(v) for k, v in self.io.concat_feeds(ids, mask).items()}
        rows_np = {name: np.concatenate([a[name] for _, _, a in admitted], axis=0) for name in admitted[0][2]}
        rows = {k: self.device.put(v) for k, v in rows_np.items()}
        new, first, logits = self._forward(feeds, rows, want_logits, plan)
        self._merge(new, [slot for slot, _, _ in admitted], longest)
        for slot, prompt, _ in admitted:
            self.length[slot] = len(prompt)
        started({slot: (int(first[r]), None if logits is None else logits[r])
                 for r, (slot, _, _) in enumerate(admitted)})

    def _merge(self, new: dict[str, ort.OrtValue] | None, slots: list[int], new_len: int) -> None:
        """One regroup run: keep the running rows not dropped, append ``new`` (or nothing)."""
        keep = [r for r, slot in enumerate(self.order) if slot not in self._dropped]
        kept_slots = [self.order[r] for r in keep]
        if not self.order:  # nothing running: the new batch is the batch
            self.state, self.order = dict(new or {}), list(slots)
        else:
            a_len = max((self.length[s] for s in kept_slots), default=0)
            past = self.state[self._past[0]].shape()[self._past_axis[self._past[0]]]
            target = max(a_len, new_len if new is not None else 0)
            if new is None:
                new = self._empty_like_state()
            inputs = {"keep": np.asarray(keep, np.int64), "trim": np.array([past - a_len], np.int64)}
            for rank, axis in sorted({(r, axis) for _, _, r, axis in self._tensors if axis is not None}):
                for side, pad in (("a", target - a_len), ("b", target - new_len)):
                    vec = np.zeros(2 * rank, np.int64)
                    vec[axis] = pad
                    inputs[f"pads_{side}{rank}_{axis}"] = vec
            binding = self.regroup.io_binding()
            for name, value in inputs.items():
                binding.bind_cpu_input(name, value)
            names = [t[0] for t in self._tensors]
            for name in names:
                binding.bind_ortvalue_input(f"a.{name}", self.state[name])
                binding.bind_ortvalue_input(f"b.{name}", new[name])
                binding.bind_output(f"out.{name}", self.device.type, 0)
            self.device.run(self.regroup, binding)
            self.state = dict(zip(names, binding.get_outputs()))
            self.order = kept_slots + list(slots)
        for slot in self._dropped:
            self.length.pop(slot, None)
            self._free.append(slot)
        self._dropped.clear()

    def _empty_like_state(self) -> dict[str, ort.OrtValue]:
        """Zero-row tensors shaped like the running batch's (a regroup that only drops rows)."""
        out = {}
        for name, dtype, _rank, axis in self._tensors:
            shape = list(self.state[name].shape())
            shape[0] = 0
            if axis is not None:
                shape[axis] = 0 if name != "attention_mask" else 1
            out[name] = self.device.zeros(shape, dtype)
        return out

    def launch_next(self, rows: int, plan: Plan, slots: Iterable[int]) -> None:
        """Not supported (``can_launch_ahead`` is False): the engine never calls it."""
        raise NotImplementedError("the concat backend regroups each step's rows on the host")

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Prefill shapes to plan at warm-up: none (this backend serves the CPU and portable EPs)."""
        return []

    def decode_block(self, rows: int, steps: int, generated: dict[int, int], want_logits: bool,
                     plan: Plan, interrupt: Callable[[], bool] | None = None,
                     ) -> tuple[dict[int, list[int]], np.ndarray | None]:
        """One step for every running row (``steps`` is 1 for this backend: the host read after
        a step costs nothing on CPU, and the stop checks need it)."""
        if self._dropped:
            self._merge(None, [], 0)
        if not self.order:
            return {}, None
        self.state, ids, logits = self._forward(self.state, self.state, want_logits, plan)
        self.replays += 1
        out = {}
        for r, slot in enumerate(self.order):
            self.length[slot] += 1
            out[slot] = [int(ids[r])]
        return out, logits if logits is None else self._by_slot(logits)

    def _by_slot(self, logits: np.ndarray) -> np.ndarray:
        """Batch-row logits re-indexed by slot (rows of free slots are zeros)."""
        full = np.zeros((max(self.order) + 1, logits.shape[1]), np.float32)
        full[self.order] = logits
        return full
