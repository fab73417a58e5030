"""Synthetic reference and candidate runs for the parity tests (no model involved)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from parity.compare import CandidateRun, ReferenceRun

__all__ = ["K", "TOP1", "make_reference", "runner_up", "rank", "candidate"]

K = 6
TOP1 = 10.0


def make_reference(prompt_id: str, tokens: Sequence[int], margins: Sequence[float] | None = None) -> ReferenceRun:
    """A reference whose step t chose tokens[t] at logit 10, the runner-up at 10 - margins[t], and
    the rest 1 logit apart below it. Runner-up ids are 1000 + 10·t + j, so they never collide with
    the small ids the tests use as tokens."""
    steps = len(tokens)
    margins = [2.0] * steps if margins is None else list(margins)
    ids = np.zeros((steps, K), dtype=np.int64)
    values = np.zeros((steps, K), dtype=np.float32)
    for t, token in enumerate(tokens):
        ids[t] = [token] + [1000 + 10 * t + j for j in range(1, K)]
        values[t] = [TOP1] + [TOP1 - margins[t] - j for j in range(K - 1)]
    return ReferenceRun(prompt_id=prompt_id, tokens=tuple(tokens), top_ids=ids, top_values=values)


def rank(reference: ReferenceRun, step: int, r: int) -> int:
    """The token id the reference ranked r-th (0 = its choice) at a step."""
    return int(reference.top_ids[step, r])


def runner_up(reference: ReferenceRun, step: int) -> int:
    return rank(reference, step, 1)


def candidate(
    reference: ReferenceRun,
    tokens: Sequence[int],
    offsets: np.ndarray | float | None = 0.0,
    *,
    rows: int | None = None,
    teacher_forced: bool = False,
) -> CandidateRun:
    """A candidate whose logits at the reference's top-k ids are the reference's plus ``offsets``
    (None: tokens only); ``rows`` limits how many steps carry logits (default: one per token,
    at most the reference's steps)."""
    if offsets is None:
        return CandidateRun(reference.prompt_id, tuple(tokens), teacher_forced=teacher_forced)
    n = min(len(tokens), reference.steps) if rows is None else rows
    offsets = np.asarray(offsets, dtype=np.float64)
    if offsets.ndim == 2:
        offsets = offsets[:n]
    values = reference.top_values[:n].astype(np.float64) + offsets
    return CandidateRun(reference.prompt_id, tuple(tokens), ref_topk_values=values, teacher_forced=teacher_forced)
