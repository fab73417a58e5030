"""The decoder's IO contract: the one module that knows the decoder graph's inputs and outputs.

:class:`DecoderIO` is built once from a validated manifest (:meth:`DecoderIO.from_artifact`):
dims, the KV tensors' names and dtype, the logits' dtype, whether the graph takes
``position_ids``, the step model's record and EOS/pad. Everything that feeds a decoder graph —
the KV backends (:mod:`runtime.kv_concat`, :mod:`runtime.kv_slots`), ``optimize --check``
(:mod:`passes.check`, :mod:`passes.shared_buffer`), layer-wise parity (:mod:`parity.layerwise`) —
builds its feeds and reads its outputs through it; the exporter writes the KV names from
:data:`KV_NAMES` and :func:`kv_record`.

The two contracts (docs/architecture.md, "The decoder's IO contract"):

* ``concat``: ``input_ids [batch, seq]``, ``attention_mask [batch, past+seq]``, optionally
  ``position_ids [batch, seq]``, ``past_key_values.{i}.key|value [batch, kv_heads, past, head_dim]``
  → ``logits``, ``present.{i}.key|value`` (past + seq positions).
* ``shared-buffer``: ``input_ids``, ``position_ids``, ``seqlens_k [batch]`` int32,
  ``total_sequence_length`` int32 scalar, KV buffers ``[batch, kv_heads, capacity, head_dim]``
  bound as past and present, plus the step model's own inputs (:mod:`runtime.step_graph`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from runtime.artifact import Artifact, KvMode, TensorSpec
from runtime.errors import ArtifactError, InvalidRequestError
from runtime.step_graph import PREFIX as STEP_PREFIX
from runtime.step_graph import neutral_feeds

__all__ = [
    "KV_NAMES",
    "KV_DTYPES",
    "SEQLENS_K",
    "TOTAL_SEQUENCE_LENGTH",
    "DecoderIO",
    "kv_record",
    "kv_names",
    "positions_from_mask",
]

# The manifest's ``kv`` name templates (``{i}``: the layer), as ``convert`` writes them.
KV_NAMES: dict[str, str] = {
    "past_key": "past_key_values.{i}.key",
    "past_value": "past_key_values.{i}.value",
    "present_key": "present.{i}.key",
    "present_value": "present.{i}.value",
}
KV_DTYPES = {"float32": np.float32, "float16": np.float16}
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"

_T = TypeVar("_T")


def kv_names(layers: int, side: str, templates: Mapping[str, str] = KV_NAMES) -> list[str]:
    """The KV tensors of one side (``"past"`` or ``"present"``), key then value per layer."""
    return [templates[f"{side}_{kind}"].format(i=i) for i in range(layers) for kind in ("key", "value")]


def kv_record(kv_dtype: str) -> dict[str, str]:
    """The manifest's ``kv`` record for a freshly exported decoder."""
    return {"dtype": kv_dtype, **KV_NAMES}


def positions_from_mask(mask: np.ndarray, seq: int | None = None) -> np.ndarray:
    """``position_ids`` for a left-padded ``attention_mask`` (pads get 0), its last ``seq`` columns."""
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return pos if seq is None else pos[:, -seq:]


@dataclasses.dataclass(frozen=True)
class DecoderIO:
    """A decoder artifact's IO, read and checked once from its manifest."""

    path: Path
    kv_mode: KvMode
    layers: int
    vocab: int
    kv_heads: int
    head_dim: int
    max_context: int  # the KV capacity the manifest allows
    kv_dtype: str  # "float32" | "float16"
    logits_dtype: str
    past: tuple[str, ...]  # per layer: key, value
    present: tuple[str, ...]
    inputs: Mapping[str, TensorSpec]
    eos: frozenset[int]
    pad: int | None  # generation_config's pad_token_id
    step_window: int | None  # the step model's id history (shared-buffer), else None
    step_format: int | None

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> DecoderIO:
        """Read the decoder's IO from a loaded artifact; a manifest that cannot carry it raises
        :class:`~runtime.errors.ArtifactError` naming what is missing."""
        manifest, arch = artifact.manifest, artifact.architecture
        if not artifact.is_decoder or artifact.kv_mode is KvMode.NONE:
            raise ArtifactError(f"artifact {artifact.path} is an encoder, not a decoder",
                                fix="load it with runtime.Encoder.load(...)")
        kv = manifest.get("kv") or {}
        try:
            layers, vocab = int(arch["layers"]), int(arch["vocab"])
            past = tuple(kv_names(layers, "past", kv))
            present = tuple(kv_names(layers, "present", kv))
            context = int(kv.get("max_context") or arch["max_context"])
            kv_heads, head_dim = int(arch.get("kv_heads", 0)), int(arch.get("head_dim", 0))
        except (KeyError, AttributeError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactError(f"artifact {artifact.path}: the manifest lacks the decoder's dims or KV names",
                                got=repr(exc), fix="re-export the artifact") from exc
        kv_dtype = str(kv.get("dtype", "float32"))
        if kv_dtype not in KV_DTYPES:
            raise ArtifactError(f"artifact {artifact.path}: unsupported KV dtype", expected="float32 or float16",
                                got=kv_dtype, fix="re-export the artifact")
        outputs = {t.name: t for t in artifact.outputs}
        if "logits" not in outputs:
            raise ArtifactError(f"artifact {artifact.path}: io.outputs has no 'logits'", fix="re-export the artifact")
        generation = manifest.get("generation") or {}
        eos = frozenset(int(i) for i in generation.get("eos_token_ids") or [])
        pad = generation.get("pad_token_id")
        step = manifest.get("step")
        window = step.get("window") if isinstance(step, dict) else None
        fmt = step.get("format") if isinstance(step, dict) and step.get("prefix") == STEP_PREFIX else None
        valid_window = isinstance(window, int) and not isinstance(window, bool) and window >= 1
        return cls(path=artifact.path, kv_mode=artifact.kv_mode, layers=layers, vocab=vocab, kv_heads=kv_heads,
                   head_dim=head_dim, max_context=context, kv_dtype=kv_dtype,
                   logits_dtype=outputs["logits"].dtype, past=past, present=present,
                   inputs={t.name: t for t in artifact.inputs}, eos=eos,
                   pad=int(pad) if isinstance(pad, int) and not isinstance(pad, bool) else None,
                   step_window=window if valid_window else None,
                   step_format=fmt if isinstance(fmt, int) else None)

    # -- what the loop needs ----------------------------------------------------------------

    @property
    def takes_positions(self) -> bool:
        return "position_ids" in self.inputs

    @property
    def pad_token_id(self) -> int:
        """The id left padding uses: the model's pad token, else its lowest EOS, else 0."""
        if self.pad is not None:
            return self.pad
        return min(self.eos) if self.eos else 0

    @property
    def kv_pairs(self) -> list[tuple[str, str]]:
        """``(past, present)`` names per KV tensor."""
        return list(zip(self.past, self.present))

    def kv_bytes_per_position(self, rows: int = 1) -> int:
        """KV bytes one position of ``rows`` rows takes across every layer."""
        return self.layers * 2 * self.kv_heads * self.head_dim * np.dtype(KV_DTYPES[self.kv_dtype]).itemsize * rows

    def capacity(self, max_context: int | None = None, kv_memory_gb: float | None = None, rows: int = 1) -> int:
        """The KV positions a row gets: the manifest's, capped by ``max_context`` and by what
        ``rows`` rows of KV fit in ``kv_memory_gb``."""
        context = self.max_context
        if max_context is not None:
            if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
                raise InvalidRequestError("invalid max_context", expected="an integer ≥ 2", got=repr(max_context))
            context = min(context, max_context)
        if kv_memory_gb is not None:
            per_position = self.kv_bytes_per_position(rows)
            fits = int(float(kv_memory_gb) * 2**30 // max(per_position, 1))
            if fits < 2:
                raise InvalidRequestError("kv_memory_gb is too small for one position of every row",
                                          expected=f"at least {2 * per_position / 2**30:.4f} GB for {rows} rows",
                                          got=str(kv_memory_gb), fix="raise kv_memory_gb or lower max_batch")
            context = min(context, fits)
        return context

    def past_axis(self, name: str) -> int:
        """The axis of a past KV input that grows with the context (named ``past``)."""
        shape = self.inputs[name].shape
        if "past" not in shape:
            raise ArtifactError(f"artifact {self.path}: {name} has no 'past' axis", got=str(shape),
                                fix="re-export the artifact")
        return shape.index("past")

    # -- feeds ----------------------------------------------------------------------------

    def empty_kv(self, batch: int, length: int = 0) -> dict[str, np.ndarray]:
        """Zero KV tensors ``[batch, kv_heads, length, head_dim]`` for every past input."""
        return {name: np.zeros(self._kv_shape(name, batch, length), dtype=KV_DTYPES[self.kv_dtype])
                for name in self.past}

    def _kv_shape(self, name: str, batch: int, length: int) -> list[int]:
        """``[batch, kv_heads, length, head_dim]``, heads and head size from the graph's own
        declaration where it fixes them (the manifest's architecture otherwise)."""
        dims = [batch, self.kv_heads, length, self.head_dim]
        spec = self.inputs.get(name)
        if spec is not None and len(spec.shape) == 4:
            dims = [d if i in (1, 3) and isinstance(d, int) else dims[i] for i, d in enumerate(spec.shape)]
        return dims

    def concat_feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                     past: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """One run of a concat-contract graph: ``input_ids [batch, seq]``, the whole
        ``attention_mask [batch, past+seq]`` (left padding allowed), positions from the mask when
        the graph takes them, and ``past`` (empty KV when ``None``)."""
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray(input_ids, np.int64),
                                        "attention_mask": np.asarray(attention_mask, np.int64)}
        if self.takes_positions:
            feeds["position_ids"] = positions_from_mask(feeds["attention_mask"], feeds["input_ids"].shape[1])
        feeds.update(past if past is not None else self.empty_kv(feeds["input_ids"].shape[0]))
        return feeds

    def shared_feeds(self, input_ids: np.ndarray, position_ids: np.ndarray, seqlens_k: np.ndarray, total: int,
                     buffers: Mapping[str, np.ndarray], greedy_rows: int | None = None,
                     capacity: int | None = None) -> dict[str, np.ndarray]:
        """One eager run of a shared-buffer step model: the decoder's inputs (``seqlens_k``: each
        row's last valid position, ``total``: ``total_sequence_length``) and KV ``buffers``, plus
        the step model's own inputs for greedy rows with no penalties
        (:func:`runtime.step_graph.neutral_feeds`)."""
        batch = int(np.asarray(input_ids).shape[0])
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray(input_ids, np.int64), "position_ids": np.asarray(position_ids, np.int64),
            SEQLENS_K: np.asarray(seqlens_k, np.int32), TOTAL_SEQUENCE_LENGTH: np.array(total, np.int32),
            **buffers,
        }
        if self.step_window is not None:
            feeds.update(neutral_feeds(greedy_rows or batch, self.vocab, self.step_window,
                                       capacity if capacity is not None else total))
        return feeds

    def prompt_feeds(self, input_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """One prefill of one prompt with an empty past, in the artifact's own contract (a
        shared-buffer artifact gets KV buffers of the prompt's length)."""
        n = len(input_ids)
        ids = np.asarray([list(input_ids)], dtype=np.int64)
        if self.kv_mode is KvMode.SHARED_BUFFER:
            return self.shared_feeds(ids, np.arange(n, dtype=np.int64)[None], np.array([n - 1]), n,
                                     self.empty_kv(1, n), capacity=n)
        return self.concat_feeds(ids, np.ones((1, n), np.int64))

    def carry(self, outputs: Mapping[str, _T]) -> dict[str, _T]:
        """The next run's past, from this run's presents (keyed by output name)."""
        return {p: outputs[q] for p, q in self.kv_pairs}

    def only_inputs(self, feeds: Mapping[str, _T]) -> dict[str, _T]:
        """``feeds`` restricted to the graph's inputs (a graph without ``position_ids``, say)."""
        return {k: v for k, v in feeds.items() if k in self.inputs}

