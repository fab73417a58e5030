from __future__ import annotations

import json
import math

import numpy as np
import pytest

from parity.compare import (
    CandidateRun,
    Outcome,
    ReferenceRun,
    compare_prompt,
    first_divergence,
    skipped,
    truncate_at_eos,
)
from runtime.errors import ParityError
from tests.parity._synth import K, candidate, make_reference, rank, runner_up

EOS = 2
TINY = 1 / 128  # margins and offsets are dyadic so that float32 holds them exactly
TOKENS = [11, 12, 13, 14, 15, 16, 17, 18]


# --- classification ---------------------------------------------------------------------------


def test_identical_runs_are_exact_with_zero_logit_difference():
    ref = make_reference("p", TOKENS)
    result = compare_prompt(ref, candidate(ref, TOKENS), tie_threshold=0.1)
    assert result.classification is Outcome.EXACT and result.exact
    assert result.first_divergence is None
    assert result.ref_token is None and result.cand_token is None and result.ref_margin is None
    assert result.compared_steps == len(TOKENS)
    assert result.max_logit_diff == 0.0 and result.mean_logit_diff == 0.0
    assert (result.ref_length, result.cand_length) == (8, 8)


def test_flip_to_runner_up_below_tie_threshold_is_near_tie():
    margins = [2.0, 2.0, 2.0, 0.25, 2.0, 2.0, 2.0, 2.0]
    ref = make_reference("p", TOKENS, margins)
    cand_tokens = TOKENS[:3] + [runner_up(ref, 3), 99, 98]
    result = compare_prompt(ref, candidate(ref, cand_tokens), tie_threshold=0.5)
    assert result.classification is Outcome.NEAR_TIE and not result.exact
    assert result.first_divergence == 3
    assert (result.ref_token, result.cand_token) == (14, runner_up(ref, 3))
    assert result.ref_margin == pytest.approx(0.25)
    assert result.ref_gap == pytest.approx(0.25)  # the runner-up: the gap is the margin


def test_flip_with_a_clear_reference_margin_is_drift():
    ref = make_reference("p", TOKENS, [2.0] * 8)
    cand_tokens = TOKENS[:5] + [runner_up(ref, 5), 7]
    result = compare_prompt(ref, candidate(ref, cand_tokens), tie_threshold=0.5)
    assert result.classification is Outcome.DRIFT
    assert result.first_divergence == 5
    assert (result.ref_token, result.cand_token) == (16, runner_up(ref, 5))
    assert result.ref_margin == pytest.approx(2.0)


def test_tie_threshold_is_strict():
    ref = make_reference("p", TOKENS, [0.5] * 8)  # 10 - 0.5 is exact in float32
    cand = candidate(ref, TOKENS[:2] + [runner_up(ref, 2)])
    assert compare_prompt(ref, cand, tie_threshold=0.5).classification is Outcome.DRIFT
    assert compare_prompt(ref, cand, tie_threshold=0.5001).classification is Outcome.NEAR_TIE


def test_small_margin_but_candidate_picks_a_distant_token_is_drift():
    # The reference's top two nearly tie, but the candidate chose its 4th choice (gap 2 + 1/128).
    ref = make_reference("p", TOKENS, [TINY] * 8)
    cand_tokens = TOKENS[:1] + [rank(ref, 1, 3)]
    result = compare_prompt(ref, candidate(ref, cand_tokens), tie_threshold=0.5)
    assert result.classification is Outcome.DRIFT
    assert result.ref_margin == TINY
    assert result.ref_gap == 2 + TINY


def test_candidate_token_outside_reference_top_k_is_drift_without_gap():
    ref = make_reference("p", TOKENS, [TINY] * 8)
    result = compare_prompt(ref, candidate(ref, [11, 12, 555]), tie_threshold=1.0)
    assert result.classification is Outcome.DRIFT
    assert result.first_divergence == 2 and result.cand_token == 555
    assert result.ref_gap is None and result.ref_margin == TINY


def test_candidate_that_stopped_early_without_eos_is_length_mismatch():
    ref = make_reference("p", TOKENS, [float(t) / 10 + 0.5 for t in range(8)])
    result = compare_prompt(ref, candidate(ref, TOKENS[:5]), tie_threshold=0.1, eos_token_ids=[EOS])
    assert result.classification is Outcome.LENGTH_MISMATCH
    assert result.first_divergence == 5
    assert (result.ref_token, result.cand_token) == (16, None)
    assert result.ref_margin == pytest.approx(1.0)
    assert (result.ref_length, result.cand_length) == (8, 5)


def test_candidate_that_ran_past_the_reference_is_length_mismatch():
    ref = make_reference("p", TOKENS[:4])
    result = compare_prompt(ref, candidate(ref, TOKENS), tie_threshold=0.1, eos_token_ids=[EOS])
    assert result.classification is Outcome.LENGTH_MISMATCH
    assert result.first_divergence == 4
    assert (result.ref_token, result.cand_token) == (None, 15)
    assert result.ref_margin is None  # the reference has no step 4
    assert result.compared_steps == 4


# --- end of sequence --------------------------------------------------------------------------


def test_same_eos_then_candidate_keeps_generating_is_exact():
    ref_tokens = [11, 12, 13, EOS]
    ref = make_reference("p", ref_tokens)
    cand = candidate(ref, ref_tokens + [40, 41, 42])
    result = compare_prompt(ref, cand, tie_threshold=0.1, eos_token_ids=[EOS])
    assert result.classification is Outcome.EXACT
    assert (result.ref_length, result.cand_length) == (4, 4)
    assert result.compared_steps == 4
    # Without the stop tokens the same runs are not equal: the prefix ends, one goes on.
    assert compare_prompt(ref, cand, tie_threshold=0.1).classification is Outcome.LENGTH_MISMATCH


def test_reference_generated_past_its_eos_is_cut_there():
    ref_tokens = [11, 12, EOS, 30, 31]  # e.g. a reference made with EOS ignored
    ref = make_reference("p", ref_tokens)
    result = compare_prompt(ref, candidate(ref, [11, 12, EOS]), tie_threshold=0.1, eos_token_ids=[7, EOS])
    assert result.classification is Outcome.EXACT
    assert result.ref_length == 3 and result.compared_steps == 3


def test_candidate_eos_where_reference_continues_is_a_divergence_at_that_step():
    ref = make_reference("p", TOKENS, [TINY] * 8)
    near = compare_prompt(
        ref, candidate(ref, [11, 12, runner_up(ref, 2)]), tie_threshold=0.1, eos_token_ids=[runner_up(ref, 2)]
    )
    assert near.classification is Outcome.NEAR_TIE and near.first_divergence == 2
    assert near.cand_token == runner_up(ref, 2) and near.cand_length == 3
    ref2 = make_reference("q", TOKENS)
    drift = compare_prompt(ref2, candidate(ref2, [11, EOS]), tie_threshold=0.1, eos_token_ids=[EOS])
    assert drift.classification is Outcome.DRIFT
    assert (drift.first_divergence, drift.ref_token, drift.cand_token) == (1, 12, EOS)


def test_reference_eos_where_candidate_continues_is_a_divergence():
    ref = make_reference("p", [11, 12, EOS])
    result = compare_prompt(ref, candidate(ref, [11, 12, 13, 14]), tie_threshold=0.1, eos_token_ids=[EOS])
    assert result.classification is Outcome.DRIFT
    assert (result.first_divergence, result.ref_token, result.cand_token) == (2, EOS, 13)


# --- logit differences ------------------------------------------------------------------------


def test_logit_difference_math_on_the_reference_top_k():
    ref = make_reference("p", TOKENS[:4])
    offsets = np.zeros((4, K))
    offsets[0, 0] = 2**-13
    offsets[1, 2] = -(2**-8)  # a candidate logit below the reference's counts by its absolute value
    offsets[2, :] = 2**-11
    offsets[3, 5] = 0.25
    offsets[3, 1] = 2**-5
    result = compare_prompt(ref, candidate(ref, TOKENS[:4], offsets), tie_threshold=0.1)
    assert result.classification is Outcome.EXACT
    assert result.step_max_diffs == (2**-13, 2**-8, 2**-11, 0.25)
    assert result.max_logit_diff == 0.25
    assert result.mean_logit_diff == pytest.approx((2**-13 + 2**-8 + K * 2**-11 + 0.25 + 2**-5) / (4 * K), rel=1e-12)


def test_free_running_diffs_stop_at_the_divergence_step_inclusive():
    ref = make_reference("p", TOKENS, [2.0] * 8)
    offsets = np.full((8, K), 0.01)
    offsets[4:] = 50.0  # after the divergence the contexts differ: must not be counted
    offsets[3, 1] = 0.3
    cand_tokens = TOKENS[:3] + [runner_up(ref, 3)] + TOKENS[4:]
    result = compare_prompt(ref, candidate(ref, cand_tokens, offsets), tie_threshold=0.1)
    assert result.first_divergence == 3
    assert result.compared_steps == 4
    assert result.max_logit_diff == pytest.approx(0.3, rel=1e-5)


def test_teacher_forced_candidate_is_compared_on_every_step():
    ref = make_reference("p", TOKENS, [2.0] * 8)
    offsets = np.full((8, K), 0.01)
    offsets[6, 0] = 4.0
    cand_tokens = TOKENS[:3] + [runner_up(ref, 3)] + TOKENS[4:]
    result = compare_prompt(ref, candidate(ref, cand_tokens, offsets, teacher_forced=True), tie_threshold=0.1)
    assert result.first_divergence == 3 and result.classification is Outcome.DRIFT
    assert result.compared_steps == 8
    assert result.max_logit_diff == pytest.approx(4.0, rel=1e-5)
    assert int(np.argmax(result.step_max_diffs)) == 6


def test_full_logit_vectors_are_gathered_at_the_reference_ids():
    ref = make_reference("p", TOKENS[:3])
    vocab = 1100
    rng = np.random.default_rng(0)
    logits = rng.normal(-5.0, 1.0, size=(3, vocab)).astype(np.float32)
    for t in range(3):
        logits[t, ref.top_ids[t]] = ref.top_values[t] + 0.125 * (t + 1)
    result = compare_prompt(ref, CandidateRun("p", TOKENS[:3], logits=logits), tie_threshold=0.1)
    np.testing.assert_allclose(result.step_max_diffs, [0.125, 0.25, 0.375])
    assert result.mean_logit_diff == pytest.approx(0.25)


def test_tokens_only_candidate_has_no_logit_difference():
    ref = make_reference("p", TOKENS)
    result = compare_prompt(ref, candidate(ref, TOKENS, None), tie_threshold=0.1)
    assert result.exact and result.max_logit_diff is None and result.compared_steps == 0


def test_candidate_with_fewer_logit_rows_compares_only_those():
    ref = make_reference("p", TOKENS)
    result = compare_prompt(ref, candidate(ref, TOKENS, 0.001, rows=5), tie_threshold=0.1)
    assert result.exact and result.compared_steps == 5


def test_non_finite_candidate_logits_become_inf():
    ref = make_reference("p", TOKENS[:3])
    offsets = np.zeros((3, K))
    offsets[1, 2] = np.nan
    result = compare_prompt(ref, candidate(ref, TOKENS[:3], offsets), tie_threshold=0.1)
    assert result.step_max_diffs[0] == 0.0 and math.isinf(result.step_max_diffs[1])
    assert math.isinf(result.max_logit_diff) and not result.logits_finite


# --- helpers and validation -------------------------------------------------------------------


def test_truncate_at_eos_and_first_divergence():
    assert truncate_at_eos([5, 2, 7, 2], {2}) == (5, 2)
    assert truncate_at_eos([5, 6], {2}) == (5, 6)
    assert truncate_at_eos([5, 6], ()) == (5, 6)
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], []) is None


def test_skipped_prompt():
    result = skipped("long", "prompt of 9000 tokens exceeds the context of 8192")
    assert result.classification is Outcome.SKIPPED and not result.exact
    assert result.skip_reason.startswith("prompt of 9000")


def test_reference_json_round_trip_is_bit_exact():
    rng = np.random.default_rng(1)
    values = np.sort(rng.normal(0, 5, size=(4, K)).astype(np.float32), axis=1)[:, ::-1]
    ref = ReferenceRun("p", (3, 4, 5, 6), rng.integers(0, 50000, size=(4, K)), values)
    back = ReferenceRun.from_json(json.loads(json.dumps(ref.to_json())))
    assert back.tokens == ref.tokens
    assert np.array_equal(back.top_ids, ref.top_ids)
    assert back.top_values.dtype == np.float32 and np.array_equal(back.top_values, ref.top_values)
    assert not back.top_values.flags.writeable


def test_malformed_reference_entry_is_refused():
    with pytest.raises(ParityError, match="malformed"):
        ReferenceRun.from_json(
            {"prompt_id": "p", "tokens": [1, 2], "top_ids": [[1, 2], [3]], "top_values": [[1.0, 0.0], [1.0]]}
        )
    with pytest.raises(ParityError, match="malformed"):
        ReferenceRun.from_json({"prompt_id": "p", "tokens": [1]})


@pytest.mark.parametrize(
    ("ids", "values", "message"),
    [
        (np.zeros((2, 3)), np.zeros((2, 3)), "do not match its tokens"),  # 2 rows for 3 tokens
        (np.zeros((3, 3)), np.zeros((3, 4)), "do not match its tokens"),
        (np.zeros((3, 1)), np.zeros((3, 1)), "do not match its tokens"),  # k < 2
        (np.zeros((3, 3)), np.array([[1.0, 2.0, 0.0]] * 3), "not sorted"),
        (np.zeros((3, 3)), np.array([[np.nan, 1.0, 0.0]] * 3), "NaN or inf"),
    ],
)
def test_inconsistent_reference_is_refused(ids, values, message):
    with pytest.raises(ParityError, match=message):
        ReferenceRun("p", (1, 2, 3), ids, values)


def test_invalid_comparisons_are_refused():
    ref = make_reference("p", TOKENS)
    with pytest.raises(ParityError, match="different prompts"):
        compare_prompt(ref, candidate(make_reference("q", TOKENS), TOKENS), tie_threshold=0.1)
    with pytest.raises(ParityError, match="tie_threshold"):
        compare_prompt(ref, candidate(ref, TOKENS), tie_threshold=-1.0)
    with pytest.raises(ParityError, match="both full logits"):
        CandidateRun("p", TOKENS, logits=np.zeros((1, 5)), ref_topk_values=np.zeros((1, K)))
    with pytest.raises(ParityError, match="vocabulary is smaller"):
        compare_prompt(ref, CandidateRun("p", TOKENS, logits=np.zeros((8, 50))), tie_threshold=0.1)
    with pytest.raises(ParityError, match="reference's k"):
        compare_prompt(ref, CandidateRun("p", TOKENS, ref_topk_values=np.zeros((8, K + 1))), tie_threshold=0.1)
    with pytest.raises(ParityError, match="flat sequence of token ids"):
        CandidateRun("p", [[1, 2]])
