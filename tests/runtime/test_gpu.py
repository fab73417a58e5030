"""The CUDA paths of the runtime, on tiny models: skipped where onnxruntime has no CUDA provider
(CI, the dev machines); run on the lent GPU with ``pytest -m gpu tests/runtime/test_gpu.py``.

Checks that the captured fused step (CUDA graph, ping-pong buffers, ids read per block) gives
exactly the uncaptured engine's tokens, that it really replays captured graphs, and that the
sampling path under a captured decoder matches too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import pytest

from runtime import Engine, SamplingParams

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


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(3, 300, n).tolist() for n in (9, 4, 9)]


def test_captured_fused_step_matches_uncaptured(fp16_cuda: Path) -> None:
    plain = Engine.load(fp16_cuda, device="cuda")
    graph = Engine.load(fp16_cuda, device="cuda", cuda_graph=True)
    for rows in ([0], [0, 1, 2]):
        prompts = [_prompts()[r] for r in rows]
        want = plain.generate_ids(prompts, 40)
        assert graph.generate_ids(prompts, 40) == want
        assert graph.generate_ids(prompts, 40) == want  # a second request replays the same graphs
    replays = graph.graph_replays()  # type: ignore[attr-defined]
    assert replays.get(1, 0) >= 2 * 39 and replays.get(3, 0) >= 2 * 39


def test_captured_stops_and_sampling_match(fp16_cuda: Path) -> None:
    plain = Engine.load(fp16_cuda, device="cuda")
    graph = Engine.load(fp16_cuda, device="cuda", cuda_graph=True)
    prompts = _prompts()
    free = plain.generate_ids(prompts, 30)
    stops = [SamplingParams(stop_token_ids=(free[r][3 + 7 * r],)) for r in range(3)]
    assert graph.generate_ids(prompts, 30, stops) == plain.generate_ids(prompts, 30, stops)
    sampled = [SamplingParams(temperature=0.8, top_k=20, seed=r) for r in range(3)]
    assert graph.generate_ids(prompts, 30, sampled) == plain.generate_ids(prompts, 30, sampled)


def test_fp32_shared_buffer_refused_on_cuda(artifact_cache: Callable[[str], Path],
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """fp32 GroupQueryAttention has no CUDA kernel, and the fallback gave logits off by ~1 on an
    H100 (onnxruntime-gpu 1.31.1): an fp32 shared-buffer artifact is a CPU artifact, refused on
    CUDA with a clear error; the fp32 concat artifact on CUDA gives the CPU's tokens."""
    from passes.pipeline import optimize_artifact
    from runtime.errors import GenerationError

    out = tmp_path_factory.mktemp("gpu32") / "llama-sb-fp32"
    optimize_artifact(artifact_cache("tiny:llama"), out, device="cpu", precision="fp32", kv_mode="shared-buffer",
                      progress=False)
    with pytest.raises(GenerationError, match="fp32 shared-buffer"):
        Engine.load(out, device="cuda")
    prompts = _prompts()
    cpu = Engine.load(artifact_cache("tiny:llama"))
    cuda = Engine.load(artifact_cache("tiny:llama"), device="cuda")
    assert cuda.generate_ids(prompts, 24) == cpu.generate_ids(prompts, 24)


def test_one_session_serves_prefill_and_concurrent_requests(fp16_cuda: Path) -> None:
    """Under CUDA graphs the step session also runs prefill and uncaptured requests eagerly
    (``gpu_graph_id = -1``): the weights are loaded once, and two requests at once (the second
    finds the batch-size buffers busy and runs uncaptured) give the plain engine's tokens."""
    import threading

    plain = Engine.load(fp16_cuda, device="cuda")
    graph = Engine.load(fp16_cuda, device="cuda", cuda_graph=True)
    assert graph._session is graph._step_session  # type: ignore[attr-defined]
    prompts = _prompts()
    want = {r: plain.generate_ids([prompts[r]], 48) for r in range(3)}
    got: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []

    def one(r: int) -> None:
        try:
            for _ in range(3):
                got[r] = graph.generate_ids([prompts[r]], 48)
                assert got[r] == want[r]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert got == want


def test_captured_fused_prefill_logits_match_uncaptured(fp16_cuda: Path) -> None:
    plain = Engine.load(fp16_cuda, device="cuda")
    graph = Engine.load(fp16_cuda, device="cuda", cuda_graph=True)
    prompts = _prompts()
    a = plain.generate_results(prompts, 12, return_logits=True)
    b = graph.generate_results(prompts, 12, return_logits=True)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        np.testing.assert_allclose(x.step_logits, y.step_logits, rtol=0, atol=1e-3)
