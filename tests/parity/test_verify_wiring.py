"""``verify_artifact`` acts on what batch parity finds: the helpers are tested in test_verify.py,
this tests the wiring (a batch-parity mismatch must fail the verdict, with its reason)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import parity.verify as verify_module
from parity.prompts import smoke_prompts_path
from parity.verify import BatchMismatch, verify_artifact

SMOKE = str(smoke_prompts_path())


def test_a_batch_parity_mismatch_fails_verify_with_its_reason(tiny_llama: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch parity made to report one prompt whose batched token differs; everything else passes."""
    calls: list[tuple[str, ...]] = []

    def one_mismatch(engine: Any, prompt_ids: Any, input_ids: Any, single_tokens: Any, max_new_tokens: int,
                     **kwargs: Any) -> list[BatchMismatch]:
        calls.append(tuple(prompt_ids))
        first = prompt_ids[0]
        token = single_tokens[first][0]
        return [BatchMismatch(prompt_id=first, step=0, single_token=token, batch_token=token + 1)]

    monkeypatch.setattr(verify_module, "batch_parity", one_mismatch)
    result = verify_artifact(tiny_llama, SMOKE, max_new_tokens=8, progress=False)
    assert len(calls) == 1 and len(calls[0]) == 6
    assert not result.passed
    assert len(result.batch_mismatches) == 1 and result.batch_mismatches[0].prompt_id == calls[0][0]
    assert any(r.startswith("batch parity: 1 prompt(s)") and calls[0][0] in r for r in result.verdict.reasons), \
        result.verdict.reasons
    # every prompt alone is still exact: the batch mismatch alone failed it
    assert all(c.first_divergence is None for c in result.comparisons)


def test_batch_size_0_skips_batch_parity(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> list[BatchMismatch]:
        raise AssertionError("batch parity ran with batch_size=0")

    monkeypatch.setattr(verify_module, "batch_parity", never)
    result = verify_artifact(tiny_llama, SMOKE, max_new_tokens=8, progress=False, batch_size=0)
    assert result.passed, result.verdict.reasons
    assert result.batch_mismatches == ()
