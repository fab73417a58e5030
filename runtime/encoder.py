"""``Encoder``: embeddings from a BERT-family artifact with onnxruntime, numpy and tokenizers only.

::

    from runtime import Encoder

    enc = Encoder.load("artifacts/minilm-int8", device="cpu", threads=None)   # threads: physical cores
    vectors = enc.encode(["a sentence", "another one"])          # float32 [2, 384], pooled + normalized
    tokens = enc.encode_tokens(["a sentence"])                   # [float32 [len, 384]] per text
    result = enc.encode_with_stats(texts)                        # vectors + padding saved, timings

Pooling and normalization follow the model's sentence-transformers configuration, which
``lmforge convert`` records in the manifest's ``encoder`` block (``modules.json``,
``1_Pooling/config.json``, a ``Normalize`` module, ``max_seq_length``). An artifact without that
block (or converted from a folder without ``modules.json``) uses mean pooling without
normalization, and the load says so in the log. The configured pooling and normalization run
inside the session, as a small ONNX head appended to the graph at load (:func:`pooling_fragment`),
so only ``[batch, dim]`` leaves the device; ``pooling=`` / ``normalize=`` override per call (then
the hidden states come back and are pooled in numpy, like :meth:`Encoder.encode_tokens`).

**Length bucketing.** A call's texts are tokenized once, sorted by length (longest first), cut
into batches of ``batch_size``, each padded only to its own longest row, run, and the rows are put
back in the caller's order. :class:`EncodeStats` reports the padded tokens computed against what
batching in input order would have computed.

**Truncation.** Texts longer than the maximum (``max_seq_length`` from the sentence-transformers
configuration, else the artifact's ``max_context``) are truncated like sentence-transformers does
(the tokenizer keeps ``[CLS] … [SEP]``) with one warning per call, or refused with
``truncate=False``.

**Threads.** One ``Encoder`` may be called from many threads: the tokenizer is configured once at
load and only read afterwards, ``InferenceSession.run`` is thread-safe, and every call keeps its
own state. Concurrent callers' batches are *not* merged: on CPU one batch of 32 already keeps
every intra-op thread busy, so merging would add a queue and a hop without more throughput; for
more throughput on many cores run several pinned instances (``lmforge tune`` finds how many).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime._onnx_proto import GraphBuilder, fragment_bytes
from runtime.artifact import Artifact, KvMode, load_artifact
from runtime.cpu import intra_op_threads
from runtime.errors import GenerationError, InvalidRequestError
from runtime.text import error_line

__all__ = ["Encoder", "EncodeStats", "EncodeResult", "POOLINGS", "POOLED_OUTPUT", "pool", "l2_normalize",
           "pooling_fragment", "activate"]

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")
POOLED_OUTPUT = "lmforge_pooled"
_MAX_FRAGMENT_MODEL_BYTES = 1 << 30  # the graph is read into memory to append the pooling head
_ORT_ERRORS = (RuntimeError, ValueError, getattr(ort.capi.onnxruntime_pybind11_state, "Fail", RuntimeError))


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    """What one ``encode*`` call computed: real tokens, padded tokens, and the padding bucketing saved."""

    texts: int
    batches: int
    tokens: int  # real tokens (special tokens included)
    padded_tokens: int  # tokens computed, padding included, with length bucketing
    unsorted_padded_tokens: int  # what batches in input order would have computed
    truncated: int  # texts cut to the maximum length
    seconds: float

    @property
    def padding_saved(self) -> float:
        """Fraction of input-order padded tokens that bucketing did not compute (0 when none)."""
        if self.unsorted_padded_tokens == 0:
            return 0.0
        return 1.0 - self.padded_tokens / self.unsorted_padded_tokens


@dataclasses.dataclass(frozen=True)
class EncodeResult:
    """Pooled embeddings ``[n, dim]`` (float32) and the call's :class:`EncodeStats`."""

    embeddings: np.ndarray
    stats: EncodeStats


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """sentence-transformers' pooling of ``hidden [b, s, d]`` under ``mask [b, s]`` → ``[b, d]`` float32."""
    h = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)[:, :, None]
    if pooling == "cls":
        return h[:, 0].copy()
    if pooling == "lasttoken":  # the last position the mask keeps (sentence-transformers' lasttoken)
        last = np.where(mask.any(axis=1), mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1), mask.shape[1] - 1)
        return h[np.arange(h.shape[0]), last].copy()
    if pooling == "max":
        return np.where(m > 0, h, np.float32(-1e9)).max(axis=1)
    summed = (h * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    if pooling == "mean":
        return (summed / counts).astype(np.float32)
    if pooling == "mean_sqrt_len":
        return (summed / np.sqrt(counts)).astype(np.float32)
    raise ValueError(pooling)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (``torch.nn.functional.normalize``: eps 1e-12)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def pooling_fragment(pooling: str, normalize: bool, mask_input: str = "attention_mask") -> bytes:
    """The pooling head as ONNX bytes that merge into an encoder graph when appended to it.

    ``last_hidden_state [b, s, d]`` and the graph's ``attention_mask [b, s]`` → ``lmforge_pooled
    [b, d]`` float32: :func:`pool` and :func:`l2_normalize` as ONNX ops (opset 18), so the pooling
    runs on the session's device and only ``[b, d]`` comes back to the host (at batch 128 × 128 on
    a GPU, copying the hidden states out and pooling them in numpy took 3/4 of the time).
    """
    g = GraphBuilder("lmforge_pooling", prefix="lmforge_pool_")
    hidden = g.op("Cast", ["last_hidden_state"], {"to": 1})
    axis1 = g.const(np.array([1], dtype=np.int64))
    mask = g.op("Unsqueeze", [g.op("Cast", [mask_input], {"to": 1}), g.const(np.array([-1], dtype=np.int64))])
    if pooling == "cls":
        pooled = g.op("Gather", [hidden, g.const(np.array(0, dtype=np.int64))], {"axis": 1})
    elif pooling == "lasttoken":  # the runtime right-pads: the last kept position is sum(mask) - 1
        count = g.op("ReduceSum", [g.op("Cast", [mask_input], {"to": 7}), axis1], {"keepdims": 1})
        last = g.op("Max", [g.op("Sub", [count, g.const(np.array(1, dtype=np.int64))]),
                            g.const(np.array(0, dtype=np.int64))])
        pooled = g.op("GatherND", [hidden, last], {"batch_dims": 1})
    elif pooling == "max":
        keep = g.op("Greater", [mask, g.const(np.array(0.0, dtype=np.float32))])
        masked = g.op("Where", [keep, hidden, g.const(np.array(-1e9, dtype=np.float32))])
        pooled = g.op("ReduceMax", [masked, axis1], {"keepdims": 0})
    else:
        summed = g.op("ReduceSum", [g.op("Mul", [hidden, mask]), axis1], {"keepdims": 0})
        counts = g.op("Max", [g.op("ReduceSum", [mask, axis1], {"keepdims": 0}),
                              g.const(np.array(1e-9, dtype=np.float32))])
        pooled = g.op("Div", [summed, counts if pooling == "mean" else g.op("Sqrt", [counts])])
    if normalize:
        norm = g.op("Max", [g.op("ReduceL2", [pooled, axis1], {"keepdims": 1}),
                            g.const(np.array(1e-12, dtype=np.float32))])
        pooled = g.op("Div", [pooled, norm])
    g.op("Identity", [pooled], outputs=[POOLED_OUTPUT])
    g.output(POOLED_OUTPUT, "float32", ["batch", "hidden"])
    return fragment_bytes(g)


def _providers(device: str) -> list[Any]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise GenerationError(
                "device='cuda' needs onnxruntime's CUDAExecutionProvider, which is not available",
                expected="CUDAExecutionProvider among the providers", got=", ".join(available),
                fix="pip uninstall onnxruntime && pip install onnxruntime-gpu (matching your CUDA), "
                    "or use device='cpu'",
            )
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    raise GenerationError("unknown device", expected="'cpu' or 'cuda'", got=repr(device))


class _TokenIds(list):
    """Marks pre-tokenized input on its way through :meth:`Encoder.encode_with_stats`."""


class _Pairs(list):
    """Marks a classifier's inputs (texts or ``(text, text_pair)``) on their way through ``_run``."""


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """A classifier head's activation on ``logits [n, labels]``: sigmoid, softmax, tanh or identity."""
    x = logits.astype(np.float32, copy=False)
    if activation == "sigmoid":
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    if activation == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    if activation == "tanh":
        return np.tanh(x).astype(np.float32)
    return x


class _Tokens:
    """The ids and token types of one text (the fields of a ``tokenizers.Encoding`` the loop reads)."""

    __slots__ = ("ids", "type_ids", "overflowing")

    def __init__(self, ids: np.ndarray, max_length: int) -> None:
        self.overflowing = len(ids) > max_length
        self.ids = ids[:max_length]
        self.type_ids = 0


class Encoder:
    """A loaded encoder artifact: tokenizer, one onnxruntime session, pooling settings."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None,
                 truncate: bool = True) -> None:
        if artifact.is_decoder or artifact.kv_mode is not KvMode.NONE:
            raise GenerationError(
                f"artifact {artifact.path} is a decoder; Encoder computes embeddings with encoders only",
                fix="use runtime.Engine for a decoder artifact",
            )
        providers = _providers(device)
        self.device = device
        self.artifact = artifact
        self.truncate = truncate
        self.threads = intra_op_threads(threads) if device == "cpu" else None
        block = artifact.manifest.get("encoder")
        if isinstance(block, dict) and block.get("pooling") in POOLINGS:
            self.pooling = str(block["pooling"])
            self.normalize = bool(block.get("normalize", False))
            self.pooling_from = str(block.get("from", "manifest"))
            max_len = block.get("max_seq_length")
            self.prompts = {str(k): str(v) for k, v in (block.get("prompts") or {}).items()}
            self.default_prompt_name = block.get("default_prompt_name") or None
            self.include_prompt = bool(block.get("include_prompt", True))
            # whether the source's tokenizer hands token types to the model (transformers'
            # model_input_names); where it does not, the model saw zeros, and so does this graph
            self._type_ids = bool(block.get("token_type_ids", True))
        else:
            self.pooling, self.normalize, max_len = "mean", False, None
            self.prompts, self.default_prompt_name, self.include_prompt = {}, None, True
            self._type_ids = True
            self.pooling_from = "default: the manifest records no sentence-transformers configuration"
            log.info("%s: mean pooling without normalization (%s)", artifact.path, self.pooling_from)
        limit = int(artifact.architecture.get("max_context") or artifact.architecture.get("max_positions") or 512)
        self.max_length = min(int(max_len), limit) if max_len else limit
        self.dim = int(artifact.architecture.get("hidden") or 0)
        head = block if isinstance(block, dict) and block.get("head") == "sequence-classification" else {}
        self.labels: list[str] = [str(x) for x in head.get("labels") or []]
        self.activation = str(head.get("activation") or "identity")
        self._input_names = [t.name for t in artifact.inputs]
        wanted = "logits" if self.is_classifier else "last_hidden_state"
        if "input_ids" not in self._input_names or wanted not in {t.name for t in artifact.outputs}:
            raise GenerationError(f"artifact {artifact.path}: io does not follow the encoder contract",
                                  expected=f"input_ids, attention_mask[, token_type_ids] → {wanted}",
                                  got=f"{self._input_names} → {[t.name for t in artifact.outputs]}",
                                  fix="re-export the artifact with `lmforge convert`")
        self.tokenizer = self._load_tokenizer(artifact.tokenizer_dir)
        self._session = self._open(providers)
        self._closed = False
        self._lock = threading.Lock()  # guards only the counters below
        self.calls = 0
        log.info("loaded encoder %s on %s (%s pooling%s, max length %d, %s threads)", artifact.path, device,
                 self.pooling, " + normalize" if self.normalize else "", self.max_length, self.threads or "provider")

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", threads: int | None = None, truncate: bool = True,
             verify_hashes: bool = True) -> Encoder:
        """Validate and open the encoder artifact at ``path`` (``threads=None``: one per physical core)."""
        return cls(load_artifact(path, verify_hashes=verify_hashes), device=device, threads=threads, truncate=truncate)

    # ----------------------------------------------------------------------------------------
    # Loading

    def _load_tokenizer(self, folder: Path) -> Any:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise GenerationError(f"encoder artifact {self.artifact.path} has no tokenizer/tokenizer.json",
                                  fix="re-export the artifact with `lmforge convert` (it writes the tokenizer)")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        tok.no_padding()  # the batches pad themselves, each to its own longest row
        tok.enable_truncation(self.max_length)  # configured once; encode only reads it (thread-safe)
        return tok

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.device == "cpu":
            options.intra_op_num_threads = int(self.threads or 1)
            options.inter_op_num_threads = 1
            # Spinning threads steal cores from a neighbour process (or instance) at every op;
            # the decoder engine measured the same (runtime/engine.py).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _open(self, providers: list[Any]) -> ort.InferenceSession:
        """The session: the artifact's graph plus the pooling head (:func:`pooling_fragment`)."""
        self._device_pooling = False
        path = self.artifact.model_path
        if path.stat().st_size < _MAX_FRAGMENT_MODEL_BYTES and not self.is_classifier:
            options = self._options()
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(self.artifact.path))
            model = path.read_bytes() + pooling_fragment(self.pooling, self.normalize)
            try:
                session = ort.InferenceSession(model, sess_options=options, providers=providers)
                self._device_pooling = True
                return session
            except _ORT_ERRORS as exc:  # the head is ours: say so, then serve without it
                log.warning("the on-device pooling head did not load (%s); pooling on the host instead",
                            str(exc).splitlines()[0][:200])
        try:
            return ort.InferenceSession(str(path), sess_options=self._options(), providers=providers)
        except _ORT_ERRORS as exc:
            raise GenerationError("onnxruntime cannot open the encoder model", got=error_line(exc),
                                  fix="re-export the artifact, or check the onnxruntime version") from exc

    # ----------------------------------------------------------------------------------------
    # Public calls

    def encode(self, texts: Sequence[str] | str, batch_size: int = 32, normalize: bool | None = None,
               pooling: str | None = None, truncate: bool | None = None, prompt_name: str | None = None,
               prompt: str | None = None) -> np.ndarray:
        """Pooled embeddings ``float32 [n, dim]``, one row per text, in the given order.

        ``prompt_name`` picks one of the model's prompts (``config_sentence_transformers.json``, e.g.
        ``"query"`` → ``"query: "``), ``prompt`` gives the text itself; with neither, the model's
        ``default_prompt_name`` applies, as in ``SentenceTransformer.encode`` (``prompt=""``: none).
        """
        return self.encode_with_stats(texts, batch_size, normalize, pooling, truncate, prompt_name,
                                      prompt).embeddings

    def resolve_prompt(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        """The text prepended to every input (sentence-transformers' rules; ``""`` for none)."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidRequestError("prompt must be a string", got=type(prompt).__name__)
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise InvalidRequestError(f"unknown prompt name {prompt_name!r}",
                                          expected="one of " + (", ".join(sorted(self.prompts)) or "(none: "
                                                                "this model defines no prompts)"),
                                          got=repr(prompt_name), fix="pass one of the model's prompt names, or prompt=")
            return self.prompts[prompt_name]
        return self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name else ""

    def encode_with_stats(self, texts: Sequence[str] | str, batch_size: int = 32, normalize: bool | None = None,
                          pooling: str | None = None, truncate: bool | None = None, prompt_name: str | None = None,
                          prompt: str | None = None) -> EncodeResult:
        """:meth:`encode` plus the call's :class:`EncodeStats` (padding saved, truncations, time)."""
        prefix = self.resolve_prompt(prompt_name, prompt)
        skip = 0
        if prefix and not isinstance(texts, _TokenIds):
            items = self._check_texts(texts, batch_size)
            texts = [prefix + t for t in items]
            if not self.include_prompt:  # sentence-transformers: the prompt's tokens (less a trailing [SEP]/EOS)
                encoded = self.tokenizer.encode(prefix)
                trailing = bool(encoded.special_tokens_mask and encoded.special_tokens_mask[-1])
                skip = len(encoded.ids) - (1 if trailing else 0)
        pooling = self.pooling if pooling is None else pooling
        if pooling not in POOLINGS:
            raise InvalidRequestError("unknown pooling", expected=", ".join(POOLINGS), got=repr(pooling),
                                      fix="pass pooling=None for the model's own configuration")
        normalize = self.normalize if normalize is None else bool(normalize)
        out = np.empty((0, self.dim), dtype=np.float32)
        started = time.perf_counter()
        on_device = self._device_pooling and pooling == self.pooling and normalize == self.normalize and not skip
        rows, stats_parts = self._run(texts, batch_size, truncate, keep_tokens=False,
                                      pooling=None if on_device else pooling, skip=skip)
        if rows:
            out = np.stack(rows).astype(np.float32, copy=False)
            if normalize and not on_device:
                out = l2_normalize(out)
        stats = dataclasses.replace(stats_parts, seconds=round(time.perf_counter() - started, 6))
        return EncodeResult(out, stats)

    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 32, normalize: bool | None = None,
                   pooling: str | None = None, truncate: bool | None = None) -> np.ndarray:
        """:meth:`encode` for pre-tokenized input (one list of token ids per text, special tokens
        included; token type 0) — OpenAI's embeddings API accepts token arrays too."""
        return self.encode_with_stats(_TokenIds(ids), batch_size, normalize, pooling, truncate).embeddings

    @property
    def is_classifier(self) -> bool:
        """A sequence-classification artifact (cross-encoder, re-ranker, classifier): ``score`` and
        ``classify``, no embeddings."""
        return bool(self.labels)

    def predict(self, inputs: Sequence[str | tuple[str, str]], batch_size: int = 32, raw: bool = False,
                truncate: bool | None = None) -> tuple[np.ndarray, EncodeStats]:
        """A classifier's scores ``float32 [n, labels]`` for texts or ``(text, text_pair)`` pairs, in
        order, after the head's activation (``raw``: the logits) — and the call's stats."""
        if not self.is_classifier:
            raise InvalidRequestError(f"{self.artifact.path.name} is an embedding model, not a classifier",
                                      expected="an artifact converted from a *ForSequenceClassification checkpoint",
                                      fix="use encode() for embeddings, or convert a re-ranker / classifier")
        started = time.perf_counter()
        rows, stats = self._run(_Pairs(inputs), batch_size, truncate, keep_tokens=False, pooling=None)
        logits = np.stack(rows).astype(np.float32, copy=False)
        scores = logits if raw else activate(logits, self.activation)
        return scores, dataclasses.replace(stats, seconds=round(time.perf_counter() - started, 6))

    def score(self, query: str, passages: Sequence[str], batch_size: int = 32, raw: bool = False) -> np.ndarray:
        """A re-ranker's relevance of each passage to ``query``: ``float32 [n]`` (sigmoid of the
        one logit unless the checkpoint names another activation; ``raw``: the logit), as
        sentence-transformers' ``CrossEncoder.predict([(query, p) for p in passages])``."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("query must be a non-empty string", got=repr(query)[:60])
        if isinstance(passages, str) or not isinstance(passages, (list, tuple)):
            raise InvalidRequestError("passages must be a list of strings", got=type(passages).__name__)
        if len(self.labels) != 1:
            raise InvalidRequestError(f"{self.artifact.path.name} has {len(self.labels)} labels, not one relevance "
                                      "score", expected="a re-ranker (num_labels 1)",
                                      fix="use classify() for a multi-label classifier")
        scores, _ = self.predict([(query, p) for p in passages], batch_size=batch_size, raw=raw)
        return scores[:, 0]

    def classify(self, texts: Sequence[str] | str, batch_size: int = 32) -> list[dict[str, float]]:
        """Each text's label probabilities (``{label: score}``, the head's activation applied)."""
        items = [texts] if isinstance(texts, str) else texts
        scores, _ = self.predict(items, batch_size=batch_size)
        return [dict(zip(self.labels, map(float, row))) for row in scores]

    def encode_tokens(self, texts: Sequence[str] | str, batch_size: int = 32,
                      truncate: bool | None = None) -> list[np.ndarray]:
        """Token-level hidden states: one ``float32 [tokens_i, hidden]`` per text (no padding rows)."""
        rows, _ = self._run(texts, batch_size, truncate, keep_tokens=True, pooling="mean")
        return rows

    def close(self) -> None:
        """Release the session (idempotent); later calls raise."""
        self._closed = True
        self._session = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------
    # The loop: tokenize, bucket by length, run, restore order

    def _check_texts(self, texts: Sequence[str] | str, batch_size: int) -> list[Any]:
        if self._closed:
            raise GenerationError("the encoder is closed", fix="load it again with Encoder.load")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidRequestError("invalid batch_size", expected="an integer >= 1", got=repr(batch_size))
        if isinstance(texts, _TokenIds):
            return self._check_ids(texts)
        if isinstance(texts, _Pairs):
            return self._check_pairs(texts)
        if self.is_classifier:
            raise InvalidRequestError(f"{self.artifact.path.name} is a classifier / re-ranker and has no embeddings",
                                      expected="an embedding model for encode()",
                                      fix="use score(query, passages) or classify(texts)")
        items = [texts] if isinstance(texts, str) else texts
        if not isinstance(items, (list, tuple)):
            raise InvalidRequestError("texts must be a string or a list of strings",
                                      got=type(texts).__name__, fix="pass a list of str")
        if not items:
            raise InvalidRequestError("no texts to encode", expected="at least one string", got="an empty list")
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise InvalidRequestError(f"texts[{i}] is not a string", expected="str", got=type(text).__name__,
                                          fix="convert every item to str before encoding")
            if not text.strip():
                raise InvalidRequestError(f"texts[{i}] is empty", expected="a non-empty string", got=repr(text),
                                          fix="drop empty strings before encoding")
        return list(items)

    def _check_pairs(self, inputs: _Pairs) -> list[Any]:
        if not inputs:
            raise InvalidRequestError("no inputs to score", expected="at least one text or pair", got="an empty list")
        out: list[Any] = []
        for i, item in enumerate(inputs):
            parts = [item] if isinstance(item, str) else item
            if not isinstance(parts, (list, tuple)) or len(parts) not in (1, 2) \
                    or not all(isinstance(p, str) and p.strip() for p in parts):
                raise InvalidRequestError(f"inputs[{i}] is not a non-empty text or a pair of non-empty texts",
                                          got=repr(item)[:80], fix="pass a string or [text, text_pair]")
            out.append(parts[0] if len(parts) == 1 else (parts[0], parts[1]))
        return out

    def _check_ids(self, ids: _TokenIds) -> list[np.ndarray]:
        if not ids:
            raise InvalidRequestError("no token ids to encode", expected="at least one list of ids",
                                      got="an empty list")
        vocab = int(self.artifact.architecture.get("vocab") or 0)
        rows: list[np.ndarray] = []
        for i, row in enumerate(ids):  # vectorized per row, not per id
            values = np.asarray(row) if isinstance(row, (list, tuple, np.ndarray)) else None
            if values is None or values.ndim != 1 or not values.size or values.dtype.kind not in "iu":
                raise InvalidRequestError(f"ids[{i}] is not a non-empty list of integers", got=repr(row)[:80],
                                          fix="pass one list of token ids per text")
            if values.min() < 0 or (vocab and values.max() >= vocab):
                bad = values[(values < 0) | (values >= vocab)] if vocab else values[values < 0]
                raise InvalidRequestError(f"ids[{i}] has token ids outside the vocabulary",
                                          expected=f"0 ≤ id < {vocab}", got=str(bad[:4].tolist()))
            rows.append(values.astype(np.int64, copy=False))
        return rows

    def _run(self, texts: Sequence[str] | str, batch_size: int, truncate: bool | None, keep_tokens: bool,
             pooling: str | None, skip: int = 0) -> tuple[list[np.ndarray], EncodeStats]:
        items = self._check_texts(texts, batch_size)
        truncate = self.truncate if truncate is None else truncate
        if isinstance(texts, _TokenIds):
            encodings: list[Any] = [_Tokens(row, self.max_length) for row in items]
        else:
            encodings = self.tokenizer.encode_batch(items)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut and not truncate:
            raise InvalidRequestError(
                f"{len(cut)} text(s) are longer than the model's maximum (first: texts[{cut[0]}])",
                expected=f"at most {self.max_length} tokens", got="longer",
                fix="shorten or split them, or pass truncate=True to cut them")
        if cut:
            log.warning("truncated %d of %d text(s) to %d tokens (first: texts[%d])",
                        len(cut), len(items), self.max_length, cut[0])
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(-lengths, kind="stable")  # longest first: the first batch fails fast on memory
        rows: list[np.ndarray | None] = [None] * len(items)
        padded = 0
        batches = 0
        for start in range(0, len(items), batch_size):
            index = order[start:start + batch_size]
            width = int(lengths[index].max())
            ids = np.zeros((len(index), width), dtype=np.int64)
            mask = np.zeros((len(index), width), dtype=np.int64)
            types = np.zeros((len(index), width), dtype=np.int64)
            for r, i in enumerate(index):
                e = encodings[i]
                n = len(e.ids)
                ids[r, :n] = e.ids
                mask[r, :n] = 1
                if self._type_ids:
                    types[r, :n] = e.type_ids
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            # pooling None: the graph's own pooling head (the model's configuration), on the device
            output = POOLED_OUTPUT if pooling is None and not keep_tokens else "last_hidden_state"
            if self.is_classifier:
                output = "logits"
            hidden = self._infer({k: v for k, v in feeds.items() if k in self._input_names}, output)
            padded += ids.size
            batches += 1
            if keep_tokens:
                for r, i in enumerate(index):
                    rows[i] = hidden[r, : lengths[i]].astype(np.float32, copy=True)
            else:
                if skip:  # include_prompt false: the prompt's positions do not enter the pooling
                    mask = mask.copy()
                    mask[:, :skip] = 0
                pooled = hidden if output != "last_hidden_state" else pool(hidden, mask, pooling or self.pooling)
                for r, i in enumerate(index):
                    rows[i] = pooled[r]
        unsorted = sum(int(lengths[s:s + batch_size].max()) * len(lengths[s:s + batch_size])
                       for s in range(0, len(items), batch_size))
        stats = EncodeStats(texts=len(items), batches=batches, tokens=int(lengths.sum()), padded_tokens=padded,
                            unsorted_padded_tokens=unsorted, truncated=len(cut), seconds=0.0)
        with self._lock:
            self.calls += 1
        log.debug("encoded %d texts in %d batches: %d tokens, %d padded (input order: %d, %.0f%% saved)",
                  stats.texts, batches, stats.tokens, padded, unsorted, 100 * stats.padding_saved)
        return rows, stats  # type: ignore[return-value]

    def _infer(self, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        session = self._session
        if session is None:
            raise GenerationError("the encoder is closed", fix="load it again with Encoder.load")
        try:
            return session.run([output], feeds)[0]
        except _ORT_ERRORS as exc:
            raise GenerationError("onnxruntime failed to run the encoder", got=error_line(exc),
                                  fix="check the artifact with `lmforge verify`; report it with --debug") from exc
