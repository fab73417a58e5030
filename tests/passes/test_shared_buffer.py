"""The shared-buffer KV pass (:mod:`passes.shared_buffer`): the IO rewrite, the manifest, the
numbers against the concat graph (``--check``), and the refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from passes.pipeline import optimize_artifact
from runtime import step_graph
from runtime.artifact import load_artifact
from runtime.errors import PassError


@pytest.fixture(scope="module")
def shared(artifact_cache: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("sb")
    made = {}

    def get(precision: str):  # type: ignore[no-untyped-def]
        if precision not in made:
            out = root / precision
            # fp32 shared-buffer is a CPU artifact (GroupQueryAttention has no fp32 CUDA kernel)
            device, mode = ("cpu", "shared-buffer") if precision == "fp32" else ("cuda", None)
            made[precision] = (out, optimize_artifact(artifact_cache("tiny:llama"), out, device, precision,
                                                      check=True, progress=False, kv_mode=mode))
        return made[precision]

    return get


@pytest.mark.parametrize("precision,kv_dtype", [("fp32", "float32"), ("fp16", "float16")])
def test_io_rewrite(shared, precision: str, kv_dtype: str) -> None:  # type: ignore[no-untyped-def]
    out, report = shared(precision)
    art = load_artifact(out)
    m = art.manifest
    assert m["kv_mode"] == "shared-buffer" and m["kv"]["dtype"] == kv_dtype and m["kv"]["max_context"] == 512
    inputs = [(t.name, t.dtype, list(t.shape)) for t in art.inputs]
    assert inputs[:4] == [("input_ids", "int64", ["batch", "seq"]), ("position_ids", "int64", ["batch", "seq"]),
                          ("seqlens_k", "int32", ["batch"]), ("total_sequence_length", "int32", [])]
    assert inputs[4:8] == [(f"past_key_values.{i}.{k}", kv_dtype, ["batch", 2, "max_context", 16])
                           for i in range(2) for k in ("key", "value")]
    # the step model (decoder + sampling + next inputs) is in the artifact, its IO in the manifest
    step = step_graph.step_io(int(m["architecture"]["vocab"]))
    assert m["step"] == {"format": step_graph.FORMAT, "prefix": "lmforge_step.", "window": step_graph.WINDOW}
    assert [t[0] for t in inputs[8:]] == [t["name"] for t in step["inputs"]]
    assert all(t[0].startswith("lmforge_step.") for t in inputs[8:])
    outputs = {t.name: (t.dtype, list(t.shape)) for t in art.outputs}
    assert outputs["present.1.value"] == (kv_dtype, ["batch", 2, "max_context", 16])
    assert [t.name for t in art.outputs][-len(step["outputs"]):] == [t["name"] for t in step["outputs"]]
    assert {"name": "shared-buffer-kv", "count": 2} in m["passes"] and {"name": "step-model", "count": 1} in m["passes"]
    # the graph itself: no mask, GQA reads the past directly and writes the present directly
    model = ir.load(str(art.model_path))
    assert [v.name for v in model.graph.inputs] == [n for n, _, _ in inputs]
    assert {"TopK", "CumSum", "ScatterElements"} <= {n.op_type for n in model.graph.all_nodes()}
    gqa = [n for n in model.graph.all_nodes() if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    for i, node in enumerate(gqa):
        assert node.inputs[3].name == f"past_key_values.{i}.key" and node.inputs[5].name == "seqlens_k"
        assert node.inputs[6].name == "total_sequence_length"
        assert len(node.inputs) <= 10 or node.inputs[10] is None  # no attention_bias
        assert node.outputs[2].name == f"present.{i}.value"
    # rotary inside GQA, and q/k/v from one packed projection (key/value inputs empty)
    assert {"name": "rotary-into-gqa", "count": 2} in m["passes"] and {"name": "packed-qkv", "count": 2} in m["passes"]
    for node in gqa:
        assert node.attributes.get_int("do_rotary", 0) == 1 and node.inputs[1] is None and node.inputs[2] is None
        assert (
            node.inputs[0].producer().op_type == "MatMul"
            and node.inputs[0].shape[-1] == 96 + 2 * 2 * 16  # hidden + k + v
        )
    # --check compared it with the concat graph on the check cases (left-padded row included)
    assert report.check["ok"]
    bound = 1e-4 if precision == "fp32" else 0.05
    assert max(report.check["max_abs_diff"].values()) < bound


def test_packed_qkv_matmulnbits_and_bias(artifact_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """int4 projections (MatMulNBits: B, scales, zero points concatenated by rows) with qwen2's
    q/k/v biases pack too, and --check (logits vs the fp32 concat graph) still holds."""
    report = optimize_artifact(artifact_cache("tiny:qwen2"), tmp_path / "q", "cuda", "int4", check=True, progress=False)
    art = load_artifact(tmp_path / "q")
    assert {"name": "packed-qkv", "count": 2} in art.manifest["passes"] and report.check["ok"]
    model = ir.load(str(art.model_path))
    for node in (n for n in model.graph.all_nodes() if n.op_type == "GroupQueryAttention"):
        add = node.inputs[0].producer()
        assert add.op_type == "Add" and add.inputs[0].producer().op_type == "MatMulNBits"
        assert add.inputs[0].producer().attributes.get_int("N") == add.inputs[1].shape[0]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cpu_quantized_default_is_shared_buffer_with_the_fused_qkv_packed(precision: str, artifact_cache,  # type: ignore[no-untyped-def]
                                                                        tmp_path: Path) -> None:
    """On the CPU, int8 and int4 take the shared-buffer contract by default: q|k|v fused into one
    MatMulNBits before quantizing (passes/fuse_projections.py), and GroupQueryAttention reads that
    projection's output in place of its Split (the packed form); --check holds against concat."""
    report = optimize_artifact(artifact_cache("tiny:llama"), tmp_path / "o", "cpu", precision, check=True,
                               progress=False)
    art = load_artifact(tmp_path / "o")
    assert art.manifest["kv_mode"] == "shared-buffer" and report.check["ok"]
    assert {"name": "packed-qkv", "count": 2} in art.manifest["passes"]
    model = ir.load(str(art.model_path))
    ops = [n.op_type for n in model.graph.all_nodes()]
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # a layer: q|k|v, o, gate|up, down; and the head
    for node in (n for n in model.graph.all_nodes() if n.op_type == "GroupQueryAttention"):
        assert node.inputs[1] is None and node.inputs[2] is None
        # (random weights are on no 4-bit source grid, so no offsets are added after it)
        assert node.inputs[0].producer().op_type == "MatMulNBits"
    optimize_artifact(artifact_cache("tiny:llama"), tmp_path / "f", "cpu", "fp32", progress=False)
    assert load_artifact(tmp_path / "f").manifest["kv_mode"] == "concat"  # fp32 keeps concat on the CPU


def test_in_place_update(shared) -> None:  # type: ignore[no-untyped-def]
    """Bound to one buffer as past and present, a decode step writes only its row's next slot."""
    import onnxruntime as ort

    out, _ = shared("fp32")
    art = load_artifact(out)
    sess = ort.InferenceSession(str(art.model_path), providers=["CPUExecutionProvider"])
    cap = 8
    kv = {f"past_key_values.{i}.{k}": ort.OrtValue.ortvalue_from_numpy(np.full((2, 2, cap, 16), 0.5, np.float32))
          for i in range(2) for k in ("key", "value")}
    before = {k: v.numpy().copy() for k, v in kv.items()}
    b = sess.io_binding()
    b.bind_cpu_input("input_ids", np.array([[5], [9]], np.int64))
    b.bind_cpu_input("position_ids", np.array([[2], [4]], np.int64))
    b.bind_cpu_input("seqlens_k", np.array([2, 4], np.int32))
    b.bind_cpu_input("total_sequence_length", np.array(cap, np.int32))
    for name, value in step_graph.neutral_feeds(2, int(art.architecture["vocab"]), capacity=cap).items():
        b.bind_cpu_input(name, value)
    for name, value in kv.items():
        b.bind_ortvalue_input(name, value)
        b.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
    for output in sess.get_outputs():
        if not output.name.startswith("present."):
            b.bind_output(output.name)
    sess.run_with_iobinding(b)
    for name, value in kv.items():
        after = value.numpy()
        changed = np.argwhere(np.any(after != before[name], axis=(1, 3)))  # (row, position) pairs
        assert sorted(map(tuple, changed.tolist())) == [(0, 2), (1, 4)], name


def test_refused_for_non_gqa(artifact_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PassError, match="GroupQueryAttention") as err:
        optimize_artifact(artifact_cache("tiny:gpt2"), tmp_path / "o", "cuda", "fp32", kv_mode="shared-buffer",
                          progress=False)
    assert "MultiHeadAttention" in str(err.value)
    assert not (tmp_path / "o").exists()


def test_cuda_default_keeps_concat_for_non_gqa(artifact_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    optimize_artifact(artifact_cache("tiny:gpt2"), tmp_path / "o", "cuda", "fp16", progress=False)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["kv_mode"] == "concat"


def test_fp32_on_cuda_keeps_concat(artifact_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """GroupQueryAttention has no fp32 CUDA kernel: fp32 for CUDA stays concat, and asking for
    shared-buffer there is refused with nothing written."""
    optimize_artifact(artifact_cache("tiny:llama"), tmp_path / "o", "cuda", "fp32", progress=False)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["kv_mode"] == "concat"
    with pytest.raises(PassError, match="fp32 on CUDA"):
        optimize_artifact(artifact_cache("tiny:llama"), tmp_path / "p", "cuda", "fp32", kv_mode="shared-buffer",
                          progress=False)
    assert not (tmp_path / "p").exists()


def test_no_fuse_and_bad_mode_refused(artifact_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PassError, match="no-fuse"):
        optimize_artifact(artifact_cache("tiny:llama"), tmp_path / "a", "cuda", "fp32", fuse=False,
                          kv_mode="shared-buffer", progress=False)
    with pytest.raises(PassError, match="kv_mode"):
        optimize_artifact(artifact_cache("tiny:llama"), tmp_path / "b", "cuda", "fp32", kv_mode="paged",
                          progress=False)


def test_mask_reader_refused() -> None:
    """An attention_mask still read after the rewrite (here: by an extra output) is refused."""
    from passes.shared_buffer import rewrite_shared_buffer

    arch = {"layers": 1, "kv_heads": 1, "head_dim": 16}
    kv = {"past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
          "present_key": "present.{i}.key", "present_value": "present.{i}.value"}
    f32, i64 = ir.TensorType(ir.DataType.FLOAT), ir.TensorType(ir.DataType.INT64)
    ids = ir.Value(name="input_ids", type=i64, shape=ir.Shape(["batch", "seq"]))
    mask = ir.Value(name="attention_mask", type=i64, shape=ir.Shape(["batch", "total"]))
    pos = ir.Value(name="position_ids", type=i64, shape=ir.Shape(["batch", "seq"]))
    pk = ir.Value(name="past_key_values.0.key", type=f32, shape=ir.Shape(["batch", 1, "past", 16]))
    pv = ir.Value(name="past_key_values.0.value", type=f32, shape=ir.Shape(["batch", 1, "past", 16]))
    q = ir.Value(name="q", type=f32, shape=ir.Shape(["batch", "seq", 16]))
    gqa = ir.Node("com.microsoft", "GroupQueryAttention", [q, q, q, pk, pv, None, None],
                  attributes=[ir.AttrInt64("num_heads", 1), ir.AttrInt64("kv_num_heads", 1)], num_outputs=3)
    gqa.outputs[0].name, gqa.outputs[1].name, gqa.outputs[2].name = "logits", "present.0.key", "present.0.value"
    ms = ir.Node("", "Shape", [mask], num_outputs=1)
    ms.outputs[0].name = "mask_shape"
    graph = ir.Graph([ids, mask, pos, pk, pv, q], [*gqa.outputs, ms.outputs[0]], nodes=[gqa, ms],
                     opset_imports={"": 18, "com.microsoft": 1})
    with pytest.raises(PassError, match="attention_mask is still read"):
        rewrite_shared_buffer(ir.Model(graph, ir_version=10), arch, kv)


# The families on the full fast path: every attention fused to GroupQueryAttention, the shared-buffer
# KV contract and the step model.
FAST_PATH = ["llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "gemma", "gemma3_text",
             "granite", "olmo2", "starcoder2", "phi3", "stablelm"]


@pytest.mark.parametrize("arch", FAST_PATH)
def test_full_fast_path_gives_transformers_greedy_ids(arch: str, artifact_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Each family's shared-buffer graph, run by the slots engine on the CPU, gives transformers'
    own greedy ids for a prompt 2.5 sliding windows long. The shared-buffer graph drops the mask,
    so a window must travel as GQA's ``local_window_size`` (Mistral on every layer, Gemma 3 on its
    local layers only); one off by one, or missing, gives other ids within the first tokens."""
    import torch

    from exporters.sources import load_source
    from exporters.specs import TINY_WINDOW
    from runtime.engine import Engine

    src = artifact_cache(f"tiny:{arch}")
    out = tmp_path / f"{arch}-sb"
    report = optimize_artifact(src, out, "cpu", "fp32", kv_mode="shared-buffer", check=True, progress=False)
    assert report.check is not None and report.check["ok"]
    art = load_artifact(out)
    assert art.kv_mode.value == "shared-buffer"
    layer_types = art.architecture.get("layer_types")
    want = [TINY_WINDOW if art.architecture.get("sliding_window") and (not layer_types or t == "sliding_attention")
            else -1 for t in (layer_types or [None] * art.architecture["layers"])]
    model = ir.load(str(out / "model.onnx"))
    gqa = sorted((n for n in model.graph.all_nodes() if n.op_type == "GroupQueryAttention"),
                 key=lambda n: n.outputs[1].name)
    assert [n.attributes.get_int("local_window_size", -1) for n in gqa] == want
    prompt = torch.randint(3, 300, (1, 5 * TINY_WINDOW // 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_source(f"tiny:{arch}").model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:]
    engine = Engine.load(out, "cpu")
    try:
        got = engine.generate_ids([prompt[0].tolist()], max_new_tokens=12)
    finally:
        engine.close()
    assert got[0] == ref.tolist()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3"])
def test_fp16_cuda_graph_reads_the_batch_from_input_ids(arch: str, artifact_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """torch.export took these graphs' batch size from the last past KV tensor; in the fp16 graph
    that read sits behind the precision pass's Cast. The rewrite points it at input_ids, so the
    past feeds its GroupQueryAttention alone and the CUDA artifact gets the shared-buffer contract."""
    out = tmp_path / arch
    report = optimize_artifact(artifact_cache(f"tiny:{arch}"), out, "cuda", "fp16", progress=False)
    assert {p["name"]: p["count"] for p in report.passes}["shared-buffer-kv"] == 2
    model = ir.load(str(out / "model.onnx"))
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values."):
            assert [u.node.op_type for u in value.uses()] == ["GroupQueryAttention"]


def test_as_many_kv_heads_as_query_heads_fuses_to_gqa_and_serves(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """Llama 2 / Phi-3-mini attention (KV heads = query heads, so transformers' repeat_kv is the
    identity) fuses to GroupQueryAttention with kv_num_heads = num_heads, not to
    MultiHeadAttention, so it gets the shared-buffer fast path; the slots engine then gives
    transformers' greedy ids."""
    import dataclasses

    import torch

    import exporters.sources as sources
    from exporters.convert import convert
    from exporters.sources import load_source
    from exporters.specs import get_spec
    from runtime.engine import Engine

    llama = get_spec("llama")
    heads = int(llama.tiny_config["num_attention_heads"])
    mha = dataclasses.replace(llama, tiny_config={**llama.tiny_config, "num_key_value_heads": heads})
    monkeypatch.setattr(sources, "get_spec", lambda name: mha if name == "llama" else get_spec(name))
    src = convert("tiny:llama", tmp_path / "fp32", progress=False)
    out = tmp_path / "sb"
    report = optimize_artifact(src, out, "cpu", "fp32", kv_mode="shared-buffer", check=True, progress=False)
    assert report.check is not None and report.check["ok"]
    model = ir.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph.all_nodes()]
    assert "MultiHeadAttention" not in ops
    gqa = [n for n in model.graph.all_nodes() if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    assert {(n.attributes.get_int("num_heads"), n.attributes.get_int("kv_num_heads")) for n in gqa} == {(heads, heads)}
    prompt = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = load_source("tiny:llama").model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:]
    engine = Engine.load(out, "cpu")
    try:
        got = engine.generate_ids([prompt[0].tolist()], max_new_tokens=12)
    finally:
        engine.close()
    assert got[0] == ref.tolist()
