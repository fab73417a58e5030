"""``Engine``: one scheduling loop over a KV backend, many callers.

Shaped like gpt-fast's ``generate.py``, built for services::

    submit() ──▶ queue ──▶ loop thread:  admit (prefill)  →  decode a block  →  retire
      (any thread, asyncio)             └──────────────── once per step boundary ─────┘

* Callers (any thread, or asyncio) :meth:`Engine.submit` a request — prompt, ``max_new_tokens``,
  :class:`~runtime.sampling.SamplingParams` (per-request temperature, top-k/p, min-p, penalties,
  stops, seed) and an optional deadline — and read its tokens from the returned
  :class:`~runtime.request.Request`. Validation and tokenization run in the caller's thread; a
  bad request is refused (:class:`~runtime.errors.InvalidRequestError`) before it takes a slot,
  and past ``max_queue`` waiting requests a submit fails at once
  (:class:`~runtime.errors.QueueFullError`).
* The loop owns the device. At every step boundary it admits waiting requests while slots are
  free, optionally up to a budget of prompt tokens (their prefill runs then and gives their
  first token; requests admitted together prefill together), runs one block of decode steps for
  every running request at once — greedy and sampled rows in the same batch, each with its own
  parameters — and releases finished, cancelled and expired requests at once (continuous
  batching). A request that arrives while a block runs ends it after the current step when a
  slot is free, so it waits for one step, not a block. On CUDA the next block's first step is
  launched before the host handles the ids just read (``launch_ahead``: text, stop checks and
  events run while the GPU computes). ``generate*``, ``stream`` and ``chat`` are thin callers of
  the same loop, so calls from many threads batch together.
* KV memory lives in a backend, typed as :class:`runtime.kv_backend.KvBackend` and chosen by the
  artifact's ``kv_mode`` from that module's registry (:mod:`runtime.kv_slots` for
  ``shared-buffer`` artifacts: a pool of fixed rows updated in place, the step captured as CUDA
  graphs per batch-size bucket; :mod:`runtime.kv_concat` for the portable contract: the batch
  regrouped on the device as requests come and go). The loop never branches on which one it has.
  The decoder's IO is read once from the manifest (:class:`runtime.decoder_io.DecoderIO`).
* A failure inside onnxruntime fails the requests of that step with a clear error and the loop
  keeps serving; :meth:`Engine.close` (or leaving a ``with`` block) finishes or cancels what is
  in flight and joins the thread.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union, cast

import numpy as np

from runtime.artifact import Artifact, KvMode, load_artifact
from runtime.cpu import intra_op_threads
from runtime.decoder_io import DecoderIO
from runtime.detokenize import IncrementalDetokenizer, StopStrings
from runtime.device import Device, check_device
from runtime.errors import EngineClosedError, GenerationError, InvalidRequestError, LmforgeError, QueueFullError
from runtime.kv_backend import BackendOptions, KvBackend, backend_class, open_backend
from runtime.options import DEFAULTS, EngineOptions
from runtime.request import FinishReason, GenerationResult, Request, TokenEvent
from runtime.sampler_graph import MAX_CANDIDATES
from runtime.sampling import (
    GREEDY,
    TOP_K_CANDIDATES,
    Plan,
    SamplingParams,
    generation_defaults,
    host_values,
    row_arrays,
)
from runtime.tokenizer import TextHelpers

__all__ = ["Engine", "EngineStats", "GenerationResult", "FinishReason", "Prompt"]

log = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]
"""A prompt: text (encoded with the artifact's tokenizer) or token ids."""


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of the loop, for metrics and health checks."""

    queued: int
    running: int
    max_batch: int
    max_queue: int
    steps: int
    closed: bool
    backend: str


@dataclasses.dataclass
class _Live:
    """A request in the running batch, as the loop sees it."""

    request: Request
    slot: int
    stop_ids: frozenset[int]
    detok: IncrementalDetokenizer | None
    stops: StopStrings
    admitted: float
    new_ids: list[int] = dataclasses.field(default_factory=list)
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    t_first: float = 0.0
    reason: FinishReason | None = None
    pending_ids: tuple[int, ...] = ()  # the last ids and text, sent with the result
    pending_text: str = ""


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidRequestError(f"invalid {name}", expected=f"an integer ≥ {low}", got=repr(value))
    return int(value)


class Engine(TextHelpers):
    """A loaded decoder artifact, its KV backend and its scheduling loop; see the module docstring."""

    def __init__(self, artifact: Artifact, device: str = "cpu", options: EngineOptions = DEFAULTS) -> None:
        """Start the loop over a loaded artifact (:meth:`load` validates a folder first);
        ``options``: :class:`runtime.options.EngineOptions`."""
        if not isinstance(options, EngineOptions):
            raise InvalidRequestError("options must be a runtime.EngineOptions", got=type(options).__name__,
                                      fix="Engine(artifact, device, EngineOptions(max_batch=…)), "
                                          "or Engine.load(path, max_batch=…)")
        self.options = options
        max_batch, max_queue, threads = options.max_batch, options.max_queue, options.threads
        max_context, kv_memory_gb, cuda_graph = options.max_context, options.kv_memory_gb, options.cuda_graph
        read_every, candidates = options.read_every, options.candidates
        prefill_chunk = _check_int("prefill_chunk", options.prefill_chunk, 1)
        if not artifact.is_decoder or artifact.kv_mode is KvMode.NONE:
            raise GenerationError(
                f"artifact {artifact.path} is an encoder; Engine generates with decoders only",
                fix="load it with runtime.Encoder.load(...) to compute embeddings",
            )
        self.max_batch = _check_int("max_batch", max_batch, 1)
        self.max_queue = _check_int("max_queue", max_queue, 1)
        self.device = check_device(device)
        if self.device == "cpu":
            threads = intra_op_threads(threads)  # default: the physical cores this process may use
        elif threads is not None:
            threads = _check_int("threads", threads, 1)
        self.artifact = artifact
        self.io = DecoderIO.from_artifact(artifact)
        kind = backend_class(artifact.kv_mode)
        self.vocab = self.io.vocab
        self.max_context = self.io.capacity(max_context, kv_memory_gb if kind.preallocates else None, self.max_batch)
        self.eos_token_ids: frozenset[int] = self.io.eos
        self.pad_token_id = self.io.pad_token_id
        self._device = Device(device, threads=threads, fp32_exact=artifact.precision == "fp32")
        if cuda_graph is None:
            cuda_graph = kind.captures and self.device == "cuda"
        if cuda_graph and (self.device != "cuda" or not kind.captures):
            raise GenerationError(
                "cuda_graph=True needs device='cuda' and a kv_mode 'shared-buffer' artifact (fixed-size KV buffers)",
                got=f"device={device!r}, kv_mode {artifact.kv_mode.value!r}",
                fix="`lmforge optimize ARTIFACT -o OUT --device cuda` (Llama family), or leave cuda_graph off",
            )
        self.cuda_graph = bool(cuda_graph)
        if read_every is None:  # a host read is a device sync on CUDA, and free on the CPU
            read_every = 8 if self.device == "cuda" else 1
        self.read_every = _check_int("read_every", read_every, 1)
        self.candidates = min(_check_int("candidates", candidates, 1), self.vocab)
        self.prefill_tokens = options.prefill_budget(self.device)  # None: no budget
        # a waiting request ends a block early when a slot is free (its TTFT: its prefill plus at
        # most one step); on CUDA the steps of a block are then synchronized one by one
        self.admit_within_block = True
        # the next block's first step is launched before the host handles the block just read
        # (CUDA: the GPU would idle meanwhile; the CPU computes in run() itself, so nothing to gain)
        self.launch_ahead = self.device == "cuda"
        if self.candidates > MAX_CANDIDATES:
            raise InvalidRequestError("invalid candidates", expected=f"at most {MAX_CANDIDATES}", got=str(candidates),
                                      fix="top-k / top-p read at most that many sorted candidates a step")
        self.backend: KvBackend = open_backend(artifact, self._device, self.io, BackendOptions(
            max_batch=self.max_batch, capacity=self.max_context, read_every=self.read_every,
            cuda_graph=self.cuda_graph, prefill_chunk=prefill_chunk))
        self.sampling_defaults = generation_defaults(artifact.generation_config)
        """The artifact's sampling defaults (``generation_config.json``: temperature, top-p, top-k,
        min-p, repetition penalty, max_new_tokens where present; :func:`runtime.sampling.generation_defaults`).
        The server uses them for fields a request leaves out, as vLLM does; ``generate*`` and
        ``submit`` do not (their default is greedy)."""
        self._load_text(artifact.path, artifact.tokenizer_dir)

        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._live: dict[int, _Live] = {}  # slot → request
        self._closing = False
        self._abort = False
        self.steps = 0
        self._thread = threading.Thread(target=_serve, args=(weakref.ref(self),), name="lmforge-engine", daemon=True)
        self._thread.start()
        log.info("loaded %s on %s (%s KV, %d rows, vocab %d, max context %d%s)", artifact.path, device,
                 self.backend.kind, self.max_batch, self.vocab, self.max_context,
                 ", CUDA graphs" if self.cuda_graph else "")

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu", *, verify_hashes: bool = True,
             options: EngineOptions = DEFAULTS, **overrides: Any) -> Engine:
        """Validate the artifact folder (:func:`runtime.artifact.load_artifact`) and start its loop.

        ``options`` (:class:`runtime.options.EngineOptions`, which documents each) with
        ``overrides`` applied: ``Engine.load(path, "cuda", max_batch=64)``.
        """
        options = options.with_overrides(**overrides)  # an unknown option fails before hashing gigabytes
        check_device(device)  # and so does a wrong device
        artifact = load_artifact(path, verify_hashes=verify_hashes)
        return cls(artifact, device=device, options=options)

    # ----------------------------------------------------------------------------------------
    # Submitting

    def _prepare(self, prompt: Prompt, max_new_tokens: int, sampling: SamplingParams | None,
                 deadline_s: float | None, return_logits: bool, index: int | None = None) -> Request:
        """Validate one request and tokenize it (in the caller's thread)."""
        where = "" if index is None else f"request {index}: "
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
            raise InvalidRequestError("invalid max_new_tokens", expected="an integer > 0", got=repr(max_new_tokens))
        params = GREEDY if sampling is None else sampling
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"{where}sampling must be a SamplingParams", got=type(params).__name__,
                                      fix="pass runtime.SamplingParams(...)")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError(f"{where}the prompt is empty", expected="at least one token",
                                          fix="pass a non-empty prompt")
            ids = self.encode(prompt)
        elif isinstance(prompt, np.ndarray) or (isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, str))):
            ids = list(np.asarray(prompt).reshape(-1).tolist()) if isinstance(prompt, np.ndarray) else list(prompt)
        else:
            raise InvalidRequestError(f"{where}invalid prompt", expected="a string or a list of token ids",
                                      got=type(prompt).__name__)
        if not ids:
            raise InvalidRequestError(f"{where}the prompt is empty", expected="at least one token",
                                      fix="pass a non-empty prompt")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab]
        if bad:
            raise InvalidRequestError(f"{where}token ids outside the vocabulary",
                                      expected=f"integers in [0, {self.vocab})", got=repr(bad[:5]))
        if params.top_k > self.candidates and not params.greedy:
            raise InvalidRequestError(f"{where}top_k above the engine's candidate bound",
                                      expected=f"top_k <= {self.candidates}", got=str(params.top_k),
                                      fix="lower top_k, or load the engine with a larger candidates=")
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab]
        if bad_stop:
            raise InvalidRequestError(f"{where}stop_token_ids outside the vocabulary",
                                      expected=f"integers in [0, {self.vocab})", got=repr(bad_stop[:5]))
        if len(ids) + max_new_tokens > self.max_context:
            raise InvalidRequestError(
                f"{where}prompt + max_new_tokens exceeds the context",
                expected=f"at most {self.max_context} tokens in all",
                got=f"a {len(ids)}-token prompt + {max_new_tokens} new tokens = {len(ids) + max_new_tokens}",
                fix="shorten the prompt or lower max_new_tokens",
            )
        if params.stop:
            self._need_tokenizer("stop strings")
        if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))
                                       or not deadline_s > 0):
            raise InvalidRequestError(
                f"{where}invalid deadline_s", expected="seconds > 0, or None", got=repr(deadline_s)
            )
        deadline = None if deadline_s is None else time.perf_counter() + float(deadline_s)
        return Request([int(t) for t in ids], int(max_new_tokens), params, deadline, bool(return_logits))

    def _enqueue(self, requests: list[Request], block: bool) -> None:
        with self._cv:
            while True:
                if self._closing:
                    raise EngineClosedError("the engine is closing and takes no new requests",
                                            fix="send it to another engine, or load a new one")
                if len(self._waiting) + len(requests) <= self.max_queue or (block and not self._waiting):
                    break
                if not block:
                    raise QueueFullError("the engine's queue is full", expected=f"at most {self.max_queue} waiting",
                                         got=f"{len(self._waiting)} waiting", fix="retry later, or raise max_queue",
                                         retry_after_s=1.0)
                self._cv.wait(0.05)
            for request in requests:
                request._owner = self  # the engine lives while a caller waits on its request
            self._waiting.extend(requests)
            self._cv.notify_all()

    def submit(self, prompt: Prompt, max_new_tokens: int = 128, sampling: SamplingParams | None = None, *,
               deadline_s: float | None = None, return_logits: bool = False) -> Request:
        """Queue one request; iterate the returned :class:`Request` (or ``async for``) for its tokens.

        Raises at once: :class:`InvalidRequestError` for a bad request (nothing is queued),
        :class:`QueueFullError` past ``max_queue`` waiting requests, :class:`EngineClosedError`
        once :meth:`close` began. ``deadline_s`` (seconds from now) ends the request with
        ``FinishReason.DEADLINE`` if it is not done by then.
        """
        request = self._prepare(prompt, max_new_tokens, sampling, deadline_s, return_logits)
        self._enqueue([request], block=False)
        return request

    # ----------------------------------------------------------------------------------------
    # Thin callers of the loop

    def _submit_all(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int,
                    sampling: SamplingParams | Sequence[SamplingParams] | None, return_logits: bool) -> list[Request]:
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        single = isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and bool(prompts) and all(isinstance(t, (int, np.integer)) for t in prompts)
        )
        if not single and (isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Sequence)
                           or len(prompts) == 0):
            raise InvalidRequestError("no prompts", expected="a prompt or a non-empty list of prompts",
                                      got=repr(prompts)[:80])
        prompts = cast("list[Prompt]", [prompts] if single else list(prompts))
        if sampling is None or isinstance(sampling, SamplingParams):
            params = [sampling] * len(prompts)
        elif isinstance(sampling, (str, bytes, Mapping)) or not isinstance(sampling, Sequence):
            raise InvalidRequestError("sampling must be a SamplingParams or one per prompt",
                                      got=type(sampling).__name__, fix="pass runtime.SamplingParams(...)")
        else:
            params = list(sampling)
            if len(params) != len(prompts):
                raise InvalidRequestError(
                    "one SamplingParams per prompt",
                    expected=str(len(prompts)),
                    got=str(len(params)),
                    fix="pass one SamplingParams for all, or one per prompt",
                )
        requests = [self._prepare(p, max_new_tokens, s, None, return_logits, index=i)
                    for i, (p, s) in enumerate(zip(prompts, params))]
        self._enqueue(requests, block=True)
        return requests

    def generate_results(
        self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 128,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None, *, return_logits: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt; results in the prompts' order. The prompts join the running
        batch like any other requests (every request is validated before any is queued).

        ``return_logits=True`` also copies every step's last-position logits to the host
        (``GenerationResult.step_logits``), for parity checks, never for serving.
        """
        requests = self._submit_all(prompts, max_new_tokens, sampling, return_logits)
        try:
            return [r.result() for r in requests]
        except BaseException:
            for r in requests:
                r.cancel()
            raise

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 128,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[str]:
        """Generated texts for ``prompts`` (a string counts as a list of one)."""
        return [r.text for r in self.generate_results(prompts, max_new_tokens, sampling)]

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 128,
                     sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[list[int]]:
        """New token ids for each prompt of token ids (the final EOS / stop token included)."""
        if isinstance(prompt_ids, (str, bytes)) or not all(not isinstance(p, (str, bytes)) for p in prompt_ids):
            raise InvalidRequestError("generate_ids takes lists of token ids", got=repr(prompt_ids)[:80],
                                      fix="use generate() for text prompts")
        return [list(r.token_ids) for r in self.generate_results(list(prompt_ids), max_new_tokens, sampling)]

    def stream(
        self, prompt: Prompt, max_new_tokens: int = 128, sampling: SamplingParams | None = None
    ) -> Iterator[str]:
        """Text pieces of one request as they become certain; ''.join(pieces) == generate()'s text.

        The request is validated and queued now; closing the iterator early cancels it.
        """
        self._need_tokenizer("streaming text")
        request = self.submit(prompt, max_new_tokens, sampling)
        return (event.text for event in request if event.text)

    def chat(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 128,
             sampling: SamplingParams | None = None) -> str:
        """The assistant's reply to ``messages`` (the artifact's chat template, sandboxed)."""
        return self.generate_results([self.chat_ids(messages)], max_new_tokens, sampling)[0].text

    # ----------------------------------------------------------------------------------------
    # Life cycle

    def warm_up(self) -> float:
        """Prepare the CUDA kernels before traffic arrives; return the seconds it took.

        * The decode step's CUDA graphs: one exists per batch-size bucket, state direction and
          sampling mix (greedy; temperature; min-p; top-p; top-k at each candidate bound; each with and
          without penalties: the step's host inputs, :func:`runtime.sampling.host_values`). Without a
          warm-up the first request of each combination pays for its capture, and so does every
          request sharing its step. Short dummy requests (one-token prompts, three new tokens)
          run at every bucket with each mix.
        * The prefill shapes (:meth:`runtime.kv_slots.SlotsBackend.prefill_shapes`): the attention
          kernels plan per shape, and a shape's first prefill costs several times a later one.
          With CUDA graphs a one-row prefill of each length bucket runs three times, so that an
          idle engine's next request of that length replays a captured prefill
          (:mod:`runtime.kv_slots`).

        Nothing to do on the CPU (returns 0). Call it before serving: requests submitted
        meanwhile batch with the dummies and are not lost, but wait.
        """
        if self.device != "cuda":
            return 0.0
        started = time.perf_counter()
        token = self.pad_token_id
        sizes: list[int] = []
        # every value of the step's host inputs: greedy / temperature / min-p (a threshold, no
        # sort) / top-p (sorted candidates) / top-k (64 and 256 candidates), each with and without
        # penalties
        plain = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, min_p=0.05),
                 SamplingParams(temperature=1.0, top_p=0.9),
                 *(SamplingParams(temperature=1.0, top_k=k) for k in TOP_K_CANDIDATES if k < self.candidates)]
        mixes = plain + [dataclasses.replace(p, repetition_penalty=1.1) for p in plain]
        if self.cuda_graph:
            sizes = sorted({self.backend.bucket(n) for n in range(1, self.max_batch + 1)})
            for n in sizes:
                for params in mixes:
                    mix = dataclasses.replace(params, seed=0, min_new_tokens=3)
                    self.generate_results([[token]] * n, 3, [mix] * n)
        shapes = self.backend.prefill_shapes()
        captures = getattr(self.backend, "captures_prefill", lambda rows, length: False)
        for rows, length in shapes:
            # a prefill that can be a CUDA graph three times: seen, the graph's first run, its capture
            for _ in range(3 if captures(rows, length) else 1):
                self.generate_results([[token] * length] * rows, 1)
        seconds = time.perf_counter() - started
        log.info("warm-up: decode step captured for %d batch buckets × %d sampling mixes, %d prefill shapes "
                 "planned, in %.1f s", len(sizes), len(mixes) if sizes else 0, len(shapes), seconds)
        return seconds

    @property
    def ready(self) -> bool:
        """The loop is running and takes requests."""
        return self._thread.is_alive() and not self._closing

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(queued=len(self._waiting), running=len(self._live), max_batch=self.max_batch,
                               max_queue=self.max_queue, steps=self.steps, closed=self._closing,
                               backend=self.backend.kind)

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking requests; with ``drain`` let the queued and running ones finish (up to
        ``timeout`` seconds), then cancel whatever is left and join the loop thread."""
        with self._cv:
            self._closing = True
            if not drain:
                self._abort = True
            self._cv.notify_all()
        self._thread.join(timeout if drain else None)
        if self._thread.is_alive():
            with self._cv:
                self._abort = True
                self._cv.notify_all()
            self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort for engines nobody closed
        try:
            with self._cv:
                self._closing = self._abort = True
                self._cv.notify_all()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ----------------------------------------------------------------------------------------
    # The loop (one thread; the only one that runs the sessions)

    def _iterate(self) -> bool:
        """One pass of the loop: admit, decode a block, retire. False when the loop should end.

        An idle pass waits at most half a second and returns, so that :func:`_serve` drops its
        reference between passes: an engine nobody holds (and nobody closed) is collected, and
        its thread ends, instead of both living as long as the process.
        """
        with self._cv:
            if not (self._waiting or self._live or self._closing):
                self._cv.wait(0.5)
                return True
            if self._abort or (self._closing and not self._waiting and not self._live):
                return False
        self._admit()
        if self._live:
            self._decode()
        self._retire()
        return True

    def _shutdown(self) -> None:
        """Cancel what is left (after close(drain=False) or a drain timeout)."""
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._closing = True
        for request in waiting:
            self._end_unadmitted(request, FinishReason.CANCELLED)
        for live in list(self._live.values()):
            live.reason = live.reason or FinishReason.CANCELLED
        self._retire()

    def _abandon(self, error: GenerationError) -> None:
        """The loop cannot go on: every request, waiting or running, fails with ``error``."""
        with self._cv:
            self._closing = True
            requests = [*self._waiting, *(live.request for live in self._live.values())]
            self._waiting.clear()
            self._live.clear()
        for request in requests:
            request._fail(error)

    def _end_unadmitted(self, request: Request, reason: FinishReason) -> None:
        now = time.perf_counter()
        request._push(TokenEvent((), "", GenerationResult(
            text="", token_ids=(), prompt_tokens=len(request.prompt_ids), new_tokens=0, finish_reason=reason,
            ttft_s=0.0, decode_tokens_per_s=0.0, total_s=now - request.submitted, queue_s=now - request.submitted,
        ), now))

    def _admit(self) -> None:
        """Move waiting requests into free slots and prefill them (their first token).

        With ``prefill_tokens`` set, at most that many prompt tokens per step boundary (a longer
        prompt alone), as vLLM's token budget does: when many requests arrive at once the
        running ones take a decode step between the prefills instead of waiting for all of them.
        """
        taken: list[Request] = []
        tokens = 0
        with self._cv:
            while self._waiting and len(taken) < self.backend.free_slots:
                request = self._waiting[0]
                budget = self.prefill_tokens
                if taken and budget is not None and tokens + len(request.prompt_ids) > budget:
                    break  # the rest after the next decode step: running requests wait for one budget
                self._waiting.popleft()
                if request.cancelled:
                    self._end_unadmitted(request, FinishReason.CANCELLED)
                elif request.deadline is not None and time.perf_counter() > request.deadline:
                    self._end_unadmitted(request, FinishReason.DEADLINE)
                else:
                    taken.append(request)
                    tokens += len(request.prompt_ids)
            self._cv.notify_all()  # room in the queue for blocked generate_* callers
        if not taken:
            return
        now = time.perf_counter()
        batch: list[_Live] = []
        admitted: list[tuple[int, list[int], dict[str, np.ndarray]]] = []
        # slots in prompt-length order: neighbours prefill together, padded to the longer one
        for request in sorted(taken, key=lambda r: len(r.prompt_ids)):
            slot = self.backend.allocate()
            try:
                live, rows = self._prepare_row(request, slot, now)
            except Exception as exc:  # noqa: BLE001 - this request's values fail this request only
                self.backend.release(slot)
                request._fail(self._request_error(request, "preparing", exc))
                continue
            batch.append(live)
            admitted.append((slot, request.prompt_ids, rows))
        plan = self._plan(batch)
        batch = [live for live in batch if live.reason is None]  # planning may have failed some
        if plan is None or not batch:
            return
        want_logits = any(live.request.return_logits for live in batch)
        by_slot = {live.slot: live for live in batch}

        def started(firsts: dict[int, tuple[int, np.ndarray | None]]) -> None:
            """A prefill run finished: its requests run from now on, and their callers get the
            first token before the admission's later runs."""
            with self._cv:
                for slot in firsts:
                    self._live[slot] = by_slot.pop(slot)
            for slot, (token, logits) in firsts.items():
                self._accept(self._live[slot], [token], None if logits is None else logits[None, :])

        admitted = [row for row in admitted if row[0] in by_slot]
        try:
            self.backend.prefill_many(admitted, want_logits, plan, started)
        except LmforgeError as exc:
            self._fail(list(by_slot.values()), exc)  # the requests whose prefill did not run
        except Exception as exc:  # not onnxruntime: a bug, reported; the loop serves on
            log.exception("a prefill failed")
            self._fail(list(by_slot.values()), GenerationError(
                "the prefill failed", got=f"{type(exc).__name__}: {exc}",
                fix="this is a bug in lmforge: please report it with the log above"))

    def _prepare_row(self, request: Request, slot: int, now: float) -> tuple[_Live, dict[str, np.ndarray]]:
        """One admitted request's loop state and sampling rows, staged in the backend (raises for
        this request alone: a value that got past validation, or a bug)."""
        p = request.sampling
        stop_ids = frozenset(self.eos_token_ids | set(p.stop_token_ids))
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids) if self.tokenizer is not None else None
        live = _Live(request, slot, stop_ids, detok, StopStrings(p.stop), now)
        host_values([p], self.candidates)  # its plan alone: a row that cannot be planned fails here
        rows = row_arrays(p, request.prompt_ids, sorted(stop_ids), self.vocab, self.max_context,
                          draws=0 if p.greedy else request.max_new_tokens)
        return live, self.backend.stage(slot, rows)

    def _request_error(self, request: Request, stage: str, exc: Exception) -> GenerationError:
        """The error a request fails with when the loop raised while ``stage`` it."""
        if isinstance(exc, GenerationError):
            return exc
        log.warning("request %d failed while %s it: %s: %s", request.id, stage, type(exc).__name__, exc)
        return GenerationError(f"request {request.id} failed in the engine while {stage} it",
                               got=f"{type(exc).__name__}: {exc}"[:300],
                               fix="its values got past validation, a bug in lmforge: please report the request")

    def _fail_one(self, live: _Live, stage: str, exc: Exception) -> None:
        """A running request whose handling raised: it fails alone and its slot is free."""
        with self._cv:
            self._live.pop(live.slot, None)
        self.backend.release(live.slot)
        live.reason = live.reason or FinishReason.CANCELLED  # nothing more is pushed for it
        live.request._fail(self._request_error(live.request, stage, exc))

    def _decode(self) -> None:
        """One block of decode steps for every running request, then the stop checks."""
        plan = self._plan(list(self._live.values()))
        if plan is None or not self._live:
            return
        generated = {slot: len(live.new_ids) for slot, live in self._live.items()}
        want_logits = any(live.request.return_logits for live in self._live.values())
        left = max(live.request.max_new_tokens - len(live.new_ids) for live in self._live.values())
        steps = 1 if want_logits else max(1, min(self.read_every, left, self.backend.max_block))
        rows = max(self._live) + 1
        try:
            ids, logits = self.backend.decode_block(rows, steps, generated, want_logits, plan,
                                                    self._admissible if self.admit_within_block else None)
            self.steps += max(map(len, ids.values()), default=0)
            if self.launch_ahead and self.backend.can_launch_ahead and not want_logits and not self._admissible():
                # rows that go on after this block (a stop token among its ids is found below, and
                # that row's step ahead is wasted): their next step runs while the host works
                going = [slot for slot, live in self._live.items()
                         if live.request.max_new_tokens > len(live.new_ids) + len(ids.get(slot, ()))]
                if going:
                    self.backend.launch_next(rows, plan, going)
        except Exception as exc:  # onnxruntime's (or a bug): the step's requests fail, the loop serves on
            if not isinstance(exc, LmforgeError):
                log.exception("a decode step failed")
                exc = GenerationError("a decode step failed", got=f"{type(exc).__name__}: {exc}",
                                      fix="this is a bug in lmforge: please report it with the log above")
            self._fail(list(self._live.values()), exc)
            self.backend.reset()  # every running request failed with this step
            return
        for slot, live in list(self._live.items()):
            self._accept(live, ids.get(slot, []), None if logits is None else logits[slot][None, :])

    def _plan(self, rows: list[_Live]) -> Plan | None:
        """The sampling nodes' host inputs for a run over these rows (:func:`runtime.sampling.host_values`).

        When planning raises, each row is planned alone and the rows that raise fail (their
        requests alone); the others are planned again. None when no row is left then.
        """
        while True:
            try:
                return host_values([live.request.sampling for live in rows], self.candidates)
            except Exception as exc:  # noqa: BLE001 - a request's values fail that request only
                bad = []
                for live in rows:
                    try:
                        host_values([live.request.sampling], self.candidates)
                    except Exception as own:  # noqa: BLE001
                        bad.append((live, own))
                for live, error in bad or [(live, exc) for live in rows]:
                    self._fail_one(live, "planning", error)
                failed = {id(live) for live, _ in bad} if bad else {id(live) for live in rows}
                rows = [live for live in rows if id(live) not in failed]
                if not rows:
                    return None

    def _admissible(self) -> bool:
        """Whether a waiting request could take a slot now (asked between the steps of a block)."""
        return bool(self._waiting) and self.backend.free_slots > 0

    def _accept(self, live: _Live, tokens: list[int], logits: np.ndarray | None) -> None:
        """Host-side bookkeeping for a row's new ids: text, stop checks, its event. A failure
        there fails this request alone."""
        if live.reason is not None:
            return
        try:
            self._accept_tokens(live, tokens, logits)
        except Exception as exc:  # noqa: BLE001 - this request only
            self._fail_one(live, "accepting tokens for", exc)

    def _accept_tokens(self, live: _Live, tokens: list[int], logits: np.ndarray | None) -> None:
        now = time.perf_counter()
        accepted: list[int] = []
        text = ""
        for i, token in enumerate(tokens):
            if not live.new_ids:
                live.t_first = now
            live.new_ids.append(token)
            accepted.append(token)
            if logits is not None and i < len(logits):
                live.logits.append(logits[i])
            if token in live.stop_ids:
                live.reason = FinishReason.EOS if token in self.eos_token_ids else FinishReason.STOP_TOKEN
            else:
                if live.detok is not None:
                    text += live.stops.add(live.detok.push(token))
                if live.stops.stopped:
                    live.reason = FinishReason.STOP_STRING
                elif len(live.new_ids) >= live.request.max_new_tokens:
                    live.reason = FinishReason.LENGTH
            if live.reason is not None:
                break
        if live.reason is None:
            if text or accepted:
                live.request._push(TokenEvent(tuple(accepted), text, None, now))
        else:  # the final event, with the result, is pushed when the slot is released
            live.pending_ids, live.pending_text = tuple(accepted), text

    def _finish_text(self, live: _Live) -> str:
        piece = ""
        if live.detok is not None and live.reason is not FinishReason.STOP_STRING:
            piece = live.stops.add(live.detok.flush())
            if live.stops.stopped:
                live.reason = FinishReason.STOP_STRING
            piece += live.stops.finish()
        return piece

    def _retire(self) -> None:
        """Release finished, cancelled and expired requests (their slots are free at once)."""
        now = time.perf_counter()
        done = []
        for slot, live in self._live.items():
            request = live.request
            if live.reason is None and request.cancelled:
                live.reason = FinishReason.CANCELLED
            elif live.reason is None and request.deadline is not None and now > request.deadline:
                live.reason = FinishReason.DEADLINE
            if live.reason is not None:
                done.append(slot)
        for slot in done:
            live = self._live[slot]
            try:
                text, result = self._result(live, now)
            except Exception as exc:  # noqa: BLE001 - this request only
                self._fail_one(live, "finishing", exc)
                continue
            with self._cv:
                del self._live[slot]
            self.backend.release(slot)
            live.request._push(TokenEvent(live.pending_ids, text, result, now))

    def _result(self, live: _Live, now: float) -> tuple[str, GenerationResult]:
        """A finished request's last text piece and its result."""
        text = live.pending_text + self._finish_text(live)
        n = len(live.new_ids)
        decode_s = now - live.t_first
        request = live.request
        return text, GenerationResult(
            text=live.stops.text, token_ids=tuple(live.new_ids), prompt_tokens=len(request.prompt_ids),
            new_tokens=n, finish_reason=live.reason or FinishReason.CANCELLED,
            ttft_s=(live.t_first or now) - request.submitted,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=now - request.submitted, queue_s=live.admitted - request.submitted,
            step_logits=np.stack(live.logits) if live.logits else None,
        )

    def _fail(self, batch: list[_Live], exc: LmforgeError) -> None:
        """The requests of a failed step end with ``exc``; the loop keeps serving."""
        error = exc if isinstance(exc, GenerationError) else GenerationError(str(exc))
        log.warning("a step failed for %d request(s): %s", len(batch), error)
        for live in batch:
            with self._cv:
                self._live.pop(live.slot, None)
            self.backend.release(live.slot)
            live.request._fail(error)


def _serve(ref: weakref.ref[Engine]) -> None:
    """The loop thread: runs :meth:`Engine._iterate` while the engine exists and is open.

    It holds the engine only during a pass (see :meth:`Engine._iterate`). A failure of the loop
    itself (a bug, not an onnxruntime error: those fail their step's requests) fails every
    request rather than leaving callers waiting.
    """
    while True:
        engine = ref()
        if engine is None:
            return
        try:
            if not engine._iterate():
                engine._shutdown()
                return
        except BaseException as exc:
            log.exception("the engine loop stopped")
            engine._abandon(GenerationError("the engine loop stopped", got=f"{type(exc).__name__}: {exc}",
                                            fix="this is a bug in lmforge: please report it with the log above"))
            return
        del engine
