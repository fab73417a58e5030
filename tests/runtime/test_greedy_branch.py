"""The CPU step's greedy branch: an ``If`` that runs the ``ArgMax`` alone when no row of the run
samples or is penalized, and the full sampling otherwise — the same ids and state either way."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime import SamplingParams
from runtime.sampler_graph import build_sampler_model
from runtime.sampling import Sampler, host_values, row_arrays, stack_rows
from runtime.step_graph import PREFIX, append_step, neutral_feeds
from tests.runtime.test_kernels import _toy_decoder

V = 64
WINDOW = 4


class BranchSampler(Sampler):
    """:class:`runtime.sampling.Sampler` built with the greedy branch."""

    def session(self, vocab: int) -> ort.InferenceSession:
        if vocab not in self._sessions:
            model = build_sampler_model(self.logits_dtype, vocab, branch=True)
            self._sessions[vocab] = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        return self._sessions[vocab]


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    """The fixture the imported sampler tests below run with: the sampler with the branch."""
    return BranchSampler("float32")


# The sampler's own tests, collected again with the branch: greedy-only runs take the ``then``
# branch, the others the ``else`` branch, and every test's expectations hold for both.
from tests.runtime.test_sampler import (  # noqa: E402, F401
    test_draws_follow_transformers_processed_probabilities,
    test_greedy_is_argmax_exactly_first_index_on_ties,
    test_min_new_tokens_masks_stop_ids_until_reached,
    test_presence_and_frequency_penalties_follow_openai,
    test_repetition_penalty_follows_transformers,
    test_seeded_sampling_is_reproducible,
    test_state_is_updated_on_the_device,
    test_top_k_1_equals_greedy_and_greedy_rows_mix_with_sampled_rows,
    test_top_p_boundary_is_exclusive_like_transformers,
)


def _step_session(branch: bool) -> ort.InferenceSession:
    return ort.InferenceSession(append_step(_toy_decoder(V), V, WINDOW, branch=branch),
                                providers=["CPUExecutionProvider"])


def _feeds(params: list[SamplingParams], step: int) -> dict[str, np.ndarray]:
    """One decode step's feeds for rows with ``params`` (their seen/counts state non-trivial)."""
    rows = len(params)
    rng = np.random.default_rng(step)
    feeds = neutral_feeds(rows, V, WINDOW)
    arrays = stack_rows([row_arrays(p, [3, 7, 11], [2], V, 8) for p in params])
    feeds.update({PREFIX + name: value for name, value in arrays.items()})
    feeds[PREFIX + "seen"] = rng.random((rows, V)) < 0.3
    feeds[PREFIX + "counts"] = rng.integers(0, 3, (rows, V)).astype(np.float32)
    feeds[PREFIX + "step"] = np.full(rows, step, np.int64)
    feeds[PREFIX + "history"] = rng.integers(0, V, (rows, WINDOW)).astype(np.int64)
    names = ("candidates", "sampled_rows", "penalized_rows", "filtered_rows", "parted_rows")
    for name, value in zip(names, host_values(params, 64), strict=True):
        feeds[PREFIX + name] = np.array([value], np.int64)
    feeds.update(input_ids=rng.integers(0, V, (rows, 1)).astype(np.int64),
                 position_ids=np.full((rows, 1), 5, np.int64), seqlens_k=np.full(rows, 5, np.int32))
    return feeds


@pytest.mark.parametrize("mix", ["greedy", "greedy+penalized", "sampled", "all"])
def test_the_branch_gives_the_step_s_ids_and_state_exactly(mix: str) -> None:
    """Every output of the step with the branch equals the step without it, over several steps
    (min_new_tokens masking, penalties, seeded draws), whichever branch the run takes."""
    greedy, penalized = SamplingParams(min_new_tokens=2), SamplingParams(repetition_penalty=1.4, presence_penalty=0.3)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    params = {"greedy": [greedy] * 3, "greedy+penalized": [penalized, greedy, greedy],
              "sampled": [sampled, greedy, greedy], "all": [sampled, penalized, greedy]}[mix]
    plain, branched = _step_session(False), _step_session(True)
    outputs = [o.name for o in plain.get_outputs()]
    assert outputs == [o.name for o in branched.get_outputs()]
    for step in range(4):
        feeds = _feeds(params, step)
        for name, want, got in zip(outputs, plain.run(outputs, feeds), branched.run(outputs, feeds), strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"{mix}, step {step}: {name}")


def test_the_branch_is_one_if_whose_greedy_side_is_the_argmax() -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(append_step(_toy_decoder(V), V, WINDOW, branch=True))
    onnx.checker.check_model(model, full_check=True)
    (node,) = [n for n in model.graph.node if n.op_type == "If"]
    assert list(node.output) == [PREFIX + name for name in ("next_input_ids", "seen_out", "counts_out", "step_out")]
    branches = {a.name: a.g for a in node.attribute}
    assert sorted(n.op_type for n in branches["then_branch"].node) == ["Add", "ArgMax", "Identity", "Identity"]
    assert len(branches["else_branch"].node) > 100  # the penalties and the draw
    plain = onnx.load_from_string(append_step(_toy_decoder(V), V, WINDOW))
    assert len(model.graph.node) < len(plain.graph.node) / 3


def test_a_cpu_step_opened_on_cuda_without_kernels_loses_its_branch() -> None:
    """CUDA graphs capture no ``If``: a CUDA session without the kernels library rebuilds a
    CPU-built step as a CUDA artifact ships it, which samples the same tokens; the CPU keeps it."""
    import types

    from runtime.device import Device
    from runtime.kernels.graph import has_branch, unbranch_step

    branched = append_step(_toy_decoder(V), V, WINDOW, branch=True)
    assert has_branch(branched) and not has_branch(append_step(_toy_decoder(V), V, WINDOW))
    unbranched = unbranch_step(branched, V, WINDOW)
    assert not has_branch(unbranched)
    cuda = types.SimpleNamespace(kernels=None, type="cuda")
    assert Device.step_model(cuda, branched, V, WINDOW) == unbranched  # type: ignore[arg-type]
    cpu = types.SimpleNamespace(kernels=None, type="cpu")
    assert Device.step_model(cpu, branched, V, WINDOW) is branched  # type: ignore[arg-type]
    plain = _step_session(False)
    rebuilt = ort.InferenceSession(unbranched, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in plain.get_outputs()]
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=3), SamplingParams(repetition_penalty=1.4),
              SamplingParams()]
    for step in range(3):
        feeds = _feeds(params, step)
        for name, want, got in zip(outputs, plain.run(outputs, feeds), rebuilt.run(outputs, feeds), strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"step {step}: {name}")
