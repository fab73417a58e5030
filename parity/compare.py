"""Compare one candidate generation against the PyTorch reference, prompt by prompt.

Pure numpy: nothing here knows about models, tokenizers or ONNX Runtime.

Vocabulary used throughout the parity suite:

step
    Index of a generated token, 0 for the first new token after the prompt. The logits "at step
    t" are the ones the token of step t was chosen from (greedy: their argmax).
reference run
    PyTorch eager fp32 greedy generation: the tokens, and per step the reference's top-k logits
    as ``(ids, values)``, sorted by value, descending. The top-1/top-2 *margin* of a step is
    ``values[0] - values[1]``: how close the reference itself was to choosing differently.
candidate run
    The artifact's generation on the same prompt: its tokens, and per step either its full logits
    vector or only its values at the reference's top-k ids of that step (which is all the
    comparison reads).

Classification of a prompt (:class:`Outcome`):

``exact``
    The same tokens, up to and including the first end-of-sequence token (see below).
``near_tie``
    The runs differ first at step ``d`` and the reference was nearly indifferent between the two
    choices there: the reference's logit of the candidate's token lies within ``tie_threshold`` of
    the reference's top-1 logit. This is a fragile prompt, not evidence of a bug. We test the
    *candidate's* token rather than only the top-1/top-2 margin: a candidate that picks the
    reference's 7th choice at a step where the reference's top two happened to tie did not flip a
    tie, and is a drift. When the candidate picks the reference's second choice the two tests
    coincide (the gap *is* the margin), which is by far the common case.
``drift``
    The runs differ first at step ``d`` and the candidate's token is further than
    ``tie_threshold`` below the reference's choice, or outside the reference's top-k altogether.
``length_mismatch``
    One run is a strict prefix of the other: the shorter stopped without an end-of-sequence token
    (a length cap, an error, a truncated cache), so the runs were not produced under the same
    conditions. This is a harness problem, never a numerical finding.
``skipped``
    The prompt was not run (e.g. longer than the model's context); see :func:`skipped`.

End of sequence. Each run is cut after its first token in ``eos_token_ids`` before comparing.
A run that emits EOS at step ``d`` and stops, and one that emits the same EOS at step ``d`` and
then keeps generating (because its stop list was incomplete, or it was run with EOS ignored) made
the same numerical decisions: they are *equal*. A run that emits EOS where the other emits an
ordinary token is a divergence at that step like any other, classified by the margin there.

Logit differences. On a divergence at step ``d`` the two runs' contexts differ from step ``d + 1``
on, so their logits are no longer comparable. The compared steps are therefore ``0 .. d``
inclusive (the logits at ``d`` were computed from identical contexts; only the choice differed),
or every step of the shorter run when there is no divergence, or – when the candidate was
*teacher-forced* with the reference's tokens – every step for which both have logits. Per
compared step we take the absolute difference at the reference's top-k ids; ``step_max_diffs``
holds the per-step maximum, ``max_logit_diff`` the maximum over steps and ``mean_logit_diff`` the
mean over all (step, id) pairs. A non-finite candidate logit makes that step's difference
``inf``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from runtime.errors import ParityError

__all__ = [
    "Outcome",
    "ReferenceRun",
    "CandidateRun",
    "PromptComparison",
    "compare_prompt",
    "skipped",
    "truncate_at_eos",
    "first_divergence",
]

log = logging.getLogger(__name__)


class Outcome(str, enum.Enum):
    """How a candidate's generation on one prompt relates to the reference's."""

    EXACT = "exact"
    NEAR_TIE = "near_tie"
    DRIFT = "drift"
    LENGTH_MISMATCH = "length_mismatch"
    SKIPPED = "skipped"


def _frozen_array(value: Any, dtype: type, name: str, prompt_id: str) -> np.ndarray:
    try:
        array: np.ndarray = np.array(value, dtype=dtype, copy=True)
    except (TypeError, ValueError) as exc:
        raise ParityError(f"prompt {prompt_id!r}: {name} is not numeric ({exc})") from exc
    array.flags.writeable = False
    return array


def _tokens(value: Sequence[int], prompt_id: str, name: str) -> tuple[int, ...]:
    array = np.asarray(value)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ParityError(
            f"prompt {prompt_id!r}: {name} must be a flat sequence of token ids",
            got=f"array of shape {array.shape} and dtype {array.dtype}",
        )
    return tuple(int(t) for t in array)


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceRun:
    """The reference's greedy generation on one prompt, with its top-k logits per step.

    ``top_ids`` and ``top_values`` have shape ``[steps, k]`` (``k >= 2``), one row per generated
    token, each row sorted by value, descending. ``tokens[t]`` is the reference's choice at step
    ``t`` (normally ``top_ids[t, 0]``; an exact tie may order them differently). The arrays are
    copied and made read-only.
    """

    prompt_id: str
    tokens: tuple[int, ...]
    top_ids: np.ndarray
    top_values: np.ndarray

    def __post_init__(self) -> None:
        pid = self.prompt_id
        object.__setattr__(self, "tokens", _tokens(self.tokens, pid, "reference tokens"))
        ids = _frozen_array(self.top_ids, np.int64, "reference top_ids", pid)
        values = _frozen_array(self.top_values, np.float32, "reference top_values", pid)
        steps = len(self.tokens)
        if steps == 0 and ids.size == 0 and values.size == 0:
            ids, values = ids.reshape(0, 0), values.reshape(0, 0)
        if ids.ndim != 2 or ids.shape != values.shape or ids.shape[0] != steps or (steps and ids.shape[1] < 2):
            raise ParityError(
                f"prompt {pid!r}: reference top-k arrays do not match its tokens",
                expected=f"top_ids and top_values of shape [{steps}, k >= 2]",
                got=f"{ids.shape} and {values.shape}",
                fix="regenerate the reference (delete parity/reference.jsonl in the artifact)",
            )
        if not np.isfinite(values).all():
            raise ParityError(
                f"prompt {pid!r}: the reference's top-k logits contain NaN or inf",
                fix="check the source model in fp32 eager mode; the reference must be finite",
            )
        if steps and (np.diff(values, axis=1) > 0).any():
            raise ParityError(
                f"prompt {pid!r}: reference top-k values are not sorted in descending order",
                fix="build them with torch.topk(..., sorted=True)",
            )
        object.__setattr__(self, "top_ids", ids)
        object.__setattr__(self, "top_values", values)

    @property
    def steps(self) -> int:
        return len(self.tokens)

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[1]) if self.top_ids.ndim == 2 and self.steps else 0

    @property
    def margins(self) -> np.ndarray:
        """Top-1 minus top-2 logit per step, shape ``[steps]``."""
        if not self.steps:
            return np.zeros(0, dtype=np.float32)
        return self.top_values[:, 0] - self.top_values[:, 1]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; values survive the round trip bit-exactly (float32 → float64 → float32)."""
        return {
            "prompt_id": self.prompt_id,
            "tokens": list(self.tokens),
            "top_ids": self.top_ids.tolist(),
            "top_values": self.top_values.astype(np.float64).tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReferenceRun:
        try:
            return cls(
                prompt_id=str(data["prompt_id"]),
                tokens=data["tokens"],
                top_ids=np.asarray(data["top_ids"], dtype=np.int64),
                top_values=np.asarray(data["top_values"], dtype=np.float32),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ParityError(
                f"reference entry {data.get('prompt_id', '?')!r} is malformed ({exc})",
                fix="delete parity/reference.jsonl in the artifact to regenerate it",
            ) from exc


@dataclasses.dataclass(frozen=True, eq=False)
class CandidateRun:
    """The artifact's generation on one prompt.

    Give at most one of ``logits`` (full vectors, ``[steps, vocab]``) and ``ref_topk_values``
    (the candidate's logits at the reference's top-k ids of the same step, ``[steps, k]``); with
    neither, only tokens are compared. The number of logit rows may differ from the number of
    tokens; steps without a row are not compared.

    ``teacher_forced`` says the candidate was fed the reference's tokens rather than its own:
    ``tokens[t]`` is then its argmax given the reference's context, and its logits stay
    comparable after the first divergence, so every step is compared.
    """

    prompt_id: str
    tokens: tuple[int, ...]
    logits: np.ndarray | None = None
    ref_topk_values: np.ndarray | None = None
    teacher_forced: bool = False

    def __post_init__(self) -> None:
        pid = self.prompt_id
        object.__setattr__(self, "tokens", _tokens(self.tokens, pid, "candidate tokens"))
        if self.logits is not None and self.ref_topk_values is not None:
            raise ParityError(
                f"prompt {pid!r}: candidate run has both full logits and top-k values",
                fix="pass one of them",
            )
        for name in ("logits", "ref_topk_values"):
            value = getattr(self, name)
            if value is None:
                continue
            array = _frozen_array(value, np.float32, f"candidate {name}", pid)
            if array.ndim != 2:
                raise ParityError(
                    f"prompt {pid!r}: candidate {name} must be 2-D [steps, …]", got=f"shape {array.shape}"
                )
            object.__setattr__(self, name, array)

    def values_at(self, reference: ReferenceRun) -> np.ndarray | None:
        """The candidate's logits at the reference's top-k ids, ``[rows, k]``, or None."""
        if self.ref_topk_values is not None:
            if self.ref_topk_values.shape[0] and self.ref_topk_values.shape[1] != reference.k:
                raise ParityError(
                    f"prompt {self.prompt_id!r}: candidate top-k values do not match the reference's k",
                    expected=f"[steps, {reference.k}]",
                    got=f"{list(self.ref_topk_values.shape)}",
                )
            return self.ref_topk_values
        if self.logits is None:
            return None
        rows = min(self.logits.shape[0], reference.steps)
        ids = reference.top_ids[:rows]
        if rows and int(ids.max()) >= self.logits.shape[1]:
            raise ParityError(
                f"prompt {self.prompt_id!r}: the candidate's vocabulary is smaller than the reference's token ids",
                expected=f"more than {int(ids.max())} logits per step",
                got=f"{self.logits.shape[1]}",
                fix="compare an artifact with the reference of its own source model",
            )
        return np.take_along_axis(self.logits[:rows], ids, axis=1)


@dataclasses.dataclass(frozen=True)
class PromptComparison:
    """The comparison of one prompt; see the module docstring for the definitions.

    ``ref_margin`` is the reference's top-1/top-2 logit margin at ``first_divergence``;
    ``ref_gap`` the reference's top-1 logit minus its logit of the candidate's token there
    (None when that token is outside the reference's top-k, or on a length mismatch).
    ``ref_length`` and ``cand_length`` count tokens after the end-of-sequence cut.
    """

    prompt_id: str
    classification: Outcome
    first_divergence: int | None = None
    ref_token: int | None = None
    cand_token: int | None = None
    ref_margin: float | None = None
    ref_gap: float | None = None
    ref_length: int = 0
    cand_length: int = 0
    step_max_diffs: tuple[float, ...] = ()
    max_logit_diff: float | None = None
    mean_logit_diff: float | None = None
    skip_reason: str | None = None

    @property
    def exact(self) -> bool:
        return self.classification is Outcome.EXACT

    @property
    def compared_steps(self) -> int:
        return len(self.step_max_diffs)

    @property
    def logits_finite(self) -> bool:
        return all(math.isfinite(x) for x in self.step_max_diffs)


def truncate_at_eos(tokens: Sequence[int], eos_token_ids: Collection[int]) -> tuple[int, ...]:
    """``tokens`` cut after the first end-of-sequence token (which is kept)."""
    for index, token in enumerate(tokens):
        if token in eos_token_ids:
            return tuple(tokens[: index + 1])
    return tuple(tokens)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First step where two token sequences differ, the shorter length if one is a strict prefix
    of the other, None if they are equal. (Also what batch-parity checks use.)"""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def skipped(prompt_id: str, reason: str) -> PromptComparison:
    """A prompt that was not run (e.g. longer than the context); counted, never silently dropped."""
    return PromptComparison(prompt_id=prompt_id, classification=Outcome.SKIPPED, skip_reason=reason)


def _logit_diffs(
    reference: ReferenceRun, candidate: CandidateRun, limit: int
) -> tuple[tuple[float, ...], float | None, float | None]:
    values = candidate.values_at(reference)
    if values is None:
        return (), None, None
    steps = min(limit, values.shape[0])
    if steps <= 0:
        return (), None, None
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(values[:steps].astype(np.float64) - reference.top_values[:steps].astype(np.float64))
    diff[~np.isfinite(diff)] = np.inf
    per_step = diff.max(axis=1)
    return tuple(float(x) for x in per_step), float(per_step.max()), float(diff.mean())


def compare_prompt(
    reference: ReferenceRun,
    candidate: CandidateRun,
    tie_threshold: float,
    *,
    eos_token_ids: Collection[int] = (),
) -> PromptComparison:
    """Compare the candidate's greedy generation on one prompt with the reference's.

    ``tie_threshold`` is in logits (the policy's); ``eos_token_ids`` are the artifact's stop
    tokens, used to cut both runs after their first end-of-sequence token.
    """
    if reference.prompt_id != candidate.prompt_id:
        raise ParityError(
            "reference and candidate runs belong to different prompts",
            got=f"{reference.prompt_id!r} and {candidate.prompt_id!r}",
        )
    if not tie_threshold >= 0:
        raise ParityError("tie_threshold must be a non-negative number of logits", got=repr(tie_threshold))
    eos = frozenset(int(t) for t in eos_token_ids)
    ref_tokens = truncate_at_eos(reference.tokens, eos)
    cand_tokens = truncate_at_eos(candidate.tokens, eos)
    step = first_divergence(ref_tokens, cand_tokens)

    ref_token = cand_token = None
    margin = gap = None
    if step is None:
        classification = Outcome.EXACT
        limit = len(ref_tokens)
    else:
        ref_token = ref_tokens[step] if step < len(ref_tokens) else None
        cand_token = cand_tokens[step] if step < len(cand_tokens) else None
        if step < reference.steps:
            margin = float(reference.margins[step])
        if ref_token is None or cand_token is None:
            classification = Outcome.LENGTH_MISMATCH
        else:
            hits = np.flatnonzero(reference.top_ids[step] == cand_token)
            if hits.size:
                gap = float(reference.top_values[step, 0]) - float(reference.top_values[step, hits[0]])
            near = gap is not None and gap < tie_threshold
            classification = Outcome.NEAR_TIE if near else Outcome.DRIFT
        limit = step + 1
    if candidate.teacher_forced:
        limit = len(ref_tokens)
    limit = min(limit, len(ref_tokens))
    step_diffs, max_diff, mean_diff = _logit_diffs(reference, candidate, limit)

    result = PromptComparison(
        prompt_id=reference.prompt_id,
        classification=classification,
        first_divergence=step,
        ref_token=ref_token,
        cand_token=cand_token,
        ref_margin=margin,
        ref_gap=gap,
        ref_length=len(ref_tokens),
        cand_length=len(cand_tokens),
        step_max_diffs=step_diffs,
        max_logit_diff=max_diff,
        mean_logit_diff=mean_diff,
    )
    log.debug(
        "prompt %s: %s at %s (margin %s, max logit diff %s)",
        result.prompt_id, classification.value, step, margin, max_diff,
    )
    return result
