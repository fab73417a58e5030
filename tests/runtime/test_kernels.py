"""lmforge's CUDA kernels (``runtime/kernels``): the fused sampling op and its fallback.

On every machine: without a built library the runtime finds none and serves with the ONNX
sampler, ``lmforge kernels build`` without a GPU or nvcc fails in one line with exit code 2, and
the step model's sampling nodes are swapped for the one fused node with the graph's inputs and
outputs unchanged. On the lent GPU (``pytest -m gpu tests/runtime/test_kernels.py``; skipped where
onnxruntime has no CUDA provider): the library builds, the sampler tests of ``test_sampler.py``
pass with the fused op in place of the ONNX nodes (distributions against transformers' warpers,
the top-p boundary, penalties, seeded determinism, greedy bit for bit), fp16 and fp32 logits, rows
independent of each other, and the op runs inside a captured CUDA graph. On sm_90+ (H100 / H200) all
of that runs the cluster kernel (a row over a cluster of 8 thread blocks), the default there; the
single-block kernel, which serves below sm_90 and under ``LMFORGE_KERNELS_CLUSTER=0``, is checked
against it token for token.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime import SamplingParams
from runtime._onnx_proto import GraphBuilder
from runtime.sampler_graph import ROW_INPUTS, build_sampler_model
from runtime.sampling import Sampler, row_arrays, stack_rows
from runtime.step_graph import PREFIX, append_step, neutral_feeds, step_io

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
V = 64


# -- every machine ---------------------------------------------------------------------------------


def test_no_library_means_the_onnx_sampler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from runtime import kernels
    from runtime.device import Device

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))  # an empty cache: nothing built
    monkeypatch.setenv("LMFORGE_KERNELS", "1")
    monkeypatch.delenv("LMFORGE_KERNELS_LIB", raising=False)
    kernels.kernel_library.cache_clear()
    try:
        if not HAS_CUDA:
            monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi either
        assert kernels.kernel_library() is None
        monkeypatch.setenv("LMFORGE_KERNELS_LIB", str(tmp_path / "missing.so"))
        kernels.kernel_library.cache_clear()
        assert kernels.kernel_library() is None  # a named library that is not there: a warning, no error
        monkeypatch.setenv("LMFORGE_KERNELS", "0")
        kernels.kernel_library.cache_clear()
        assert kernels.kernel_library() is None
        monkeypatch.setenv("LMFORGE_KERNELS_LIB", __file__)
        kernels.kernel_library.cache_clear()
        assert kernels.kernel_library() is None  # off: even a library that is there is not used
        monkeypatch.delenv("LMFORGE_KERNELS")  # unset: a library that is there is used
        kernels.kernel_library.cache_clear()
        assert kernels.kernel_library() == Path(__file__)
    finally:
        kernels.kernel_library.cache_clear()
    cpu = Device("cpu")
    assert cpu.kernels is None
    model = b"not even a model"
    assert cpu.step_model(model, V, 4) is model  # unchanged: the step model as shipped


def test_a_library_onnxruntime_cannot_load_leaves_the_onnx_sampler(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A kernels library that does not load (another onnxruntime's build, a damaged file) is not
    used, with one warning that says how to fix it; sessions are not refused for it."""
    from runtime.device import loadable_kernels

    assert loadable_kernels(None) is None
    broken = tmp_path / "liblmforge_kernels.so"
    broken.write_bytes(b"not a shared library")
    with caplog.at_level("WARNING", logger="runtime.device"):
        assert loadable_kernels(broken) is None
    assert "kernels build --force" in caplog.text and "LMFORGE_KERNELS=0" in caplog.text


def test_kernels_build_without_gpu_or_nvcc_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main
    from runtime.kernels import build

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "detect_arch", lambda: None)
    assert main(["kernels", "build"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no NVIDIA GPU found" in err[-1] and "--arch sm_90" in err[-1]  # progress, then error
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    assert main(["kernels", "build", "--arch", "sm_90"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nvcc (the CUDA compiler) not found" in err and "lmforge[kernels]" in err
    assert main(["kernels", "build", "--arch", "gfx90a"]) == 2
    assert "unknown GPU architecture" in capsys.readouterr().err
    assert main(["kernels", "status"]) == 0
    assert "cache" in capsys.readouterr().out


def test_library_and_selftest_compile_for_sm_90_without_a_gpu(tmp_path: Path) -> None:
    """Where nvcc is installed (a GPU is not needed), the op library and the selftest, which includes
    sampling.cu and so links every op that file registers, compile and link for sm_90 (the selftest
    with the profile build switch on and every A/B switch away from its default, so that those paths
    compile too)."""
    from runtime.kernels import build

    nvcc = build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    for out, sources, flags in ((tmp_path / "lib.so", build.SOURCES, build._FLAGS),
                                (tmp_path / "selftest", build.SELFTEST_SOURCES,
                                 (*build.SELFTEST_FLAGS, "-DLMFORGE_PROFILE=1", "-DLMFORGE_PIVOT_RULE=0",
                                  "-DLMFORGE_LIVE_MASK=1", "-DLMFORGE_ARGMAX_STAGE=1",
                                  "-DLMFORGE_TOPK_GATHER=0", "-DLMFORGE_PUSH_REDUCE=0"))):
        done = subprocess.run(build._command(nvcc, "sm_90", out, sources, flags), capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, (out.name, done.stderr[-1500:])
        assert out.is_file()


def test_the_cache_folder_follows_sources_and_architecture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from runtime.kernels import build

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    assert build.library_path("sm_90").parent.parent == tmp_path / "kernels"
    assert build.library_path("sm_90") != build.library_path("sm_89")
    assert build.library_path("sm_90") == build.library_path("sm_90")
    assert build.ort_api_version() >= 21  # the vendored headers (onnxruntime 1.21's C API)
    for header in ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h",
                   "onnxruntime_float16.h", "onnxruntime_lite_custom_op.h", "LICENSE"):
        assert (build.INCLUDE / header).is_file()


def _toy_decoder(vocab: int) -> bytes:
    """A stand-in for a shared-buffer decoder: logits [b, s, vocab] from an embedding of the ids,
    with the inputs the step nodes read (position_ids, seqlens_k)."""
    g = GraphBuilder("toy_decoder")
    g.input("input_ids", "int64", ["batch", "seq"])
    g.input("position_ids", "int64", ["batch", "seq"])
    g.input("seqlens_k", "int32", ["batch"])
    table = np.random.default_rng(0).standard_normal((vocab, vocab)).astype(np.float32) * 3
    g.op("Gather", [g.const(table), "input_ids"], {"axis": 0}, outputs=["logits"])
    g.output("logits", "float32", ["batch", "seq", vocab])
    return g.to_bytes()


def test_fuse_step_swaps_the_sampling_nodes_for_one_node() -> None:
    onnx = pytest.importorskip("onnx")
    from runtime.kernels.graph import fuse_step, step_node_names

    window = 4
    model = append_step(_toy_decoder(V), V, window)
    fused = fuse_step(model, V, window)
    before, after = onnx.load_from_string(model), onnx.load_from_string(fused)
    assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    kinds = [(n.domain, n.op_type) for n in after.graph.node]
    assert kinds.count(("lmforge", "FusedSample")) == 1
    assert ("", "TopK") not in kinds and ("", "CumSum") not in kinds
    assert len(after.graph.node) < len(before.graph.node) / 4
    assert any(o.domain == "lmforge" and o.version == 1 for o in after.opset_import)
    assert len(step_node_names(fused)) == len(after.graph.node) - 1  # all but the toy decoder's Gather
    node = next(n for n in after.graph.node if n.op_type == "FusedSample")
    assert list(node.input)[1:] == [PREFIX + row.name for row in ROW_INPUTS]  # the table's order
    assert list(node.output) == [PREFIX + "next_input_ids", PREFIX + "seen_out", PREFIX + "counts_out",
                                 PREFIX + "step_out"]
    with pytest.raises(ValueError, match="no step nodes"):
        fuse_step(_toy_decoder(V), V, window)
    # the unfused step model still runs as shipped on the CPU
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = neutral_feeds(2, V, window)
    feeds.update(input_ids=np.array([[3], [5]], np.int64), position_ids=np.array([[0], [0]], np.int64),
                 seqlens_k=np.array([0, 0], np.int32))
    ids = session.run([PREFIX + "next_input_ids"], feeds)[0]
    assert step_io(V, window)["inputs"]
    assert ids.shape == (2, 1)


@pytest.fixture(scope="module")
def tiny_cuda_fp16(artifact_cache, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """tiny:llama optimized for CUDA in fp16 (built on any machine; it runs on CUDA only)."""
    from passes.pipeline import optimize_artifact

    out = tmp_path_factory.mktemp("kernels") / "llama-fp16-cuda"
    optimize_artifact(artifact_cache("tiny:llama"), out, device="cuda", precision="fp16", progress=False)
    return out


def test_fuse_silu_gates_swaps_each_named_gate_for_one_node(tiny_cuda_fp16: Path) -> None:
    """A CUDA fp16 artifact fuses gate|up into one MatMul and names its SwiGLU gates
    (passes.fuse_projections); the runtime swaps each named group for one ``lmforge.SiluMul``
    from the fused projection to the gate's output, the graph's inputs and outputs unchanged,
    with the fused sampler's step or without it."""
    onnx = pytest.importorskip("onnx")
    import json

    from runtime.kernels.graph import SILU_GATE_PREFIX, fuse_silu_gates, fuse_step

    manifest = json.loads((tiny_cuda_fp16 / "manifest.json").read_text())
    layers = manifest["architecture"]["layers"]
    # q|k|v and gate|up of each layer fused, each gate named: in the fusion report too
    assert {"name": "fused-projections", "count": 2 * layers} in manifest["passes"]
    assert {"name": "swiglu-gates-named", "count": layers} in manifest["passes"]
    model = (tiny_cuda_fp16 / "model.onnx").read_bytes()
    before = onnx.load_from_string(model)
    groups = [n for n in before.graph.node if n.name.startswith(SILU_GATE_PREFIX)]
    assert len(groups) == 4 * layers  # Split, Sigmoid, Mul, Mul a layer
    producers = {o: n for n in before.graph.node for o in n.output}
    for window in (None, 4):
        source = model if window is None else fuse_step(model, manifest["architecture"]["vocab"], window)
        fused, count = fuse_silu_gates(source)
        assert count == layers
        after = onnx.load_from_string(fused)
        assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]
        assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
        ops = [n for n in after.graph.node if n.op_type == "SiluMul"]
        assert len(ops) == layers and all(n.domain == "lmforge" for n in ops)
        assert not [n for n in after.graph.node if n.name.startswith(SILU_GATE_PREFIX) and n.op_type != "SiluMul"]
        for op in ops:  # from the fused gate|up MatMul's output to what the down projection reads
            k = op.name[len(SILU_GATE_PREFIX):]
            split = next(n for n in groups if n.name == f"{SILU_GATE_PREFIX}{k}.split")
            gate = next(n for n in groups if n.name == f"{SILU_GATE_PREFIX}{k}.gate")
            assert list(op.input) == [split.input[0]] and producers[split.input[0]].op_type == "MatMul"
            assert list(op.output) == [gate.output[0]]
        assert [o.domain for o in after.opset_import].count("lmforge") == 1
        assert fuse_silu_gates(fused) == (fused, 0)  # nothing named is left
    assert fuse_silu_gates(b"") == (b"", 0)


def test_library_version_of_a_file_that_is_no_library_is_0(tmp_path: Path) -> None:
    from runtime.kernels import library_version

    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a library")
    assert library_version(junk) == 0


# -- the lent GPU ----------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime has no CUDA provider here")


@pytest.fixture(scope="module")
def library() -> Path:
    if not HAS_CUDA:
        pytest.skip("onnxruntime has no CUDA provider here")
    from runtime.kernels.build import build_library, detect_arch

    if detect_arch() is None:
        pytest.skip("no NVIDIA GPU (nvidia-smi) here")
    return build_library().path  # on a GPU machine a failed build fails the tests


def _options(library: Path) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.register_custom_ops_library(str(library))
    return options


class FusedSampler(Sampler):
    """:class:`runtime.sampling.Sampler` with the fused op in place of the ONNX sampling nodes."""

    def __init__(self, library: Path, logits_dtype: str = "float32") -> None:
        super().__init__(logits_dtype, providers=("CUDAExecutionProvider",))
        self.library = library

    def session(self, vocab: int) -> ort.InferenceSession:
        if vocab not in self._sessions:
            model = build_sampler_model(self.logits_dtype, vocab, fused=True)
            self._sessions[vocab] = ort.InferenceSession(model, sess_options=_options(self.library),
                                                         providers=["CUDAExecutionProvider"])
        return self._sessions[vocab]


@pytest.fixture(scope="module")
def sampler(library: Path) -> Sampler:
    """The fixture the imported sampler tests below run with: the fused op on the GPU."""
    return FusedSampler(library)


# The ONNX sampler's own tests, collected here again with this module's ``sampler`` (the fused op;
# skipped without a GPU); one that checks the ONNX sampler's host inputs does not apply (the
# fused op always updates the state, which changes no token).
from tests.runtime.test_sampler import (  # noqa: E402, F401
    test_a_top_k_row_draws_the_same_from_64_candidates_as_from_all,
    test_draws_follow_transformers_processed_probabilities,
    test_follows_the_softmax_distribution,
    test_greedy_is_argmax_exactly_first_index_on_ties,
    test_min_new_tokens_masks_stop_ids_until_reached,
    test_presence_and_frequency_penalties_follow_openai,
    test_repetition_penalty_follows_transformers,
    test_seeded_sampling_is_reproducible,
    test_state_is_updated_on_the_device,
    test_temperature_to_zero_approaches_greedy,
    test_the_draw_on_all_rows_equals_greedy_rows_alone,
    test_top_k_1_equals_greedy_and_greedy_rows_mix_with_sampled_rows,
    test_top_k_only_picks_the_k_best,
    test_top_p_boundary_is_exclusive_like_transformers,
    test_top_p_only_picks_the_nucleus,
)


def _params_mix() -> list[SamplingParams]:
    return [SamplingParams(), SamplingParams(temperature=0.7, seed=1),
            SamplingParams(temperature=0.7, top_p=0.9, seed=2),
            SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=3),
            SamplingParams(temperature=1.0, min_p=0.05, seed=4),
            SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.3, presence_penalty=0.5, seed=5)]


@gpu
@pytest.mark.parametrize("vocab", [V, 49152, 128256])
def test_greedy_is_bit_exact_with_the_onnx_sampler_fp16_and_fp32(library: Path, vocab: int) -> None:
    """Greedy rows pick exactly the ONNX sampler's argmax (the processed logits bit for bit), with
    penalties, from fp16 and fp32 logits, for a vocabulary cached in shared memory and one not."""
    rng = np.random.default_rng(vocab)
    for dtype in ("float32", "float16"):
        logits = (rng.standard_normal((8, vocab)) * 4).astype(dtype)
        logits[0, [5, 9]] = logits[0].max() + 1  # a tie: the first index
        seen = rng.random((8, vocab)) < 0.2
        counts = rng.integers(0, 3, (8, vocab)).astype(np.float32)
        params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.3, frequency_penalty=0.2)] * 4 + \
                 [SamplingParams()] * 4
        fused = FusedSampler(library, dtype).sample(logits, params, seen=seen, counts=counts)
        onnx_ids = Sampler(dtype).sample(logits, params, seen=seen, counts=counts)
        np.testing.assert_array_equal(fused, onnx_ids)
        assert fused[4:].tolist() == np.argmax(logits[4:].astype(np.float32), axis=-1).tolist()


@gpu
@pytest.mark.parametrize("vocab", [49152, 128256])
def test_large_vocabulary_draws_are_seeded_and_rows_independent(library: Path, vocab: int) -> None:
    """Real vocabulary sizes (the single-block kernel caches one row in shared memory and works
    the other in global memory; the cluster kernel caches both): the same seeds draw the same
    tokens again, a row draws the same alone as in any batch, every id is in range and kept by
    its row's filters."""
    rng = np.random.default_rng(1)
    params = _params_mix()
    logits = (rng.standard_normal((len(params), vocab)) * 3).astype(np.float16)
    sampler = FusedSampler(library, "float16")
    runs = [[sampler.sample(logits, params, step=s, steps=8).tolist() for s in range(8)] for _ in range(2)]
    assert runs[0] == runs[1]
    for r, p in enumerate(params):
        alone = [sampler.sample(logits[r:r + 1], [p], step=s, steps=8)[0] for s in range(8)]
        assert alone == [run[r] for run in runs[0]]
    top_k = [run[3] for run in runs[0]]
    best50 = set(np.argsort(-logits[3].astype(np.float32))[:50].tolist())
    assert set(top_k) <= best50
    assert len({tuple(run) for run in runs[0]}) > 1


@gpu
def test_top_p_draws_the_onnx_sampler_s_tokens(library: Path) -> None:
    """Where the nucleus lies within the ONNX sampler's 1,024 candidates, both keep the same tokens
    and draw by inverse CDF with the same seeded uniforms: the same token for (nearly) every seed
    (a uniform that lands where two cumulative sums, summed in another order, meet may differ)."""
    vocab, n = 8192, 2000
    rng = np.random.default_rng(3)
    row = (rng.standard_normal(vocab) * 4).astype(np.float32)
    for kw in ({"temperature": 0.7, "top_p": 0.9}, {"temperature": 1.0, "top_k": 50, "top_p": 0.9},
               {"temperature": 1.0, "min_p": 0.05}):
        params = [SamplingParams(seed=s, **kw) for s in range(n)]  # type: ignore[arg-type]
        fused = FusedSampler(library).sample(np.tile(row, (n, 1)), params)
        onnx_ids = Sampler("float32").sample(np.tile(row, (n, 1)), params)
        assert np.mean(fused == onnx_ids) > 0.99, kw
        kept = _kept_tokens(row, **kw)  # type: ignore[arg-type]
        drawn = set(fused.tolist())
        assert drawn <= kept, kw
        assert len(drawn) >= min(3, len(kept)), kw  # the rows really sample (T 0.7, top-p 0.9 keeps 3 here)


def _kept_tokens(row: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0) -> set[int]:
    """The tokens a row's filters keep (top-k, then top-p's smallest set reaching p, then min-p)."""
    z = row.astype(np.float64) / temperature
    order = np.argsort(-z)
    if top_k:
        order = order[:top_k]
    probs = np.exp(z[order] - z[order[0]])
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1 if top_p < 1.0 else len(order)
    keep_ids = order[:keep]
    if min_p:
        keep_ids = keep_ids[probs[:keep] >= min_p * probs[0]]
    return set(keep_ids.tolist())


def _fused_only(vocab: int, steps: int, logits_dtype: str = "float16") -> bytes:
    """A graph of the one FusedSample node: the row inputs and ``logits`` in, ``next_ids``,
    ``seen_out``, ``counts_out`` and ``step_out`` out."""
    g = GraphBuilder("fused_only")
    names = {row.name: g.input(row.name, row.dtype, ["batch", *row.dims(vocab, steps)]) for row in ROW_INPUTS}
    g.input("logits", logits_dtype, ["batch", vocab])
    outputs = {"next_ids": "next_ids", "seen": "seen_out", "counts": "counts_out", "step": "step_out"}
    from runtime.sampler_graph import add_fused_sampling

    add_fused_sampling(g, "logits", names, outputs)
    g.output("next_ids", "int64", ["batch", 1])
    g.output("seen_out", "bool", ["batch", vocab])
    g.output("counts_out", "float32", ["batch", vocab])
    g.output("step_out", "int64", ["batch"])
    return g.to_bytes()


@gpu
def test_the_op_runs_inside_a_captured_cuda_graph(library: Path) -> None:
    """One FusedSample node, CUDA-graph capture on, inputs bound by address: replays read the
    buffers as they are at each replay (new uniforms, new logits), and give the eager results."""
    vocab, rows, steps = 49152, 4, 8
    model = _fused_only(vocab, steps)
    params = _params_mix()[:rows]
    rng = np.random.default_rng(7)
    host = stack_rows([row_arrays(p, [], [], vocab, steps) for p in params])
    eager = ort.InferenceSession(model, sess_options=_options(library), providers=["CUDAExecutionProvider"])
    captured = ort.InferenceSession(model, sess_options=_options(library),
                                    providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0) for name, a in host.items()}
    logits0 = (rng.standard_normal((rows, vocab)) * 3).astype(np.float16)
    values["logits"] = ort.OrtValue.ortvalue_from_numpy(logits0, "cuda", 0)
    outs = {"next_ids": ort.OrtValue.ortvalue_from_shape_and_type([rows, 1], np.int64, "cuda", 0),
            "seen_out": ort.OrtValue.ortvalue_from_shape_and_type([rows, vocab], np.bool_, "cuda", 0),
            "counts_out": ort.OrtValue.ortvalue_from_shape_and_type([rows, vocab], np.float32, "cuda", 0),
            "step_out": ort.OrtValue.ortvalue_from_shape_and_type([rows], np.int64, "cuda", 0)}
    binding = captured.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for name, value in outs.items():
        binding.bind_ortvalue_output(name, value)
    for step in range(steps):
        logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float16)
        values["logits"].update_inplace(logits)
        step_now = np.full(rows, step, np.int64)
        values["step"].update_inplace(step_now)
        captured.run_with_iobinding(binding)
        want = eager.run(["next_ids", "step_out"], {**host, "logits": logits, "step": step_now})
        np.testing.assert_array_equal(outs["next_ids"].numpy(), want[0])
        np.testing.assert_array_equal(outs["step_out"].numpy(), want[1])


def _sm() -> int:
    from runtime.kernels.build import detect_arch

    arch = detect_arch() or "sm_0"
    return int(arch[len("sm_"):].rstrip("a"))


@gpu
@pytest.mark.parametrize(("vocab", "logits_dtype"), [(3, "float32"), (V, "float32"), (50257, "float16"),
                                                     (128256, "float16"), (128256, "float32")])
def test_the_cluster_kernel_draws_the_single_block_kernel_s_tokens(library: Path, vocab: int, logits_dtype: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The op's two kernels on the same rows (``LMFORGE_KERNELS_CLUSTER`` is read when onnxruntime
    creates the op's kernel, so per session): greedy rows and every state output are the same bit
    for bit, sampled rows draw the same tokens but where two sums in another order straddle the
    uniform's target (none expected in 64 rows, at most 2 allowed), and the cluster kernel repeats
    itself bit for bit. Below sm_90 both sessions run the single-block kernel."""
    rows, steps = 64, 4
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(logits_dtype)
    mix = [*_params_mix(), SamplingParams(min_new_tokens=3), SamplingParams(temperature=0.7, top_p=0.9,
                                                                            min_new_tokens=3, seed=6)]
    params = [dataclasses.replace(mix[r % len(mix)], seed=100 + r) for r in range(rows)]
    stops = [[int(np.argmax(logits[r]))] for r in range(rows)]  # masked while step < min_new_tokens
    feeds = stack_rows([row_arrays(p, [], s, vocab, steps) for p, s in zip(params, stops)])
    feeds["seen"] = rng.random((rows, vocab)) < 0.2
    feeds["counts"] = rng.integers(0, 3, (rows, vocab)).astype(np.float32)
    feeds["step"] = rng.integers(0, steps, rows).astype(np.int64)
    feeds["logits"] = logits
    model = _fused_only(vocab, steps, logits_dtype)
    feeds = {name: feeds[name] for name in [row.name for row in ROW_INPUTS] + ["logits"]}  # the graph's inputs
    runs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LMFORGE_KERNELS_CLUSTER", setting)
        session = ort.InferenceSession(model, sess_options=_options(library), providers=["CUDAExecutionProvider"])
        runs[setting] = [session.run(None, feeds) for _ in range(2)]
    cluster, single = runs["1"][0], runs["0"][0]
    for a, b in zip(runs["1"][0], runs["1"][1]):
        np.testing.assert_array_equal(a, b)  # the cluster kernel, run to run
    ids_c, ids_s = cluster[0].ravel(), single[0].ravel()
    greedy = np.array([p.temperature == 0 or p.top_k == 1 for p in params])
    np.testing.assert_array_equal(ids_c[greedy], ids_s[greedy])
    assert int(np.sum(ids_c[~greedy] != ids_s[~greedy])) <= 2
    same = ids_c == ids_s
    for c, s in zip(cluster[1:3], single[1:3]):  # seen_out, counts_out: the same where the token is
        np.testing.assert_array_equal(c[same], s[same])
    np.testing.assert_array_equal(cluster[3], single[3])
    np.testing.assert_array_equal(cluster[3], feeds["step"] + 1)
    for ids, (seen_out, counts_out) in ((ids_c, cluster[1:3]), (ids_s, single[1:3])):  # each its own token
        hit = np.zeros((rows, vocab), np.bool_)
        hit[np.arange(rows), ids] = True
        np.testing.assert_array_equal(seen_out, feeds["seen"] | hit)
        np.testing.assert_array_equal(counts_out, feeds["counts"] + hit)


@gpu
def test_the_cluster_kernel_serves_from_sm_90_unless_switched_off(library: Path) -> None:
    """Which kernel a session's op launches, as LMFORGE_KERNELS_TRACE=1 reports it (a process of
    its own: the trace switch is read once a process): the cluster kernel by default on sm_90+,
    the single-block kernel under LMFORGE_KERNELS_CLUSTER=0 and below sm_90."""
    script = ("import sys; from pathlib import Path; import numpy as np; from runtime import SamplingParams; "
              "from tests.runtime.test_kernels import FusedSampler; "
              "print(FusedSampler(Path(sys.argv[1])).sample(np.zeros((2, 64), np.float32), "
              "[SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9, seed=1)]))")
    root = Path(__file__).resolve().parents[2]
    for setting in ("", "0"):
        env = {**os.environ, "LMFORGE_KERNELS_TRACE": "1", "LMFORGE_KERNELS_CLUSTER": setting}
        done = subprocess.run([sys.executable, "-c", script, str(library)], env=env, cwd=root, capture_output=True,
                              text=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        cluster = setting != "0" and _sm() >= 90
        assert ("cluster kernel on" in done.stderr) == cluster, done.stderr[-2000:]
        launched = "launched (cluster kernel)" if cluster else "launched (single-block kernel)"
        assert launched in done.stderr, done.stderr[-2000:]


@gpu
def test_the_engine_uses_the_fused_step_and_decodes_greedy_like_the_onnx_sampler(
        library: Path, tiny_cuda_fp16: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slots engine on CUDA (captured steps) with the library: the step model it opens holds
    the fused node, and its greedy tokens are the ONNX sampler's; seeded sampled runs repeat."""
    from runtime import Engine, device

    out = tiny_cuda_fp16
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 300, int(k)).tolist() for k in rng.integers(2, 20, 5)]
    monkeypatch.setattr(device, "kernel_library", lambda: None)
    plain = Engine.load(out, device="cuda", max_batch=8)
    try:
        assert plain.backend.device.kernels is None
        want = plain.generate_ids(prompts, 24)
    finally:
        plain.close()
    monkeypatch.setattr(device, "kernel_library", lambda: library)
    fused = Engine.load(out, device="cuda", max_batch=8)
    try:
        assert fused.backend.device.kernels == library
        assert fused.generate_ids(prompts, 24) == want
        params = [SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=i) for i in range(5)]
        first = fused.generate_ids(prompts, 16, params)
        assert fused.generate_ids(prompts, 16, params) == first
    finally:
        fused.close()


def _silu_mul_session(library: Path, dtype: str) -> ort.InferenceSession:
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    node = helper.make_node("SiluMul", ["h"], ["y"], domain="lmforge", name="gate")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("h", elem, None)],
                              [helper.make_tensor_value_info("y", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("lmforge", 1)],
                              ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), sess_options=_options(library),
                                providers=["CUDAExecutionProvider"])


@gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("shape", [(1, 1, 2 * 8192), (2, 3, 2 * 64), (1, 2, 2 * 5), (7, 2 * 1)])
def test_silu_mul_is_silu_of_the_gate_times_up(library: Path, dtype: str, shape: tuple[int, ...]) -> None:
    """``lmforge.SiluMul`` against float64 numpy, on the vector path (I a multiple of 8) and the
    scalar one, with hostile values in the gate and up halves: ±inf, NaN, ±100, underflowing
    values. float32: to a few float32 ulps; float16: within one float16 ulp of the exact result
    (the kernel rounds once, from float32)."""
    rng = np.random.default_rng(sum(shape))
    h = (rng.standard_normal(shape) * 3).astype(dtype)
    flat = h.reshape(-1)
    hostile = [np.inf, -np.inf, np.nan, 100.0, -100.0, 1e-30, -1e-30, 0.0]
    flat[: min(len(hostile), flat.size)] = np.array(hostile[: flat.size], dtype=dtype)
    flat[-min(len(hostile), flat.size):] = np.array(hostile[: flat.size][::-1], dtype=dtype)
    got = _silu_mul_session(library, dtype).run(None, {"h": h})[0]
    inner = shape[-1] // 2
    a, b = h[..., :inner].astype(np.float64), h[..., inner:].astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        want = a / (1.0 + np.exp(-a)) * b
    assert got.shape == (*shape[:-1], inner) and got.dtype == np.dtype(dtype)
    assert np.array_equal(np.isnan(got), np.isnan(want.astype(dtype)))
    finite = np.isfinite(want.astype(dtype))
    assert np.array_equal(got[~finite & ~np.isnan(got)], want.astype(dtype)[~finite & ~np.isnan(got)])  # ±inf
    if dtype == "float32":
        np.testing.assert_allclose(got[finite], want[finite], rtol=4e-7, atol=1e-37)
    else:
        ulp = np.spacing(np.abs(want[finite]).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(got[finite].astype(np.float64) - want[finite]) <= ulp)


@gpu
def test_silu_mul_refuses_an_odd_last_axis(library: Path) -> None:
    session = _silu_mul_session(library, "float32")
    with pytest.raises(Exception, match="even size"):
        session.run(None, {"h": np.ones((2, 5), np.float32)})


@gpu
def test_the_engine_runs_swiglu_gates_as_silu_mul_with_the_onnx_nodes_logits(
        library: Path, tiny_cuda_fp16: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slots engine on CUDA with the library: its step model holds one ``SiluMul`` a layer
    (none with ``LMFORGE_KERNELS_SILU=0``); every step's logits stay within fp16 rounding of the
    ONNX nodes' (the kernel rounds once where they round three times, so not bit for bit), and a
    greedy token differs only where the two best logits were closer than that difference."""
    import json

    from runtime import Engine, device

    layers = json.loads((tiny_cuda_fp16 / "manifest.json").read_text())["architecture"]["layers"]
    monkeypatch.setattr(device, "kernel_library", lambda: library)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 300, int(k)).tolist() for k in rng.integers(2, 20, 6)]
    runs = {}
    for silu in ("0", "1"):
        monkeypatch.setenv("LMFORGE_KERNELS_SILU", silu)
        engine = Engine.load(tiny_cuda_fp16, device="cuda", max_batch=8)
        try:
            backend = engine.backend
            opened = backend.device.step_model((tiny_cuda_fp16 / "model.onnx").read_bytes(), engine.vocab,
                                               backend.window)
            assert opened.count(b"SiluMul") == (layers if silu == "1" else 0)
            runs[silu] = engine.generate_results(prompts, 12, return_logits=True)
        finally:
            engine.close()
    worst = 0.0
    for plain, fused in zip(runs["0"], runs["1"]):
        steps = min(len(plain.token_ids), len(fused.token_ids))
        diverged = next((i for i in range(steps) if plain.token_ids[i] != fused.token_ids[i]), steps)
        for i in range(min(diverged + 1, steps)):  # the same tokens so far: the same inputs
            gap = float(np.max(np.abs(plain.step_logits[i] - fused.step_logits[i])))
            worst = max(worst, gap)
            assert gap < 0.05, (i, gap)
        if diverged < steps:  # a near tie: the two best logits closer than the drift
            top = np.sort(plain.step_logits[diverged])[-2:]
            assert top[1] - top[0] <= 2 * worst, (diverged, top, worst)
    assert worst > 0.0  # the kernel ran: fp16 rounding differs somewhere
