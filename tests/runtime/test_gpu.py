"""The CUDA paths of the runtime, on tiny models: skipped where onnxruntime has no CUDA provider
(CI, the dev machines); run on the lent GPU with ``pytest -m gpu tests/runtime/test_gpu.py``.

The captured step (one CUDA graph per batch-size bucket and direction, sampling inside it, ids
read per block) must give exactly the uncaptured engine's tokens — greedy and seeded sampling,
requests arriving while others decode, many threads — and really replay captured graphs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime import Engine, SamplingParams
from runtime.errors import GenerationError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="onnxruntime has no CUDA provider here"),
]


@pytest.fixture(scope="module")
def fp16_cuda(artifact_cache: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from passes.pipeline import optimize_artifact

    out = tmp_path_factory.mktemp("gpu") / "llama-fp16-cuda"
    optimize_artifact(artifact_cache("tiny:llama"), out, device="cuda", precision="fp16", progress=False)
    return out


@pytest.fixture(scope="module")
def engines(fp16_cuda: Path):  # type: ignore[no-untyped-def]
    graph = Engine.load(fp16_cuda, device="cuda", max_batch=16)
    plain = Engine.load(fp16_cuda, device="cuda", max_batch=16, cuda_graph=False, read_every=1)
    yield graph, plain
    graph.close()
    plain.close()


def _prompts(n: int, seed: int = 5) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, int(k)).tolist() for k in rng.integers(2, 20, n)]


def test_captured_greedy_matches_uncaptured(engines) -> None:  # type: ignore[no-untyped-def]
    graph, plain = engines
    assert graph.cuda_graph and not plain.cuda_graph
    prompts = _prompts(5)
    want = [plain.generate_ids([p], 24)[0] for p in prompts]
    before = graph.backend.replays
    assert graph.generate_ids(prompts, 24) == want
    assert [graph.generate_ids([p], 24)[0] for p in prompts] == want
    assert graph.backend.replays > before


def test_captured_sampling_and_stops_match(engines) -> None:  # type: ignore[no-untyped-def]
    graph, plain = engines
    prompts = _prompts(6, seed=7)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i) if i % 2 else SamplingParams(top_k=1)
              for i in range(6)]
    full = plain.generate_ids(prompts, 20, params)
    assert graph.generate_ids(prompts, 20, params) == full
    stops = [
        SamplingParams(stop_token_ids=(ids[k],)) for ids, k in zip(plain.generate_ids(prompts, 20), (1, 3, 5, 7, 9, 11))
    ]
    assert graph.generate_ids(prompts, 20, stops) == plain.generate_ids(prompts, 20, stops)


def test_captured_penalties_and_mixed_runs_match(engines) -> None:  # type: ignore[no-untyped-def]
    """Penalized, sampled and plain greedy rows together and apart: each combination of the step's
    host inputs (draw and penalties on no rows or on all) is its own captured graph, and the
    empty-row runs of the skipped nodes must give the uncaptured engine's tokens."""
    graph, plain = engines
    prompts = _prompts(6, seed=13)
    kinds = [SamplingParams(), SamplingParams(repetition_penalty=1.5), SamplingParams(presence_penalty=1.0,
             frequency_penalty=0.5, temperature=0.9, seed=3), SamplingParams(temperature=0.7, top_k=20, seed=4),
             SamplingParams(min_p=0.2, temperature=1.0, seed=5), SamplingParams(repetition_penalty=0.8)]
    want = [plain.generate_ids([p], 24, k)[0] for p, k in zip(prompts, kinds)]
    assert graph.generate_ids(prompts, 24, kinds) == want
    assert [graph.generate_ids([p], 24, k)[0] for p, k in zip(prompts, kinds)] == want
    greedy_only = [k for k in kinds if k.greedy and not k.needs_penalties]
    assert greedy_only  # the all-greedy run (no draw, no penalties) is among them


def test_warm_up_captures_every_bucket_and_mix(fp16_cuda: Path) -> None:
    """After ``warm_up()`` no request needs a new captured graph: any mix of greedy, sampled and
    penalized rows at any batch size replays one that exists."""
    engine = Engine.load(fp16_cuda, device="cuda", max_batch=8)
    try:
        assert engine.warm_up() > 0
        captured = set(engine.backend._steps)
        assert {key[0] for key in captured} == {1, 2, 4, 8}
        kinds = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=1), SamplingParams(min_p=0.1,
                 temperature=1.2, seed=2), SamplingParams(presence_penalty=0.5), SamplingParams(temperature=0.7,
                 top_p=0.8, frequency_penalty=0.3, seed=3)]
        prompts = _prompts(8, seed=17)
        for n in (1, 3, 5, 8):
            for shift in range(len(kinds)):
                engine.generate_results(prompts[:n], 10, [kinds[(i + shift) % len(kinds)] for i in range(n)])
        assert set(engine.backend._steps) == captured
        planned = set(engine.backend.prefill_seen)
        assert {rows for rows, _ in planned} == {1, 2, 4, 8} and {16, 32, 64, 96, 128} <= {n for _, n in planned}
        # a one-row prefill of every length bucket up to GRAPH_WIDTH is a graph, into the first state set
        from runtime.kv_slots import GRAPH_WIDTH

        widths = {n for rows, n in planned if rows == 1 and n <= GRAPH_WIDTH}
        assert {(key[0], key[1], key[2]) for key in engine.backend._prefill_graphs} >= {(0, n, 0) for n in widths}
        graphs = engine.backend.graph_prefills
        engine.generate_results(_prompts(1, seed=3), 4)
        assert engine.backend.graph_prefills == graphs + 1
        for n in (1, 3, 5, 8):  # new requests together: their prefill shapes were planned too
            engine.generate_results(_prompts(n, seed=40 + n), 2)
        assert engine.backend.prefill_seen == planned
    finally:
        engine.close()


def test_batched_padded_prefill_matches_one_at_a_time(fp16_cuda: Path, engines) -> None:  # type: ignore[no-untyped-def]
    """On CUDA, requests admitted together prefill in one run, right-padded to a length bucket
    (GroupQueryAttention's first-prompt path); each row samples at its own last token, so tokens
    and logits match prefilling each request alone at its exact length."""
    graph, _ = engines
    prompts = _prompts(8, seed=23)
    assert len({len(p) for p in prompts}) > 3
    params = [SamplingParams(temperature=0.8, seed=i) if i % 2 else SamplingParams() for i in range(8)]
    with Engine.load(fp16_cuda, device="cuda", max_batch=1, cuda_graph=False, read_every=1) as exact:
        exact.backend.padded = lambda n: n  # type: ignore[method-assign]
        want = [exact.generate_results([p], 12, s, return_logits=True)[0] for p, s in zip(prompts, params)]
        assert {rows for rows, _ in exact.backend.prefill_seen} == {1}
    before = graph.backend.prefill_runs
    got = graph.generate_results(prompts, 12, params, return_logits=True)
    assert graph.backend.prefill_runs - before == 1
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.step_logits, b.step_logits, atol=2e-2)  # type: ignore[arg-type]


def test_one_row_prefills_replay_captured_graphs(fp16_cuda: Path, engines) -> None:  # type: ignore[no-untyped-def]
    """A new request prefilling alone runs a CUDA graph per (slot, length bucket, state set,
    plan) from the key's second sighting: uncaptured on the graph's first run, captured on its
    second, replayed after. Prompts of
    different lengths in one bucket (the prompt buffer and its padding rewritten each time),
    greedy and seeded top-p, must give the uncaptured engine's tokens every time; a penalized
    request (its prompt mask is a start state) and one asking logits prefill eagerly."""
    _, plain = engines
    rng = np.random.default_rng(41)
    prompts = [rng.integers(3, 300, n).tolist() for n in (9, 3, 14, 16, 5, 12, 30, 2)]  # buckets 16 and 32
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=7)]
    want = [[plain.generate_ids([p], 12, s)[0] for p in prompts] for s in params]
    with Engine.load(fp16_cuda, device="cuda", max_batch=4) as engine:
        backend = engine.backend
        assert backend.graph_prefill
        for _ in range(4):
            assert [[engine.generate_ids([p], 12, s)[0] for p in prompts] for s in params] == want
        assert backend.graph_prefills >= 2 * len(prompts) * len(params)  # (a key's first sighting is eager)
        graphs = backend.graph_prefills
        assert {key[1] for key in backend._prefill_graphs} == {16, 32}
        penalized = SamplingParams(repetition_penalty=1.4)
        assert engine.generate_ids([prompts[0]], 12, penalized) == plain.generate_ids([prompts[0]], 12, penalized)
        a = engine.generate_results([prompts[2]], 6, return_logits=True)[0]
        b = plain.generate_results([prompts[2]], 6, return_logits=True)[0]
        assert a.token_ids == b.token_ids
        assert backend.graph_prefills == graphs


def test_threads_arriving_mid_decode_match_solo(engines) -> None:  # type: ignore[no-untyped-def]
    graph, plain = engines
    prompts = _prompts(16, seed=9)
    want = [plain.generate_ids([p], 32)[0] for p in prompts]
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        got[i] = graph.generate_ids([prompts[i]], 32)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(16)] == want


def test_captured_logits_match_uncaptured(engines) -> None:  # type: ignore[no-untyped-def]
    graph, plain = engines
    prompts = _prompts(3, seed=11)
    a = graph.generate_results(prompts, 8, return_logits=True)
    b = plain.generate_results(prompts, 8, return_logits=True)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        np.testing.assert_allclose(x.step_logits, y.step_logits, atol=1e-3)  # type: ignore[arg-type]


def test_fp32_shared_buffer_refused_on_cuda(artifact_cache: Callable[[str], Path],
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    from passes.pipeline import optimize_artifact

    out = tmp_path_factory.mktemp("gpu32") / "llama-sb32"
    optimize_artifact(artifact_cache("tiny:llama"), out, device="cpu", precision="fp32", kv_mode="shared-buffer",
                      progress=False)
    with pytest.raises(GenerationError, match="fp32 shared-buffer artifact cannot run on CUDA"):
        Engine.load(out, device="cuda")


def test_candidates_in_parts_draw_the_same_on_cuda() -> None:
    """CUDA kernels of the parted selection (a full SmolLM2 vocabulary in 8 parts, 1,024 and 64
    candidates, rows with and without a filter): the same seeded ids as one ``TopK``."""
    from runtime.sampling import Sampler

    vocab = 49152
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((6, vocab)) * np.array([[0.5], [1], [2], [4], [8], [16]])).astype(np.float16)
    plans = [
        [SamplingParams(temperature=1.0, top_p=0.95, seed=i) for i in range(6)],
        [SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=i) for i in range(6)],
        [SamplingParams(temperature=0.7, seed=i) if i % 2 else SamplingParams() for i in range(6)],
    ]
    one = Sampler("float16", providers=["CUDAExecutionProvider"])
    parts = Sampler("float16", providers=["CUDAExecutionProvider"], segments=8)
    for params in plans:
        for step in range(6):
            want = one.sample(logits, params, step=step, steps=6)
            np.testing.assert_array_equal(parts.sample(logits, params, step=step, steps=6), want)


@pytest.mark.parametrize("row_copy", [False, True])
def test_device_constants_follow_every_admission_on_cuda(fp16_cuda: Path, monkeypatch: pytest.MonkeyPatch,
                                                         row_copy: bool) -> None:
    """The sampling constants reach the GPU whole (``update_inplace``, the default) or as copies of
    the changed rows alone (the CUDA runtime's cudaMemcpy, ``runtime.device.CUDA_ROW_COPY``): after
    admissions that change rows and put greedy requests back in the same slots, every device
    constant equals the host copy, and the tokens are the other way's."""
    import runtime.device

    monkeypatch.setattr(runtime.device, "CUDA_ROW_COPY", row_copy)
    graph = Engine.load(fp16_cuda, device="cuda", max_batch=16)
    backend = graph.backend
    prompts = _prompts(4, seed=21)
    mixes = [[SamplingParams(repetition_penalty=1.2, min_new_tokens=3, temperature=0.8, seed=s) for s in range(4)],
             [SamplingParams()] * 4,
             [SamplingParams(temperature=0.7, top_p=0.9, seed=9), SamplingParams(), SamplingParams(min_new_tokens=2),
              SamplingParams(presence_penalty=0.5, temperature=1.0, seed=3)]]
    try:
        tokens = []
        for params in mixes:
            tokens.append(graph.generate_ids(prompts, 6, params))
            for name, value in backend.consts.items():
                np.testing.assert_array_equal(value.numpy(), backend._consts_host[name], err_msg=name)
        copier = backend.device._rows_copy
        assert (copier not in (None, False, "cpu")) if row_copy else copier is False
    finally:
        graph.close()
    with Engine.load(fp16_cuda, device="cuda", max_batch=16, cuda_graph=False, read_every=1) as plain:
        assert [plain.generate_ids(prompts, 6, params) for params in mixes] == tokens
