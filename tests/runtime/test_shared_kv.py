"""The shared-buffer runtime (:mod:`runtime.shared_kv`) on CPU: greedy tokens equal the concat
artifact's, at batch 1 and at batch 3 with different prompt lengths, with rows finishing early
(compaction) and with the logits kept."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from runtime import Engine, SamplingParams
from runtime.errors import GenerationError


@pytest.fixture(scope="module")
def pair(artifact_cache: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from passes.pipeline import optimize_artifact

    src = artifact_cache("tiny:llama")
    out = tmp_path_factory.mktemp("shared") / "llama-sb"
    optimize_artifact(src, out, device="cpu", precision="fp32", kv_mode="shared-buffer", progress=False)
    return Engine.load(src), Engine.load(out)


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(3, 300, n).tolist() for n in (6, 11, 11, 2)]


def test_loads_as_shared_buffer(pair) -> None:  # type: ignore[no-untyped-def]
    from runtime.shared_kv import SharedBufferEngine

    concat, shared = pair
    assert isinstance(shared, SharedBufferEngine) and not isinstance(concat, SharedBufferEngine)
    assert shared.artifact.manifest["kv_mode"] == "shared-buffer"


@pytest.mark.parametrize("rows", [[0], [0, 1, 3], [0, 1, 2, 3]])
def test_greedy_tokens_match_concat(pair, rows: list[int]) -> None:  # type: ignore[no-untyped-def]
    concat, shared = pair
    prompts = [_prompts()[r] for r in rows]
    want = concat.generate_ids(prompts, 24)
    assert shared.generate_ids(prompts, 24) == want
    assert all(len(w) == 24 for w in want)


def test_rows_finishing_early_match_concat(pair) -> None:  # type: ignore[no-untyped-def]
    """Each row stops on a token it produces at a different step: the batch is compacted."""
    concat, shared = pair
    prompts = [_prompts()[r] for r in (0, 1, 3)]
    free = concat.generate_ids(prompts, 24)
    params = []
    for r, ids in enumerate(free):
        step = 3 + 6 * r
        first = ids.index(ids[step])  # the step where that token first appears
        params.append(SamplingParams(stop_token_ids=(ids[step],)))
        assert first <= step
    want = concat.generate_ids(prompts, 24, params)
    got = shared.generate_ids(prompts, 24, params)
    assert got == want and len({len(g) for g in got}) > 1


def test_logits_match_concat(pair) -> None:  # type: ignore[no-untyped-def]
    concat, shared = pair
    prompts = [_prompts()[r] for r in (0, 1)]
    a = concat.generate_results(prompts, 8, return_logits=True)
    b = shared.generate_results(prompts, 8, return_logits=True)
    for x, y in zip(a, b):
        assert x.step_logits.shape == y.step_logits.shape == (8, concat.vocab)
        np.testing.assert_allclose(x.step_logits, y.step_logits, atol=1e-4)


def test_sampling_is_reproducible(pair) -> None:  # type: ignore[no-untyped-def]
    concat, shared = pair
    p = SamplingParams(temperature=0.8, top_k=20, seed=3)
    prompts = [_prompts()[r] for r in (0, 1)]
    assert shared.generate_ids(prompts, 12, p) == concat.generate_ids(prompts, 12, p)


def test_cuda_graph_refusals(pair, artifact_cache) -> None:  # type: ignore[no-untyped-def]
    _, shared = pair
    with pytest.raises(GenerationError, match="cuda_graph"):
        Engine.load(shared.artifact.path, cuda_graph=True)  # CPU
    with pytest.raises(GenerationError, match="shared-buffer"):
        Engine.load(artifact_cache("tiny:llama"), cuda_graph=True)
    with pytest.raises(GenerationError, match="Engine.load"):
        Engine(shared.artifact)


def test_fused_greedy_path_is_taken_and_matches_concat(pair) -> None:  # type: ignore[no-untyped-def]
    """Greedy batches run the fused step (runtime.step_graph); min-new-tokens suppression and the
    repetition penalty happen inside it and give the concat engine's (three-session) tokens."""
    concat, shared = pair
    prompts = [_prompts()[r] for r in (0, 1, 3)]
    free = concat.generate_ids(prompts, 20)
    params = [SamplingParams(stop_token_ids=(free[0][2],), min_new_tokens=10),
              SamplingParams(repetition_penalty=1.3),
              SamplingParams(top_k=1, stop_token_ids=(free[2][5],))]
    before = shared.fused_steps
    want = concat.generate_ids(prompts, 20, params)
    assert shared.generate_ids(prompts, 20, params) == want
    assert shared.fused_steps - before == max(len(w) for w in want) - 1 > 0
    assert len(want[0]) >= 10 and want[1] != free[1]  # the two processors did act


@pytest.mark.parametrize("read_every", [1, 3, 64])
def test_read_every_does_not_change_tokens(pair, read_every: int) -> None:  # type: ignore[no-untyped-def]
    """Ids are read back once per block of ``read_every`` steps; rows stopping inside a block
    ignore the rest of it. Blocks of 1, of 3 (not dividing the length) and longer than the run."""
    from runtime.shared_kv import SharedBufferEngine

    concat, shared = pair
    engine = SharedBufferEngine(shared.artifact, read_every=read_every)
    prompts = [_prompts()[r] for r in (0, 1, 3)]
    free = concat.generate_ids(prompts, 17)
    params = [SamplingParams(stop_token_ids=(free[r][4 + 5 * r],)) for r in range(3)]
    assert engine.generate_ids(prompts, 17, params) == concat.generate_ids(prompts, 17, params)
    assert engine.generate_ids(prompts, 17) == free


def test_mixed_batch_samples_on_the_three_session_path(pair) -> None:  # type: ignore[no-untyped-def]
    concat, shared = pair
    prompts = [_prompts()[r] for r in (0, 1)]
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=5, seed=11)]
    before = shared.fused_steps
    assert shared.generate_ids(prompts, 10, params) == concat.generate_ids(prompts, 10, params)
    assert shared.fused_steps == before
    with pytest.raises(GenerationError, match="read_every"):
        type(shared)(shared.artifact, read_every=0)


def test_fused_prefill_picks_the_first_token_in_the_step_model(pair) -> None:  # type: ignore[no-untyped-def]
    """A greedy batch's prefill is the step model's run (no sampler session): its first ids, the
    min-new-tokens suppression at step 0, the prompt-seeded repetition penalty and the kept
    logits equal the concat engine's and the sampler-session prefill's, over prompt groups of
    unequal lengths."""
    concat, shared = pair
    prompts = [_prompts()[r] for r in (0, 1, 2, 3)]  # lengths 6, 11, 11, 2: three prefill runs
    free = concat.generate_ids(prompts, 6)
    params = [SamplingParams(stop_token_ids=(free[0][0],), min_new_tokens=3),  # the first pick is suppressed
              SamplingParams(repetition_penalty=1.5), SamplingParams(), SamplingParams(min_new_tokens=2)]
    state = shared.start(prompts, 6, params)
    first = shared.prefill(state)
    assert state.sampler == {} and state.steps == 1  # the sampler session never ran
    want = concat.generate_results(prompts, 6, params, return_logits=True)
    assert first.tolist() == [w.token_ids[0] for w in want]
    assert want[0].token_ids[0] != free[0][0]
    try:
        shared.fuse_prefill = False
        unfused = shared.generate_results(prompts, 6, params, return_logits=True)
    finally:
        shared.fuse_prefill = True
    fused = shared.generate_results(prompts, 6, params, return_logits=True)
    state = shared.start(prompts, 6, params)  # the choice is made once, at allocation
    try:
        shared.fuse_prefill = False
        assert shared.prefill(state).tolist() == first.tolist() and state.sampler == {}
    finally:
        shared.fuse_prefill = True
    for w, u, f in zip(want, unfused, fused):
        assert w.token_ids == u.token_ids == f.token_ids
        np.testing.assert_allclose(f.step_logits, w.step_logits, atol=1e-4)
        np.testing.assert_array_equal(f.step_logits, u.step_logits)
