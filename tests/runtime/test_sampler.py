"""The on-device sampler graph on synthetic logits (CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime import SamplingParams
from runtime.sampler_graph import ALL_ROWS
from runtime.sampling import Sampler

V = 64


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    return Sampler("float32")


def _seeded(n: int, **kwargs: float) -> list[SamplingParams]:
    return [SamplingParams(seed=s, **kwargs) for s in range(n)]  # type: ignore[arg-type]


def test_greedy_is_argmax_exactly_first_index_on_ties(sampler: Sampler) -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, V)).astype(np.float32) * 8
    logits[0, [5, 9, 40]] = 100.0  # tie: the first index wins, as np.argmax
    logits[1, :] = -3.0  # all equal: index 0
    logits[2, [63, 1]] = 50.0
    logits[3] = np.nextafter(np.float32(7.0), np.float32(0.0))
    logits[3, 17] = 7.0  # a one-ulp margin
    ids = sampler.sample(logits, [SamplingParams()] * 32)
    np.testing.assert_array_equal(ids, np.argmax(logits, axis=-1))
    assert ids[:4].tolist() == [5, 0, 1, 17]


def test_greedy_from_float16_logits() -> None:
    logits = np.random.default_rng(1).standard_normal((8, 3, V)).astype(np.float16)
    ids = Sampler("float16").sample(logits, [SamplingParams()] * 8)
    np.testing.assert_array_equal(ids, np.argmax(logits[:, -1], axis=-1))


def test_top_k_1_equals_greedy_and_greedy_rows_mix_with_sampled_rows(sampler: Sampler) -> None:
    logits = np.random.default_rng(2).standard_normal((16, V)).astype(np.float32)
    greedy = np.argmax(logits, axis=-1)
    ids = sampler.sample(logits, _seeded(16, temperature=1.5, top_k=1))
    np.testing.assert_array_equal(ids, greedy)
    mixed = [SamplingParams() if r % 2 else SamplingParams(temperature=2.0, seed=r) for r in range(16)]
    ids = sampler.sample(logits, mixed)
    np.testing.assert_array_equal(ids[1::2], greedy[1::2])
    assert (ids[0::2] != greedy[0::2]).any()  # at temperature 2 over 64 tokens, 8 rows do not all pick the max


def test_top_p_only_picks_the_nucleus(sampler: Sampler) -> None:
    probs = np.full(V, 0.05 / (V - 3))
    probs[[7, 3, 30]] = [0.5, 0.3, 0.15]  # sorted mass before: 0, 0.5, 0.8, …
    logits = np.tile(np.log(probs).astype(np.float32), (400, 1))
    ids = sampler.sample(logits, _seeded(400, temperature=1.0, top_p=0.7))
    assert set(ids.tolist()) == {7, 3}
    share = np.mean(ids == 7)
    assert 0.5 < share < 0.75  # renormalised: 0.5 / 0.8 = 0.625
    ids = sampler.sample(logits, _seeded(400, temperature=1.0, top_p=0.81))
    assert set(ids.tolist()) == {7, 3, 30}


def test_top_k_only_picks_the_k_best(sampler: Sampler) -> None:
    logits = np.tile(np.linspace(0.0, 1.0, V, dtype=np.float32), (500, 1))  # nearly flat
    ids = sampler.sample(logits, _seeded(500, temperature=1.0, top_k=4))
    assert set(ids.tolist()) == {60, 61, 62, 63}


def test_follows_the_softmax_distribution(sampler: Sampler) -> None:
    target = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.tile(np.log(target).astype(np.float32) * 2.0, (8000, 1))  # temperature 2 undoes the ×2
    ids = sampler.sample(logits, _seeded(8000, temperature=2.0))
    freq = np.bincount(ids, minlength=4) / len(ids)
    np.testing.assert_allclose(freq, target, atol=0.02)


def test_seeded_sampling_is_reproducible(sampler: Sampler) -> None:
    logits = np.zeros((4, V), dtype=np.float32)
    params = _seeded(4, temperature=1.0)
    runs = [[sampler.sample(logits, params, step=s, steps=20).tolist() for s in range(20)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(r[0] for r in runs[0])}) == 1
    assert runs[0][0] != runs[0][1] or runs[0][1] != runs[0][2]  # the steps draw different uniforms
    other = [sampler.sample(logits, _seeded(4, temperature=1.0)[::-1], step=s, steps=20).tolist() for s in range(20)]
    assert [r[::-1] for r in other] == runs[0]  # a row's stream does not depend on its batch position


def test_temperature_to_zero_approaches_greedy(sampler: Sampler) -> None:
    logits = np.random.default_rng(3).standard_normal((300, V)).astype(np.float32)
    greedy = np.argmax(logits, axis=-1)
    agree = [np.mean(sampler.sample(logits, _seeded(300, temperature=t)) == greedy) for t in (2.0, 0.5, 0.05, 1e-4)]
    assert agree[0] < agree[1] < agree[2] <= agree[3] == 1.0
    tiny = sampler.sample(logits, _seeded(300, temperature=1e-30))  # exp(-huge) = 0, never NaN
    np.testing.assert_array_equal(tiny, greedy)


def _hf_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    out = logits.copy()
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def test_repetition_penalty_follows_transformers(sampler: Sampler) -> None:
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((64, V)).astype(np.float32) * 3
    seen = rng.random((64, V)) < 0.3
    for penalty in (1.3, 0.7):
        ids = sampler.sample(logits, [SamplingParams(repetition_penalty=penalty)] * 64, seen=seen)
        expected = np.argmax(_hf_penalty(logits, seen, penalty), axis=-1)
        np.testing.assert_array_equal(ids, expected)
    # positive logit divided, negative multiplied: both flip the choice here
    flip = np.array([[2.0, 1.5, -9.0], [-0.5, -0.6, -9.0]], dtype=np.float32)
    seen2 = np.array([[True, False, False], [True, False, False]])
    ids = sampler.sample(flip, [SamplingParams(repetition_penalty=2.0)] * 2, seen=seen2)
    assert ids.tolist() == [1, 1]


def _state_feeds(penalized_rows: int) -> dict[str, np.ndarray]:
    from runtime.sampling import row_arrays, stack_rows

    logits = np.random.default_rng(5).standard_normal((3, 1, V)).astype(np.float32)
    feeds = stack_rows([row_arrays(SamplingParams(), [], [], V, 4) for _ in range(3)])
    feeds["step"] = np.array([0, 2, 1], np.int64)
    feeds["counts"][1, 7] = 2.0
    feeds["seen"][2, 9] = True
    feeds.update(logits=logits, attention_mask=np.array([[0, 1], [1, 1], [1, 1]], np.int64),
                 candidates=np.array([1], np.int64), sampled_rows=np.array([0], np.int64),
                 penalized_rows=np.array([penalized_rows], np.int64))
    return feeds


def test_state_is_updated_on_the_device(sampler: Sampler) -> None:
    feeds = _state_feeds(ALL_ROWS)
    ids, mask, pos, seen, counts, step = sampler.session(V).run(None, feeds)
    assert ids.shape == (3, 1)
    expected_seen = feeds["seen"].copy()
    expected_seen[np.arange(3), ids.ravel()] = True
    np.testing.assert_array_equal(seen, expected_seen)
    expected = feeds["counts"].copy()
    expected[np.arange(3), ids.ravel()] += 1
    np.testing.assert_array_equal(counts, expected)
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert pos.ravel().tolist() == [1, 2, 2]
    assert step.tolist() == [1, 3, 2]


def test_a_run_without_penalized_rows_carries_the_penalty_state_over(sampler: Sampler) -> None:
    """``penalized_rows = 0`` (no row of the run is penalized): the same ids, the state as it was."""
    feeds = _state_feeds(0)
    ids, _, _, seen, counts, step = sampler.session(V).run(None, feeds)
    all_rows = sampler.session(V).run(None, _state_feeds(ALL_ROWS))
    np.testing.assert_array_equal(ids, all_rows[0])
    np.testing.assert_array_equal(seen, feeds["seen"])
    np.testing.assert_array_equal(counts, feeds["counts"])
    assert step.tolist() == [1, 3, 2]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, seed=3),
                                    SamplingParams(temperature=1.0, top_p=0.9, seed=4),
                                    SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3, seed=5)])
def test_the_draw_on_all_rows_equals_greedy_rows_alone(sampler: Sampler, params: SamplingParams) -> None:
    """The host inputs only skip work: a batch whose rows run the draw (``sampled_rows`` = all)
    gives its greedy rows the ids of a run where no row samples, and its sampled rows their own."""
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((4, V)).astype(np.float32) * 3
    greedy = sampler.sample(logits[:2], [SamplingParams(), SamplingParams()])
    sampled = sampler.sample(logits[2:], [params, params])
    mixed = sampler.sample(logits, [SamplingParams(), SamplingParams(), params, params])
    assert mixed.tolist() == greedy.tolist() + sampled.tolist()


def test_top_p_boundary_is_exclusive_like_transformers(sampler: Sampler) -> None:
    """Probabilities exact in float32: the mass before token 1 equals top_p exactly, so only
    token 0 stays (transformers removes the ascending prefix with cumulative mass <= 1 - top_p)."""
    logits = np.tile(np.log(np.array([0.5, 0.25, 0.25], np.float32)), (2000, 1))
    ids = sampler.sample(logits, _seeded(2000, temperature=1.0, top_p=0.5))
    assert set(ids.tolist()) == {0}
    ids = sampler.sample(logits, _seeded(2000, temperature=1.0, top_p=0.5 + 1e-6))
    assert set(ids.tolist()) == {0, 1, 2}


def _hf_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.tensor(logits[None, :], dtype=torch.float32)
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return torch.softmax(scores, dim=-1)[0].double().numpy()


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p"), [
    (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (0.9, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.8, 12, 0.9, 0.05),
])
def test_draws_follow_transformers_processed_probabilities(sampler: Sampler, temperature: float, top_k: int,
                                                           top_p: float, min_p: float) -> None:
    """20,000 seeded draws against transformers' warpers: the support is exactly theirs and the
    total-variation distance is within sampling noise — far below what a wrong temperature or
    nucleus gives (checked in the same test, so the bound can fail)."""
    logits = np.random.default_rng(11).standard_normal(V).astype(np.float32) * 2.5
    want = _hf_probs(logits, temperature, top_k, top_p, min_p)
    n = 20000
    ids = sampler.sample(np.tile(logits, (n, 1)), _seeded(n, temperature=temperature, top_k=top_k, top_p=top_p,
                                                            min_p=min_p))
    got = np.bincount(ids, minlength=V) / n
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))
    tv = 0.5 * np.abs(got - want).sum()
    bound = 0.025
    assert tv < bound, f"total variation {tv:.4f}"
    wrong_t = _hf_probs(logits, temperature * 1.25, top_k, top_p, min_p)
    assert 0.5 * np.abs(wrong_t - want).sum() > bound  # a 25 % temperature error would be caught


def test_presence_and_frequency_penalties_follow_openai(sampler: Sampler) -> None:
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((64, V)).astype(np.float32)
    counts = rng.integers(0, 3, (64, V)).astype(np.float32)
    params = [SamplingParams(presence_penalty=0.6, frequency_penalty=0.4)] * 64
    ids = sampler.sample(logits, params, counts=counts)
    expected = np.argmax(logits - 0.4 * counts - 0.6 * (counts > 0), axis=-1)
    np.testing.assert_array_equal(ids, expected)
    assert (ids != np.argmax(logits, axis=-1)).any()


def test_min_new_tokens_masks_stop_ids_until_reached(sampler: Sampler) -> None:
    logits = np.zeros((2, V), dtype=np.float32)
    logits[:, 9] = 10.0  # the stop id is the argmax
    logits[:, 4] = 5.0
    params = [SamplingParams(min_new_tokens=2), SamplingParams(min_new_tokens=0)]
    picks = [sampler.sample(logits, params, step=s, stop_ids=[[9], [9]], steps=3).tolist() for s in range(3)]
    assert picks == [[4, 9], [4, 9], [9, 9]]


def test_top_k_rows_sort_only_the_candidates_they_need() -> None:
    """A step whose sorted rows all set top-k sorts 64 or 256 candidates (the bound for top-p
    alone); greedy rows, temperature rows and a top-k beyond the buckets change nothing else."""
    from runtime.sampling import host_values

    top_k50 = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=1)
    top_p = SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    assert host_values([top_k50], 1024)[0] == 64
    assert host_values([top_k50, SamplingParams(temperature=0.7, top_k=65)], 1024)[0] == 256
    assert host_values([SamplingParams(temperature=0.7, top_k=300)], 1024)[0] == 1024
    assert host_values([top_k50, top_p], 1024)[0] == 1024  # a nucleus without top-k needs the bound
    assert host_values([top_k50, SamplingParams(top_k=2), SamplingParams(temperature=1.0)], 1024)[0] == 64
    assert host_values([top_k50], 32)[0] == 32  # never past the engine's bound
    assert host_values([SamplingParams(top_k=50)], 1024)[0] == 1  # greedy: no sort


def test_a_top_k_row_draws_the_same_from_64_candidates_as_from_all(sampler: Sampler) -> None:
    """The smaller sort is exact for top-k rows: the same seeded tokens with K = top-k's bucket
    and with K = the whole vocabulary, over many steps and flat and peaked logits alike."""
    vocab = 4096
    rng = np.random.default_rng(11)
    scale = np.array([0.5, 1, 2, 4, 8, 16], np.float32)[:, None, None]
    logits = rng.standard_normal((6, 1, vocab)).astype(np.float32) * scale
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=s)
              for s, (t, k, p) in enumerate([(0.7, 50, 0.9), (1.0, 40, 1.0), (1.3, 64, 0.5), (0.5, 1, 0.9),
                                             (1.0, 7, 0.99), (2.0, 33, 0.8)])]
    from runtime.sampling import row_arrays, stack_rows

    session = sampler.session(vocab)
    for step in range(25):
        feeds = stack_rows([row_arrays(p, [], [], vocab, 25) for p in params])
        feeds.update(logits=logits, attention_mask=np.ones((6, 1), np.int64), step=np.full(6, step, np.int64),
                     sampled_rows=np.array([ALL_ROWS], np.int64), penalized_rows=np.array([0], np.int64))
        small = session.run(["next_ids"], {**feeds, "candidates": np.array([64], np.int64)})[0]
        full = session.run(["next_ids"], {**feeds, "candidates": np.array([vocab], np.int64)})[0]
        np.testing.assert_array_equal(small, full)
        assert all(0 <= i < vocab for i in small.ravel())


@pytest.mark.parametrize("segments", [1, 2, 3, 5])
def test_the_candidates_in_segments_are_the_row_s_largest_values(segments: int) -> None:
    """The two-stage selection (parts, then the best of the parts' best) gives exactly the row's
    k largest values, sorted, with the last part padded (12,388 = 5 · 2,478 − 2), with ties and
    −inf in the row, for every k the parts can hold."""
    import onnxruntime as ort

    from runtime._onnx_proto import GraphBuilder
    from runtime.sampler_graph import _largest

    vocab = 12388
    g = GraphBuilder("largest")
    g.input("s", "float32", ["b", vocab])
    g.input("k", "int64", [1])
    g.op("Identity", [_largest(g, "s", "k", vocab, segments)], outputs=["v"])
    g.output("v", "float32", ["b", "k"])
    session = ort.InferenceSession(g.to_bytes(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(segments)
    s = rng.standard_normal((4, vocab)).astype(np.float32)
    s[1] = np.round(s[1])  # many ties
    s[2, ::3] = -np.inf  # masked tokens
    s[3, -2000:] += 5  # the best all in the last (padded) part
    for k in (1, 64, 1024, 2478):
        got = session.run(None, {"s": s, "k": np.array([k], np.int64)})[0]
        np.testing.assert_array_equal(got, -np.sort(-s, axis=1)[:, :k])
    assert session.run(None, {"s": s[:0], "k": np.array([64], np.int64)})[0].shape == (0, 64)  # no row


def test_segmented_candidates_draw_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampler whose candidates come in segments draws, seed for seed, what one selection draws
    (top-p alone over 1,024 candidates, top-k + top-p, min-p)."""
    import onnx

    from runtime import sampler_graph

    vocab = 3 * 4096 + 101  # odd: three parts, the last padded
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((4, vocab)) * np.array([[0.5], [2], [4], [8]])).astype(np.float32)
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=1), SamplingParams(temperature=0.7, top_p=0.9, seed=2),
              SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=3), SamplingParams(temperature=1.0, min_p=0.05,
                                                                                           seed=4)]
    drawn = {}
    for most in (1, 3):
        monkeypatch.setattr(sampler_graph, "SEGMENTS_MAX", most)
        segments = sampler_graph.candidate_segments(vocab)
        assert segments == most
        sampler = Sampler("float32", segments=segments)
        model = sampler_graph.build_sampler_model("float32", vocab, segments=segments)
        ops = [node.op_type for node in onnx.load_from_string(model).graph.node]
        assert ops.count("TopK") == (1 if segments == 1 else 2)
        drawn[most] = [sampler.sample(logits, params, step=t, steps=20).tolist() for t in range(20)]
    assert drawn[1] == drawn[3]
    assert len({tuple(d) for d in drawn[1]}) > 5  # the rows really sample


def test_the_step_s_parted_rows_switch_the_selection_and_change_no_draw() -> None:
    """In a step built with parts, ``parted_rows`` picks per run between one ``TopK`` and the
    parts (the host asks for parts above 256 candidates): the same seeded ids either way, and the
    same as a sampler with one selection, for top-p, top-k + top-p and min-p rows."""
    import onnxruntime as ort

    from runtime._onnx_proto import GraphBuilder
    from runtime.sampler_graph import STEP_HOST_INPUTS, add_sampling, declare_row_inputs
    from runtime.sampling import host_values, row_arrays, stack_rows

    vocab = 3 * 4096 + 101
    g = GraphBuilder("parted")
    names = declare_row_inputs(g, vocab, host_inputs=STEP_HOST_INPUTS)
    g.input("logits", "float32", ["batch", vocab])
    add_sampling(g, "logits", vocab, names, outputs={"next_ids": "next_ids"}, segments=3)
    g.output("next_ids", "int64", ["batch", 1])
    session = ort.InferenceSession(g.to_bytes(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal((4, vocab)) * np.array([[0.5], [2], [4], [8]])).astype(np.float32)
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=1), SamplingParams(temperature=0.7, top_p=0.9, seed=2),
              SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=3), SamplingParams(min_p=0.05, seed=4)]
    plan = host_values(params, 1024)
    assert plan[0] == 1024 and plan[4] == ALL_ROWS  # top-p alone: 1,024 candidates, in parts
    assert host_values(params[2:3], 1024)[4] == 0  # top-k 50: 64 candidates, one TopK
    one = Sampler("float32")
    for step in range(12):
        feeds = stack_rows([row_arrays(p, [], [], vocab, 12) for p in params])
        feeds.update(logits=logits, step=np.full(4, step, np.int64))
        want = one.sample(logits, params, step=step, steps=12)
        for parted in (0, ALL_ROWS):
            host = dict(zip(STEP_HOST_INPUTS, (*plan[:4], parted), strict=True))
            got = session.run(None, {**feeds, **{k: np.array([v], np.int64) for k, v in host.items()}})[0]
            np.testing.assert_array_equal(got.ravel(), want)


def test_candidate_segments_keep_each_part_wide_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime import sampler_graph
    from runtime.sampler_graph import MAX_CANDIDATES, candidate_segments

    assert candidate_segments(49152) == 8  # the default: SmolLM2 in 8 × 6,144
    assert candidate_segments(128256) == 8  # Llama 3: 8 × 16,032
    monkeypatch.setattr(sampler_graph, "SEGMENTS_MAX", 16)
    assert candidate_segments(49152) == 12  # SmolLM2: 12 × 4,096
    assert candidate_segments(128256) == 16  # Llama 3: 16 × 8,016
    assert candidate_segments(32000) == 5  # Llama 2: 5 × 6,400 (7 would need padding)
    assert candidate_segments(4095) == 1
    for vocab in (4096, 9000, 49152, 50257, 128256, 151936, 256000):
        n = candidate_segments(vocab)
        assert 1 <= n <= 16 and -(-vocab // n) >= MAX_CANDIDATES
