"""``Engine``: load an lmforge artifact and generate with ONNX Runtime alone.

The loop has gpt-fast's shape — :meth:`Engine.start` (validate, allocate), :meth:`Engine.prefill`,
:meth:`Engine.decode_step`, and :meth:`Engine.generate` / :meth:`Engine.stream` on top — and is
IO-bound (``kv_mode: concat``):

* Every tensor of a step lives on the engine's device as an ``OrtValue``. The decoder's
  ``present.{i}.*`` outputs are bound with ``bind_output(name, device)`` and become the next
  step's ``past_key_values.{i}.*`` inputs as they are: no KV tensor crosses between host and
  device inside the loop.
* The sampler (:mod:`runtime.sampler_graph`) runs on the same device right after the decoder,
  reading its logits in place, and writes the next step's ``input_ids``, ``attention_mask`` and
  ``position_ids`` itself; its per-row parameters, repetition mask and all its uniforms were
  uploaded once, before prefill.
* The only per-step transfer is the ``[batch]`` int64 vector of new token ids, read to the host
  for the stop checks (EOS, stop ids, stop strings, length) and detokenization.
* A row that finishes is released at once (its result is yielded to the caller while the others
  continue) and the batch is compacted: the KV cache and every per-row tensor are gathered on
  the device by one run of a small gather graph (:mod:`runtime.compact_graph`), so finished rows
  cost no further compute.

Compact vs keep-running, measured on CPU (2 cores, onnxruntime 1.31, fp32, batch 8, 16-token
prompts, row r stopping after 16·(r+1) new tokens, greedy; wall time of the whole batch, median
of 3 after a warm-up; ``tests/runtime/bench_compact.py``):

==========================================  ============  =============  ============
model                                       compact rows  keep all rows  keep/compact
==========================================  ============  =============  ============
tiny:llama (2 layers, 96 wide, vocab 320)   198 ms        246 ms         1.24×
llama 8 layers × 512 wide, vocab 32,000     5.62 s        7.71 s         1.37×
==========================================  ============  =============  ============

The gather costs one copy of the KV cache per finishing step, a few per batch; keeping finished
rows costs their full decoder and sampler compute on every later step. Compaction is the default
(``Engine.compact_finished_rows = False`` keeps rows, for measurements).

Per-step split on the same CPU for the 8 × 512 model (128 new tokens): greedy batch 1 — decoder
37.2 ms, sampler 1.0 ms, host 0.25 ms; greedy batch 8 — 68.4 / 6.6 / 1.5 ms; top-k 50 batch 8 —
51.9 / 5.8 / 1.3 ms. Top-p *without* top-k sorts the whole vocabulary (``TopK(k = vocab)``, the
exact nucleus): 12.7 ms a step at batch 1, 85 ms at batch 8 on CPU, most of it in ORT's CPU TopK;
pairing top-p with a top-k bounds it (what transformers' defaults do, top_k=50).

Batches are left-padded: ``attention_mask`` is 0 on pads and ``position_ids`` = cumsum(mask) − 1
clipped at 0. Prefill feeds the KV inputs with a 0-sized past axis. The engine feeds exactly the
inputs listed in the manifest's ``io.inputs`` (BLOOM has no ``position_ids``) and reads the KV
names from its ``kv`` templates; it never guesses from tensor names.

Thread safety: the ``InferenceSession`` objects are shared; each call builds its own IO bindings
and buffers (:class:`DecodeState`), so several threads may call the engine at once. Every
request is validated before anything is allocated; a failure inside onnxruntime (out of memory
included) fails that call only, and the engine stays usable.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from runtime.artifact import Artifact, KvMode, load_artifact
from runtime.chat import load_chat_template, render_chat, special_tokens
from runtime.compact_graph import COMPACT_INDEX, build_compact_model
from runtime.detokenize import IncrementalDetokenizer, StopStrings
from runtime.errors import GenerationError
from runtime.sampler_graph import build_sampler_model
from runtime.sampling import GREEDY, SamplingParams, sampler_arrays

__all__ = ["Engine", "GenerationResult", "FinishReason", "DecodeState", "Prompt"]

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]
"""A prompt: text (encoded with the artifact's tokenizer) or token ids."""

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_ROW_STATE = ("temperature", "top_k", "top_p", "repetition_penalty", "min_new_tokens", "stop_mask", "seen")
_ORT_ERRORS: tuple[type[BaseException], ...] = (MemoryError, RuntimeError) + tuple(
    cls for cls in vars(_ort_state).values() if isinstance(cls, type) and issubclass(cls, Exception)
)


class FinishReason(str, enum.Enum):
    """Why a request stopped."""

    EOS = "eos"  # sampled one of the manifest's EOS ids
    STOP_TOKEN = "stop_token"  # sampled one of the request's stop_token_ids
    STOP_STRING = "stop_string"  # the text reached one of the request's stop strings
    LENGTH = "length"  # max_new_tokens reached


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One request's output, counts and timings.

    ``token_ids`` are the new tokens, the final EOS / stop token included (as transformers
    returns them); ``text`` excludes it and is cut before a stop string. ``ttft_s`` is the time
    from the call to the first token on the host; ``decode_tokens_per_s`` counts the tokens after
    the first over the time after it.
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    finish_reason: FinishReason
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    step_logits: np.ndarray | None = None
    """Only with ``return_logits=True``: the last-position logits of every step, ``[new_tokens, vocab]``
    float32 on the host (row ``t`` is what the token of step ``t`` was chosen from; for parity checks)."""


@dataclasses.dataclass
class _Row:
    index: int  # position in the caller's list
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer | None
    stops: StopStrings
    max_new: int
    new_ids: list[int] = dataclasses.field(default_factory=list)
    step_logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    done: bool = False
    t_first: float = 0.0


@dataclasses.dataclass
class _Event:
    index: int
    piece: str
    result: GenerationResult | None


@dataclasses.dataclass
class DecodeState:
    """One batch in flight: its rows, device tensors and IO bindings (never shared across calls)."""

    rows: list[_Row]
    max_new_tokens: int
    feeds: dict[str, ort.OrtValue]  # the decoder's next inputs, by graph input name
    sampler: dict[str, ort.OrtValue]  # the sampler's per-row and per-batch state
    decoder_binding: Any
    sampler_binding: Any
    started: float
    steps: int = 0
    keep_logits: bool = False  # copy each step's last-position logits to the host (parity checks only)
    last_logits: np.ndarray | None = None  # [batch, vocab] float32, this step's, when keep_logits


def _installed_onnxruntime() -> str:
    """Which onnxruntime distribution provides the module (for the CUDA error message)."""
    found = []
    for dist in ("onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-qnn", "ort-nightly-gpu", "ort-nightly"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found) or f"onnxruntime {ort.__version__} (distribution unknown)"


def _providers(device: str) -> tuple[list[Any], str]:
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if device == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise GenerationError(
                "device='cuda' needs onnxruntime's CUDAExecutionProvider, which is not available",
                expected="CUDAExecutionProvider among the providers",
                got=f"{', '.join(available)} from {_installed_onnxruntime()}",
                fix="pip uninstall onnxruntime && pip install onnxruntime-gpu (matching your CUDA), "
                "or use device='cpu'",
            )
        return [("CUDAExecutionProvider", {"device_id": 0, **_cuda_options_from_env()}), "CPUExecutionProvider"], "cuda"
    raise GenerationError("unknown device", expected="'cpu' or 'cuda'", got=repr(device))


def _cuda_options_from_env() -> dict[str, str]:
    """Extra CUDA provider options from ``LMFORGE_CUDA_PROVIDER_OPTIONS`` ("key=value,key=value"),
    e.g. ``sdpa_kernel=1`` to pick onnxruntime's attention kernels; for measurements."""
    raw = os.environ.get("LMFORGE_CUDA_PROVIDER_OPTIONS", "").strip()
    options = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GenerationError("LMFORGE_CUDA_PROVIDER_OPTIONS is malformed", expected="key=value,key=value",
                                  got=repr(raw), fix="fix or unset the environment variable")
        options[key.strip()] = value.strip()
    return options


def read_decoder_manifest(artifact: Artifact, layers: int) -> tuple[frozenset[int], int, str, list[str], list[str]]:
    """EOS ids, pad id, KV dtype and the per-layer past/present names a decoder manifest declares
    (shared by both KV contracts' engines)."""
    manifest = artifact.manifest
    generation = manifest.get("generation", {})
    eos = frozenset(int(i) for i in generation.get("eos_token_ids") or [])
    pad = generation.get("pad_token_id")
    pad_id = int(pad) if pad is not None else (min(eos) if eos else 0)
    kv = manifest.get("kv", {})
    kv_dtype = str(kv.get("dtype", "float32"))
    if kv_dtype not in _NP_DTYPES:
        raise GenerationError(f"artifact {artifact.path}: unsupported KV dtype", expected="float32 or float16",
                              got=kv_dtype, fix="re-export the artifact")
    try:
        past = [kv[k].format(i=i) for i in range(layers) for k in ("past_key", "past_value")]
        present = [kv[k].format(i=i) for i in range(layers) for k in ("present_key", "present_value")]
    except (KeyError, AttributeError) as exc:
        raise GenerationError(f"artifact {artifact.path}: manifest 'kv' lacks the KV name templates",
                              got=repr(kv), fix="re-export the artifact") from exc
    return eos, pad_id, kv_dtype, past, present


class Engine:
    """A loaded decoder artifact and its sessions; see the module docstring for the loop."""

    def __init__(self, artifact: Artifact, device: str = "cpu") -> None:
        if not artifact.is_decoder or artifact.kv_mode is KvMode.NONE:
            raise GenerationError(
                f"artifact {artifact.path} is an encoder; Engine generates with decoders only",
                fix="load a decoder artifact",
            )
        if artifact.kv_mode is KvMode.SHARED_BUFFER:
            raise GenerationError(
                f"artifact {artifact.path} uses kv_mode 'shared-buffer', which Engine(...) does not run",
                expected="kv_mode 'concat'",
                fix="open it with Engine.load (a runtime.shared_kv.SharedBufferEngine)",
            )
        providers, self.device_type = _providers(device)
        if self.device_type == "cuda" and artifact.precision == "fp32":
            # An fp32 artifact promises fp32 numerics (the parity policy holds logits to 1e-3);
            # the CUDA provider's TF32 matmuls would round inputs to 10 mantissa bits.
            providers[0][1]["use_tf32"] = "0"
        self.device = device
        self.artifact = artifact
        arch = artifact.architecture
        self.vocab = int(arch["vocab"])
        self.max_context = int(arch["max_context"])
        self.layers = int(arch["layers"])
        self.compact_finished_rows = True
        (self.eos_token_ids, self.pad_token_id, self.kv_dtype,
         self._past, self._present) = read_decoder_manifest(artifact, self.layers)
        self._inputs = {t.name: t for t in artifact.inputs}
        known = {"input_ids", "attention_mask", "position_ids", *self._past}
        unknown = sorted(set(self._inputs) - known)
        missing = [n for n in ("input_ids", "attention_mask", *self._past) if n not in self._inputs]
        if unknown or missing:
            raise GenerationError(
                f"artifact {artifact.path}: io.inputs does not follow the concat contract",
                expected="input_ids, attention_mask, [position_ids], " + ", ".join(self._past[:2]) + ", …",
                got=f"unknown {unknown}, missing {missing}",
                fix="re-export the artifact",
            )
        outputs = {t.name: t for t in artifact.outputs}
        if "logits" not in outputs:
            raise GenerationError(f"artifact {artifact.path}: io.outputs has no 'logits'", fix="re-export the artifact")
        self._logits_dtype = outputs["logits"].dtype
        self._output_names = ["logits", *self._present]

        self._session = self._open(str(artifact.model_path), providers)
        graph_inputs = {i.name for i in self._session.get_inputs()}
        if graph_inputs != set(self._inputs):
            raise GenerationError(
                f"artifact {artifact.path}: the manifest's io.inputs and model.onnx disagree",
                expected=str(sorted(self._inputs)), got=str(sorted(graph_inputs)), fix="re-export the artifact",
            )
        self._open_helpers(artifact, providers,
                           [(n, self._inputs[n].dtype, len(self._inputs[n].shape), 0) for n in self._inputs])
        log.info("loaded %s on %s (%d layers, vocab %d, max context %d)", artifact.path, device,
                 self.layers, self.vocab, self.max_context)

    def _open_helpers(self, artifact: Artifact, providers: list[Any],
                      row_tensors: list[tuple[str, str, int, int]]) -> None:
        """What both KV contracts' engines share: the sampler graph, the row-compaction graph over
        ``row_tensors`` (the decoder's per-row tensors; the sampler's are appended here), the
        tokenizer and the chat template."""
        self._sampler = self._open(build_sampler_model(self._logits_dtype), providers, small=True)
        row_tensors = [*row_tensors, *((n, self._sampler_dtype(n), 2 if n in ("stop_mask", "seen") else 1, 0)
                                       for n in _ROW_STATE), ("uniforms", "float32", 2, 1)]
        self._compact_names = [t[0] for t in row_tensors]
        self._compact = self._open(build_compact_model(row_tensors), providers, small=True)
        self.tokenizer = self._load_tokenizer(artifact.tokenizer_dir)
        self.chat_template = load_chat_template(artifact.tokenizer_dir)
        self._special_tokens = special_tokens(artifact.tokenizer_dir)

    # ----------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu", verify_hashes: bool = True,
             cuda_graph: bool = False) -> Engine:
        """Validate the artifact folder (:func:`runtime.artifact.load_artifact`) and open it.

        A ``kv_mode: "shared-buffer"`` artifact opens as :class:`runtime.shared_kv.SharedBufferEngine`;
        ``cuda_graph=True`` (``device="cuda"``, shared-buffer only) captures its decode step.
        """
        _providers(device)  # a wrong device fails before hashing gigabytes
        artifact = load_artifact(path, verify_hashes=verify_hashes)
        if artifact.kv_mode is KvMode.SHARED_BUFFER:
            from runtime.shared_kv import SharedBufferEngine

            return SharedBufferEngine(artifact, device=device, cuda_graph=cuda_graph)
        if cuda_graph:
            raise GenerationError(
                "cuda_graph=True needs a kv_mode 'shared-buffer' artifact (fixed-size KV buffers)",
                got=f"kv_mode {artifact.kv_mode.value!r}",
                fix="`lmforge optimize ARTIFACT -o OUT --device cuda` (Llama family), or leave cuda_graph off",
            )
        return cls(artifact, device=device)

    @staticmethod
    def _sampler_dtype(name: str) -> str:
        return {"top_k": "int64", "min_new_tokens": "int64", "stop_mask": "bool", "seen": "bool"}.get(name, "float32")

    def _open(self, model: str | bytes, providers: list[Any], small: bool = False,
              weights_dir: Path | None = None) -> ort.InferenceSession:
        """A session on ``model`` (a path, or bytes whose external data lives in ``weights_dir``)."""
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if weights_dir is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
        if self.device_type == "cpu":
            # Spinning intra-op threads wait on each other at every op when another process holds a
            # core: measured on the 2-core dev machine, fused SmolLM2 fp32 decoded 9.5 tok/s spinning
            # vs 14.3 without under load, and was no slower without on the quiet machine.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if small and self.device_type == "cpu":
            options.intra_op_num_threads = 1  # helper graphs: thread wake-ups cost more than they save
        try:
            return ort.InferenceSession(model, sess_options=options, providers=providers)
        except _ORT_ERRORS as exc:
            raise GenerationError(
                "onnxruntime cannot open the model", got=str(exc).splitlines()[0][:300],
                fix="re-export the artifact, or check the onnxruntime version",
            ) from exc

    @staticmethod
    def _load_tokenizer(folder: Path) -> Any:
        path = folder / "tokenizer.json"
        if not path.is_file():
            log.info("no tokenizer.json in %s: only token-id prompts will work", folder)
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))

    # ----------------------------------------------------------------------------------------
    # Text helpers

    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise GenerationError(
                f"{what} needs the artifact's tokenizer, and {self.artifact.tokenizer_dir}/tokenizer.json is missing",
                fix="pass token ids to generate_ids, or re-export the artifact with its tokenizer",
            )
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` with the artifact's tokenizer."""
        return list(self._need_tokenizer("text prompts").encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._need_tokenizer("decoding").decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``, rendered with the artifact's template in the sandbox."""
        if self.chat_template is None:
            raise GenerationError(
                f"artifact {self.artifact.path} has no chat template",
                expected="tokenizer/chat_template.jinja or chat_template in tokenizer_config.json",
                fix="use generate() with a plain prompt, or export an instruct model",
            )
        return render_chat(self.chat_template, messages, self._special_tokens, add_generation_prompt)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of the chat prompt (the template writes the special tokens itself)."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    # ----------------------------------------------------------------------------------------
    # Public API

    def generate_results(
        self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 128,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None, *, return_logits: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt (one left-padded batch); results in the prompts' order.

        ``return_logits=True`` also copies every step's last-position logits to the host
        (``GenerationResult.step_logits``): one device-to-host copy of ``[batch, vocab]`` a step
        (of ``[batch, seq, vocab]`` at prefill), for parity checks, never for serving.
        """
        state = self.start(prompts, max_new_tokens, sampling, return_logits=return_logits)
        results: list[GenerationResult | None] = [None] * len(state.rows)
        for event in self._events(state):
            if event.result is not None:
                results[event.index] = event.result
        return [r for r in results if r is not None]

    def generate(
        self, prompts: str | Sequence[str], max_new_tokens: int = 128,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[str]:
        """Generated texts for ``prompts`` (a string counts as a list of one)."""
        return [r.text for r in self.generate_results(prompts, max_new_tokens, sampling)]

    def generate_ids(
        self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 128,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[list[int]]:
        """New token ids for each prompt of token ids (the final EOS / stop token included)."""
        if isinstance(prompt_ids, (str, bytes)) or not all(not isinstance(p, (str, bytes)) for p in prompt_ids):
            raise GenerationError("generate_ids takes lists of token ids", got=repr(prompt_ids)[:80],
                                  fix="use generate() for text prompts")
        return [list(r.token_ids) for r in self.generate_results(list(prompt_ids), max_new_tokens, sampling)]

    def stream(
        self, prompt: Prompt, max_new_tokens: int = 128, sampling: SamplingParams | None = None,
    ) -> Iterator[str]:
        """Text pieces of one request as they become certain; ''.join(pieces) == generate()'s text.

        The request is validated and its buffers allocated now; generation starts at the first
        ``next()``, and closing the iterator early releases the buffers.
        """
        self._need_tokenizer("streaming text")
        state = self.start([prompt], max_new_tokens, sampling)
        return (e.piece for e in self._events(state) if e.piece)

    def chat(
        self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
    ) -> str:
        """The assistant's reply to ``messages`` (the artifact's chat template, sandboxed)."""
        return self.generate_results([self.chat_ids(messages)], max_new_tokens, sampling)[0].text

    # ----------------------------------------------------------------------------------------
    # Validation (before anything is allocated)

    def _validate(
        self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int,
        sampling: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[_Row]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and all(isinstance(t, (int, np.integer)) for t in prompts)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        if isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise GenerationError("no prompts", expected="a prompt or a non-empty list of prompts",
                                  got=repr(prompts)[:80])
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise GenerationError("invalid max_new_tokens", expected="an integer > 0", got=repr(max_new_tokens))
        if sampling is None:
            params = [GREEDY] * len(prompts)
        elif isinstance(sampling, SamplingParams):
            params = [sampling] * len(prompts)
        else:
            params = list(sampling)
            if len(params) != len(prompts):
                raise GenerationError("one SamplingParams per prompt", expected=str(len(prompts)),
                                      got=str(len(params)), fix="pass one SamplingParams for all, or one per prompt")
        rows = []
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(p, SamplingParams):
                raise GenerationError(f"request {index}: sampling must be a SamplingParams", got=type(p).__name__)
            if isinstance(prompt, str):
                if not prompt:
                    raise GenerationError(f"request {index}: the prompt is empty", expected="at least one token",
                                          fix="pass a non-empty prompt")
                ids = self.encode(prompt)
            else:
                ids = list(prompt)
            if not ids:
                raise GenerationError(f"request {index}: the prompt is empty", expected="at least one token",
                                      fix="pass a non-empty prompt")
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab]
            if bad:
                raise GenerationError(f"request {index}: token ids outside the vocabulary",
                                      expected=f"integers in [0, {self.vocab})", got=repr(bad[:5]))
            bad_stop = [t for t in p.stop_token_ids if t >= self.vocab]
            if bad_stop:
                raise GenerationError(f"request {index}: stop_token_ids outside the vocabulary",
                                      expected=f"integers in [0, {self.vocab})", got=repr(bad_stop[:5]))
            if len(ids) + max_new_tokens > self.max_context:
                raise GenerationError(
                    f"request {index}: prompt + max_new_tokens exceeds the artifact's max context",
                    expected=f"<= {self.max_context} tokens",
                    got=f"{len(ids)} + {max_new_tokens} = {len(ids) + max_new_tokens}",
                    fix="shorten the prompt or lower max_new_tokens",
                )
            if p.stop and self.tokenizer is None:
                self._need_tokenizer("stop strings")
            ids = [int(t) for t in ids]
            detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
            stop_ids = frozenset(self.eos_token_ids | set(p.stop_token_ids))
            rows.append(_Row(index=index, prompt=ids, params=p, stop_ids=stop_ids, detok=detok,
                             stops=StopStrings(p.stop), max_new=int(max_new_tokens)))
        return rows

    # ----------------------------------------------------------------------------------------
    # The loop

    def _put(self, array: np.ndarray) -> ort.OrtValue:
        if not array.flags.c_contiguous:
            array = array.copy()  # (np.ascontiguousarray would turn the 0-d ``step`` into shape [1])
        return ort.OrtValue.ortvalue_from_numpy(array, self.device_type, 0)

    def start(
        self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 128,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None, *, return_logits: bool = False,
    ) -> DecodeState:
        """Validate the requests, then allocate their batch: left-padded inputs, an empty past and
        the sampler's state (one upload). Drive it with :meth:`prefill` and :meth:`decode_step`."""
        state = self._allocate(self._validate(prompts, max_new_tokens, sampling), max_new_tokens)
        state.keep_logits = bool(return_logits)
        return state

    def _allocate(self, rows: list[_Row], max_new_tokens: int) -> DecodeState:
        batch, longest = len(rows), max(len(r.prompt) for r in rows)
        input_ids = np.full((batch, longest), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for b, row in enumerate(rows):
            input_ids[b, longest - len(row.prompt):] = row.prompt
            mask[b, longest - len(row.prompt):] = 1
        host: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": mask}
        if "position_ids" in self._inputs:
            host["position_ids"] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        for name in self._past:
            shape = [batch if d == "batch" else d if isinstance(d, int) else 0 for d in self._inputs[name].shape]
            host[name] = np.zeros(shape, dtype=_NP_DTYPES[self.kv_dtype])
        sampler = sampler_arrays([r.params for r in rows], [r.prompt for r in rows],
                                 [sorted(r.stop_ids) for r in rows], self.vocab, max_new_tokens)
        return DecodeState(
            rows=rows, max_new_tokens=max_new_tokens,
            feeds={k: self._put(v) for k, v in host.items()},
            sampler={k: self._put(v) for k, v in sampler.items()},
            decoder_binding=self._session.io_binding(), sampler_binding=self._sampler.io_binding(),
            started=time.perf_counter(),
        )

    def _run(self, session: ort.InferenceSession, binding: Any, inputs: Mapping[str, ort.OrtValue],
             outputs: Sequence[str]) -> dict[str, ort.OrtValue]:
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.device_type, 0)
        try:
            session.run_with_iobinding(binding)
        except _ORT_ERRORS as exc:
            raise GenerationError(
                "generation failed inside onnxruntime", got=str(exc).splitlines()[0][:300],
                fix="this request failed and the engine stays usable; on out-of-memory, use fewer or shorter prompts",
            ) from exc
        return dict(zip(outputs, binding.get_outputs()))

    def _forward(self, state: DecodeState) -> np.ndarray:
        """Decoder then sampler, all on the device; return the new ids ``[batch]`` on the host."""
        out = self._run(self._session, state.decoder_binding, state.feeds, self._output_names)
        if state.keep_logits:  # left-padded, so the last position is every row's newest token
            state.last_logits = np.array(out["logits"].numpy()[:, -1, :], dtype=np.float32)
        sampler_in = dict(state.sampler)
        sampler_in["logits"] = out["logits"]
        sampler_in["attention_mask"] = state.feeds["attention_mask"]
        nxt = self._run(self._sampler, state.sampler_binding, sampler_in,
                        ("next_ids", "next_attention_mask", "next_position_ids", "seen_out", "step_out"))
        feeds = {"input_ids": nxt["next_ids"], "attention_mask": nxt["next_attention_mask"]}
        if "position_ids" in self._inputs:
            feeds["position_ids"] = nxt["next_position_ids"]
        feeds.update(zip(self._past, (out[n] for n in self._present)))
        state.feeds = feeds
        state.sampler["seen"] = nxt["seen_out"]
        state.sampler["step"] = nxt["step_out"]
        state.steps += 1
        return np.array(nxt["next_ids"].numpy(), dtype=np.int64).reshape(-1)  # the one host read

    def prefill(self, state: DecodeState) -> np.ndarray:
        """Run the prompts (past length 0); return each row's first new token id."""
        if state.steps != 0:
            raise GenerationError("prefill on a batch that already started", fix="call start() again")
        return self._forward(state)

    def decode_step(self, state: DecodeState) -> np.ndarray:
        """One token for every row still in the batch."""
        return self._forward(state)

    def _drop_rows(self, state: DecodeState, keep: list[int]) -> None:
        """Gather the kept rows of every per-row tensor on the device (one run)."""
        inputs = {COMPACT_INDEX: self._put(np.asarray(keep, dtype=np.int64))}
        for name in self._compact_names:
            inputs[name] = state.feeds[name] if name in state.feeds else state.sampler[name]
        out = self._run(self._compact, self._compact.io_binding(), inputs, [f"{n}__kept" for n in self._compact_names])
        for name in self._compact_names:
            target = state.feeds if name in state.feeds else state.sampler
            target[name] = out[f"{name}__kept"]
        state.rows = [state.rows[i] for i in keep]
        k_cap = max(r.params.candidates(self.vocab) for r in state.rows)
        state.sampler["k_cap"] = self._put(np.array([k_cap], dtype=np.int64))

    def _finish(self, state: DecodeState, row: _Row, reason: FinishReason, now: float) -> tuple[str, GenerationResult]:
        piece = ""
        if row.detok is not None and reason is not FinishReason.STOP_STRING:
            piece = row.stops.add(row.detok.flush())
            if row.stops.stopped:
                reason = FinishReason.STOP_STRING
            piece += row.stops.finish()
        row.done = True
        n = len(row.new_ids)
        decode_s = now - row.t_first
        return piece, GenerationResult(
            text=row.stops.text, token_ids=tuple(row.new_ids), prompt_tokens=len(row.prompt), new_tokens=n,
            finish_reason=reason, ttft_s=row.t_first - state.started,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=now - state.started,
            step_logits=np.stack(row.step_logits) if row.step_logits else None,
        )

    def _accept(self, state: DecodeState, ids: np.ndarray) -> Iterator[_Event]:
        """Host-side bookkeeping for one step's ids: text, stop checks, finished rows."""
        now = time.perf_counter()
        for b, (row, token) in enumerate(zip(state.rows, ids.tolist())):
            if row.done:
                continue
            if not row.new_ids:
                row.t_first = now
            row.new_ids.append(token)
            if state.last_logits is not None:
                row.step_logits.append(state.last_logits[b])
            piece, reason = "", None
            if token in row.stop_ids:
                reason = FinishReason.EOS if token in self.eos_token_ids else FinishReason.STOP_TOKEN
            else:
                if row.detok is not None:
                    piece = row.stops.add(row.detok.push(token))
                if row.stops.stopped:
                    reason = FinishReason.STOP_STRING
                elif len(row.new_ids) >= row.max_new:
                    reason = FinishReason.LENGTH
            result = None
            if reason is not None:
                tail, result = self._finish(state, row, reason, now)
                piece += tail
            if piece or result is not None:
                yield _Event(row.index, piece, result)

    def _events(self, state: DecodeState) -> Iterator[_Event]:
        """Prefill, then decode until every row finished; yield text pieces and results."""
        log.debug("batch of %d, longest prompt %d, max_new_tokens %d", len(state.rows),
                  max(len(r.prompt) for r in state.rows), state.max_new_tokens)
        block = [self.prefill(state)]
        while True:
            for ids in block:
                yield from self._accept(state, ids)
            live = [i for i, r in enumerate(state.rows) if not r.done]
            if not live:
                return
            if self.compact_finished_rows and len(live) < len(state.rows):
                self._drop_rows(state, live)
            block = self._decode_block(state)

    def _decode_block(self, state: DecodeState) -> list[np.ndarray]:
        """The next steps' ids, one ``[batch]`` array a step. Here one step; an engine that reads
        ids back only every few steps (:class:`runtime.shared_kv.SharedBufferEngine`) returns
        several, and rows that finished inside the block ignore the rest (``_accept``)."""
        return [self.decode_step(state)]
