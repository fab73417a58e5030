"""Sampling parameters and the host side of the on-device sampler.

:class:`SamplingParams` is one request's (one row's) configuration, validated on construction.
:func:`sampler_arrays` turns a batch of them into the sampler graph's per-row inputs (built once
per batch, uploaded once); :class:`Sampler` runs the graph of :mod:`runtime.sampler_graph` on
its own, for callers that hold logits already (and for the tests). The engine runs the same
session inside its decode loop with IO binding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import onnxruntime as ort

from runtime.errors import GenerationError
from runtime.sampler_graph import build_sampler_model

__all__ = ["SamplingParams", "GREEDY", "sampler_arrays", "Sampler"]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    ``temperature == 0`` is greedy (exact argmax; ``top_k == 1`` is greedy too); ``top_k == 0``
    and ``top_p == 1`` switch those filters off; ``repetition_penalty`` follows transformers
    (a logit of a token already in the prompt or output is divided by it when positive,
    multiplied when not). ``seed`` makes sampling reproducible (``None``: fresh entropy).
    EOS and ``stop_token_ids`` cannot be sampled before ``min_new_tokens`` tokens. ``stop``
    strings end the request; the text is cut just before the first one (a lone string is
    accepted and wrapped in a tuple).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        t = self.temperature
        if not _is_real(t) or math.isnan(t) or t < 0 or math.isinf(t):
            raise GenerationError(
                "invalid temperature", expected="a finite number >= 0 (0 = greedy)", got=repr(t)
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise GenerationError(
                "invalid top_k", expected="an integer >= 0 (0 = off)", got=repr(self.top_k)
            )
        p = self.top_p
        if not _is_real(p) or math.isnan(p) or not 0.0 < p <= 1.0:
            raise GenerationError("invalid top_p", expected="a number in (0, 1] (1 = off)", got=repr(p))
        r = self.repetition_penalty
        if not _is_real(r) or math.isnan(r) or math.isinf(r) or r <= 0:
            raise GenerationError(
                "invalid repetition_penalty", expected="a finite number > 0 (1 = off)", got=repr(r)
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise GenerationError(
                "invalid seed", expected="None or an integer in [0, 2**63)", got=repr(self.seed)
            )
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise GenerationError(
                "invalid min_new_tokens", expected="an integer >= 0", got=repr(self.min_new_tokens)
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise GenerationError("invalid stop string", expected="non-empty strings", got=repr(s))
        for i in self.stop_token_ids:
            if not _is_int(i) or i < 0:
                raise GenerationError(
                    "invalid stop token id", expected="integers >= 0", got=repr(i)
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def candidates(self, vocab: int) -> int:
        """How many sorted candidates this row needs from the sampler's TopK."""
        if self.greedy:
            return 1
        return min(self.top_k, vocab) if self.top_k > 0 else vocab


GREEDY = SamplingParams()


def sampler_arrays(
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    stop_ids: Sequence[Sequence[int]],
    vocab: int,
    steps: int,
) -> dict[str, np.ndarray]:
    """The sampler's per-batch inputs for rows ``params`` (all but ``logits``/``attention_mask``).

    ``prompts`` seed the ``seen`` mask (the repetition penalty counts prompt tokens, as
    transformers does); ``stop_ids`` are the ids masked before ``min_new_tokens``; ``steps`` is
    the most tokens any row may generate. Each row draws its ``steps`` uniforms from its own
    ``numpy.random.default_rng(seed)`` stream.
    """
    batch = len(params)
    seen = np.zeros((batch, vocab), dtype=np.bool_)
    stop_mask = np.zeros((batch, vocab), dtype=np.bool_)
    uniforms = np.empty((steps, batch), dtype=np.float32)
    for row, (p, prompt, stops) in enumerate(zip(params, prompts, stop_ids, strict=True)):
        if p.repetition_penalty != 1.0:
            seen[row, np.asarray(prompt, dtype=np.int64)] = True
        if p.min_new_tokens > 0 and len(stops):
            stop_mask[row, np.asarray(list(stops), dtype=np.int64)] = True
        uniforms[:, row] = np.random.default_rng(p.seed).random(steps, dtype=np.float32)
    return {
        "temperature": np.array([p.temperature for p in params], dtype=np.float32),
        "top_k": np.array([p.top_k for p in params], dtype=np.int64),
        "top_p": np.array([p.top_p for p in params], dtype=np.float32),
        "repetition_penalty": np.array([p.repetition_penalty for p in params], dtype=np.float32),
        "min_new_tokens": np.array([p.min_new_tokens for p in params], dtype=np.int64),
        "stop_mask": stop_mask,
        "seen": seen,
        "uniforms": uniforms,
        "step": np.array(0, dtype=np.int64),
        "k_cap": np.array([max(p.candidates(vocab) for p in params)], dtype=np.int64),
    }


class Sampler:
    """The sampler graph as a standalone session (CPU or CUDA), for logits already at hand."""

    def __init__(self, logits_dtype: str = "float32", providers: Sequence[str] = ("CPUExecutionProvider",)):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            build_sampler_model(logits_dtype), sess_options=options, providers=list(providers)
        )
        self.logits_dtype = logits_dtype

    def sample(
        self,
        logits: np.ndarray,
        params: Sequence[SamplingParams],
        step: int = 0,
        seen: np.ndarray | None = None,
        stop_ids: Sequence[Sequence[int]] | None = None,
        steps: int | None = None,
    ) -> np.ndarray:
        """Next token ids ``[batch]`` for ``logits [batch, vocab]`` (or ``[batch, seq, vocab]``).

        ``step`` picks the uniform from each row's seeded stream (so calling with step 0, 1, …
        reproduces an engine run); ``seen`` is the ``[batch, vocab]`` repetition-penalty mask.
        """
        if logits.ndim == 2:
            logits = logits[:, None, :]
        batch, _, vocab = logits.shape
        if len(params) != batch:
            raise GenerationError("sampler: one SamplingParams per row", expected=str(batch), got=str(len(params)))
        feeds = sampler_arrays(
            params, [[] for _ in params], stop_ids or [[] for _ in params], vocab, (steps or step + 1)
        )
        if seen is not None:
            feeds["seen"] = np.asarray(seen, dtype=np.bool_)
        feeds["step"] = np.array(step, dtype=np.int64)
        feeds["logits"] = np.asarray(logits, dtype=self.logits_dtype)
        feeds["attention_mask"] = np.ones((batch, 1), dtype=np.int64)
        (ids,) = self.session.run(["next_ids"], feeds)
        return ids.reshape(-1)
