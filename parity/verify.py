"""``verify``: run an artifact on the fixed prompts and judge it against the PyTorch reference.

One verify run, in order:

1. **Encode** every prompt once with the *artifact's* tokenizer (chat prompts through the
   artifact's chat template, rendered by :class:`runtime.Engine` in its sandbox). Both runs use
   these same ids, so a numerical finding is never confounded by a tokenizer difference. A prompt
   that does not fit (prompt + ``max_new_tokens`` beyond the artifact's ``max_context``), or a
   chat prompt on an artifact without a chat template, is *skipped*: logged as a warning, counted
   and listed in the report, never dropped silently.
2. **Reference**: PyTorch eager fp32 greedy generation on the artifact's recorded source model
   (``manifest["source"]``; for an optimized artifact that is the model its fp32 input was
   exported from), from the cache ``ARTIFACT/parity/reference.jsonl`` or the shared one under
   ``~/.cache/lmforge`` where its key matches (:mod:`parity.reference`). When the artifact's own
   cache is absent and the manifest records the artifact it was made from (``optimize.from.path``,
   see :func:`recorded_input_artifact`), that artifact's cache seeds it, so verifying a new
   precision does not recompute the references. ``use_cache=False`` computes them afresh.
3. **Candidate**: the runtime :class:`~runtime.Engine`, greedy, one prompt at a time, with the
   last-position logits of every step copied to the host.
4. **Compare** per prompt (:func:`parity.compare.compare_prompt`) and **judge** with the policy of
   the artifact's precision (:func:`parity.policy.evaluate`).
5. **Batch parity**: the compared prompts again, as left-padded batches of at most
   ``batch_size``, must give the same tokens as one by one (each cut after its first
   end-of-sequence token). A mismatch is a failure reason of its own: padding, masks or position
   ids are then wrong somewhere, whatever the logits say.

The result (:class:`VerifyResult`) carries everything the reports (:mod:`parity.report`) and the
layer-wise debugger (:mod:`parity.layerwise`) need.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from parity.compare import (
    CandidateRun,
    Outcome,
    PromptComparison,
    ReferenceRun,
    compare_prompt,
    first_divergence,
    skipped,
    truncate_at_eos,
)
from parity.policy import Policy, Verdict, evaluate, policy_for
from parity.prompts import Prompt, default_prompts_path, load_prompts
from parity.reference import CACHE_RELATIVE_PATH, reference_runs
from runtime.artifact import KvMode, load_artifact
from runtime.errors import LmforgeError, ParityError

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_BATCH_SIZE",
    "BatchMismatch",
    "VerifyResult",
    "recorded_input_artifact",
    "encode_prompts",
    "batch_parity",
    "verify_artifact",
    "failing_prompt",
]

log = logging.getLogger(__name__)
progress_log = logging.getLogger("lmforge.progress")  # what a person waiting sees (lmforge.cli prints it)

DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class BatchMismatch:
    """A prompt whose tokens in a left-padded batch differ from its tokens run alone."""

    prompt_id: str
    step: int  # first differing step (the shorter length when one is a prefix of the other)
    single_token: int | None
    batch_token: int | None
    # The reference's top-1 logit minus its logit of the batched token at ``step``, when the run
    # alone agreed with the reference up to that step (else None: no valid context to judge by).
    ref_gap: float | None = None
    near_tie: bool = False
    # Which logits judged it: "reference", or "candidate" (the run alone had already left the
    # reference at an earlier near-tie, so its own logits at ``step`` are the only valid context).
    judged_by: str | None = None

    def describe(self) -> str:
        gap = f", {self.judged_by or 'reference'} gap {self.ref_gap:.3g}" if self.ref_gap is not None else ""
        return f"{self.prompt_id} at step {self.step} ({self.single_token} alone, {self.batch_token} batched{gap})"


ALONE_TOP_K = 20  # candidate logits kept per step of each run alone, to judge batch mismatches


def top_k_rows(logits: Any, k: int = ALONE_TOP_K) -> tuple[tuple[tuple[int, ...], tuple[float, ...]], ...]:
    """Per step, the ``k`` largest logits of a ``[steps, vocab]`` array as (ids, values), largest first."""
    import numpy as np

    if logits is None:
        return ()
    arr = np.asarray(logits, dtype=np.float32)
    idx = np.argsort(-arr, axis=1, kind="stable")[:, :k]
    return tuple((tuple(int(i) for i in row), tuple(float(arr[t, i]) for i in row)) for t, row in enumerate(idx))


def _gap(ids: Sequence[int], values: Sequence[float], token: int) -> float:
    return float(values[0]) - float(values[list(ids).index(token)]) if token in ids else math.inf


def judge_batch_mismatch(mismatch: BatchMismatch, reference: Any, comparison: PromptComparison,
                         tie_threshold: float,
                         alone_top: Sequence[tuple[Sequence[int], Sequence[float]]] = ()) -> BatchMismatch:
    """Classify a batch mismatch as the prompt comparison classifies a divergence.

    Reduced-precision kernels may pick differently between a batch of 8 and a batch of 1 where the
    model itself is undecided. When the run alone matched the reference up to the mismatch step,
    the reference says how close the batched token was: within ``tie_threshold`` logits of its own
    choice is a near-tie. When the run alone had already left the reference earlier (itself a
    divergence the prompt comparison judged), the reference has no context for this step; the
    run alone's own logits there (``alone_top``, its top-k per step) judge it the same way — an
    activation-quantized graph flips between batch and alone exactly where its own margin is
    small. Anything else stays a real mismatch.
    """
    step, token = mismatch.step, mismatch.batch_token
    if token is None:
        return mismatch
    agreed = comparison.first_divergence is None or comparison.first_divergence >= step
    if agreed and step < len(reference.top_ids):
        ids = [int(i) for i in reference.top_ids[step]]
        gap = _gap(ids, [float(v) for v in reference.top_values[step]], token)
        return dataclasses.replace(mismatch, ref_gap=gap, near_tie=gap < tie_threshold, judged_by="reference")
    if not agreed and step < len(alone_top):
        alone_ids, values = alone_top[step]
        gap = _gap(list(alone_ids), values, token)
        return dataclasses.replace(mismatch, ref_gap=gap, near_tie=gap < tie_threshold, judged_by="candidate")
    return mismatch


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """One verify run: the verdict (batch parity included), the per-prompt comparisons and what
    produced them. ``input_ids`` holds the encoded prompts (skipped ones too, where they could be
    encoded); ``references`` the reference runs of the compared prompts."""

    artifact: Path
    precision: str
    policy: Policy
    verdict: Verdict
    comparisons: tuple[PromptComparison, ...]
    batch_mismatches: tuple[BatchMismatch, ...]
    input_ids: Mapping[str, tuple[int, ...]]
    references: Mapping[str, ReferenceRun]
    candidate_tokens: Mapping[str, tuple[int, ...]]
    max_new_tokens: int
    device: str
    prompts_path: Path
    timings: Mapping[str, float]
    decode: Callable[[int], str] | None = None

    @property
    def passed(self) -> bool:
        return self.verdict.passed


def recorded_input_artifact(manifest: Mapping[str, Any]) -> Path | None:
    """The artifact an optimized artifact was made from, as ``lmforge optimize`` records it
    (``manifest["optimize"]["from"]["path"]``); None for a converted artifact."""
    origin = (manifest.get("optimize") or {}).get("from") or {}
    path = origin.get("path") if isinstance(origin, Mapping) else None
    return Path(path) if isinstance(path, str) and path else None


def _seed_reference_cache(artifact_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Copy the input artifact's reference cache when this artifact has none (keys guard staleness)."""
    own = artifact_dir / CACHE_RELATIVE_PATH
    source = recorded_input_artifact(manifest)
    if own.exists() or source is None:
        return
    theirs = source / CACHE_RELATIVE_PATH
    if not theirs.is_file():
        return
    try:
        own.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(theirs, own)
        log.info("seeded the reference cache from %s", theirs)
    except OSError as exc:
        log.warning("cannot copy the reference cache %s (%s); references will be recomputed", theirs, exc)


def encode_prompts(
    engine: Any, prompts: Sequence[Prompt], max_new_tokens: int
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Token ids per prompt id with the artifact's tokenizer, and the reasons of prompts to skip."""
    ids: dict[str, tuple[int, ...]] = {}
    skip: dict[str, str] = {}
    has_template = engine.chat_template is not None
    for prompt in prompts:
        if prompt.chat and not has_template:
            skip[prompt.id] = "chat prompt, the artifact has no chat template"
            continue
        try:
            encoded = (
                engine.chat_ids([{"role": "user", "content": prompt.prompt}])
                if prompt.chat
                else engine.encode(prompt.prompt)
            )
        except LmforgeError as exc:
            raise ParityError(
                f"prompt {prompt.id!r} cannot be encoded with the artifact's tokenizer ({exc.what})",
                fix="check the artifact's tokenizer/ folder",
            ) from exc
        ids[prompt.id] = tuple(int(t) for t in encoded)
        if not encoded:
            skip[prompt.id] = "encodes to no tokens"
        elif len(encoded) + max_new_tokens > engine.max_context:
            skip[prompt.id] = f"{len(encoded)} + {max_new_tokens} tokens exceed the max context {engine.max_context}"
    for prompt_id, reason in skip.items():
        log.warning("skipping prompt %s: %s", prompt_id, reason)
    return ids, skip


def batch_parity(
    engine: Any,
    prompt_ids: Sequence[str],
    input_ids: Mapping[str, Sequence[int]],
    single_tokens: Mapping[str, Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> list[BatchMismatch]:
    """Run the prompts as left-padded batches of at most ``batch_size`` (in the given order, so
    lengths mix and padding is real) and list those whose tokens differ from ``single_tokens``."""
    from tqdm.auto import tqdm

    eos = engine.eos_token_ids
    mismatches: list[BatchMismatch] = []
    chunks = [list(prompt_ids[i : i + batch_size]) for i in range(0, len(prompt_ids), batch_size)]
    for chunk in tqdm(chunks, desc=f"batch parity (≤{batch_size} a batch)", unit="batch", disable=not progress):
        results = engine.generate_results([list(input_ids[p]) for p in chunk], max_new_tokens)
        for prompt_id, result in zip(chunk, results):
            alone = truncate_at_eos(single_tokens[prompt_id], eos)
            batched = truncate_at_eos(result.token_ids, eos)
            step = first_divergence(alone, batched)
            if step is not None:
                mismatches.append(BatchMismatch(
                    prompt_id=prompt_id, step=step,
                    single_token=alone[step] if step < len(alone) else None,
                    batch_token=batched[step] if step < len(batched) else None,
                ))
    return mismatches


def _with_batch_reason(verdict: Verdict, mismatches: Sequence[BatchMismatch], strict: bool) -> Verdict:
    """Fail on real batch mismatches; near-ties fail only where the policy is exact (``strict``)."""
    if not mismatches:
        return verdict
    real = [m for m in mismatches if strict or not m.near_tie]
    ties = [m for m in mismatches if m not in real]

    def shown(items: Sequence[BatchMismatch]) -> str:
        return ", ".join(m.describe() for m in items[:5]) + (f", … {len(items) - 5} more" if len(items) > 5 else "")

    notes = verdict.notes
    if ties:
        notes += (f"batch parity: {len(ties)} near-tie(s) between a batch and one-by-one ({shown(ties)})",)
    if not real:
        return dataclasses.replace(verdict, notes=notes)
    reason = (f"batch parity: {len(real)} prompt(s) give other tokens in a left-padded batch than alone "
              f"({shown(real)}); check padding, attention_mask and position_ids")
    return dataclasses.replace(verdict, passed=False, reasons=verdict.reasons + (reason,), notes=notes)


def verify_artifact(
    artifact_dir: str | os.PathLike[str],
    prompts_path: str | os.PathLike[str] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: str = "cpu",
    reference: str | None = None,
    progress: bool = True,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_cache: bool = True,
) -> VerifyResult:
    """Verify an artifact against its source model on a prompt set; see the module docstring.

    ``prompts_path`` defaults to the committed full set; ``reference`` overrides the source model
    recorded in the manifest (a Hugging Face folder or .gguf file); ``batch_size`` 0 skips batch
    parity; ``use_cache=False`` computes the reference afresh and caches nothing. Raises
    :class:`ParityError` (or another :class:`LmforgeError`) on bad input.
    """
    from tqdm.auto import tqdm

    from runtime import Engine

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ParityError("invalid max_new_tokens", expected="an integer >= 1", got=repr(max_new_tokens))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ParityError("invalid batch size", expected="an integer >= 0 (0 skips batch parity)", got=repr(batch_size))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    prompts_file = Path(prompts_path) if prompts_path is not None else default_prompts_path()
    prompts = load_prompts(prompts_file)

    t0 = time.perf_counter()
    # On CUDA a shared-buffer artifact is verified as it is served: captured fused decode steps.
    shared = device == "cuda" and load_artifact(artifact_dir, verify_hashes=False).kv_mode is KvMode.SHARED_BUFFER
    engine = Engine.load(artifact_dir, device=device, cuda_graph=shared)
    artifact = engine.artifact
    manifest = artifact.manifest
    precision = artifact.precision
    policy = policy_for(precision)
    timings["load"] = time.perf_counter() - t0
    if engine.tokenizer is None:
        raise ParityError(f"artifact {artifact.path} has no tokenizer/tokenizer.json",
                          fix="re-export the artifact with its tokenizer; verify encodes prompts with it")

    input_ids, skip = encode_prompts(engine, prompts, max_new_tokens)
    run = [p for p in prompts if p.id not in skip]
    log.info("verifying %s (%s) on %d prompts from %s, %d skipped, %d new tokens",
             artifact.path, precision, len(run), prompts_file, len(skip), max_new_tokens)

    t0 = time.perf_counter()
    references: dict[str, ReferenceRun] = {}
    if run:
        if use_cache:
            _seed_reference_cache(artifact.path, manifest)
        references = reference_runs(
            artifact.path, manifest, run, input_ids, max_new_tokens,
            eos_token_ids=sorted(engine.eos_token_ids), reference=reference, progress=progress, use_cache=use_cache,
        )
    timings["reference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    comparisons: dict[str, PromptComparison] = {}
    candidate_tokens: dict[str, tuple[int, ...]] = {}
    alone_top: dict[str, Any] = {}
    for prompt in tqdm(run, desc=f"candidate ({precision}, {device})", unit="prompt", disable=not progress):
        (result,) = engine.generate_results([list(input_ids[prompt.id])], max_new_tokens, return_logits=True)
        candidate_tokens[prompt.id] = tuple(result.token_ids)
        alone_top[prompt.id] = top_k_rows(result.step_logits)
        candidate = CandidateRun(prompt_id=prompt.id, tokens=result.token_ids, logits=result.step_logits)
        comparisons[prompt.id] = compare_prompt(
            references[prompt.id], candidate, policy.tie_threshold, eos_token_ids=engine.eos_token_ids
        )
    timings["candidate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mismatches: list[BatchMismatch] = []
    if batch_size and run:
        mismatches = batch_parity(engine, [p.id for p in run], input_ids, candidate_tokens, max_new_tokens,
                                  batch_size=batch_size, progress=progress)
    timings["batch"] = time.perf_counter() - t0

    ordered = tuple(comparisons[p.id] if p.id in comparisons else skipped(p.id, skip[p.id]) for p in prompts)
    verdict = evaluate(policy, ordered)
    mismatches = [judge_batch_mismatch(m, references[m.prompt_id], comparisons[m.prompt_id], policy.tie_threshold,
                                       alone_top.get(m.prompt_id, ()))
                  for m in mismatches]
    verdict = _with_batch_reason(verdict, mismatches, strict=policy.min_exact_fraction >= 1.0)
    timings["total"] = time.perf_counter() - started
    progress_log.info("verify %s: %s in %.1f s (%s)", artifact.path, "passed" if verdict.passed else "FAILED",
             timings["total"], ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total"))

    def decode(token: int) -> str:
        return engine.decode([token])

    return VerifyResult(
        artifact=artifact.path, precision=precision, policy=policy, verdict=verdict, comparisons=ordered,
        batch_mismatches=tuple(mismatches), input_ids=input_ids, references=references,
        candidate_tokens=candidate_tokens, max_new_tokens=max_new_tokens, device=device,
        prompts_path=prompts_file, timings=timings, decode=decode,
    )


def failing_prompt(result: VerifyResult) -> tuple[str, int] | None:
    """The prompt and step a layer-wise comparison should look at: the first non-exact compared
    prompt (in file order) at its first divergence; else the prompt and step with the largest
    logit difference over the policy's tolerance; else the first batch mismatch (at step 0). None
    when nothing failed."""
    for c in result.comparisons:
        if (
            c.classification in (Outcome.DRIFT, Outcome.NEAR_TIE, Outcome.LENGTH_MISMATCH)
            and c.first_divergence is not None
        ):
            return c.prompt_id, c.first_divergence
    tolerance = result.policy.max_logit_diff
    if tolerance is not None:
        worst: tuple[float, str, int] | None = None
        for c in result.comparisons:
            for step, diff in enumerate(c.step_max_diffs):
                value = diff if math.isfinite(diff) else math.inf
                if value > tolerance and (worst is None or value > worst[0]):
                    worst = (value, c.prompt_id, step)
        if worst is not None:
            return worst[1], worst[2]
    if result.batch_mismatches:
        return result.batch_mismatches[0].prompt_id, 0
    return None

