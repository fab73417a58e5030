"""Per architecture (tiny:*): expected fusion counts, logits within tolerance of the unfused
artifact, precisions, and the refusals of ``optimize`` (exit 2, nothing written)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import transformers

from passes.check import compare_artifacts
from passes.expected import expected_fusions
from passes.pipeline import optimize_artifact
from runtime.artifact import load_artifact
from runtime.errors import PassError

# Fused op counts on the 2-layer tiny models (measured; a change here is a behaviour change).
_L = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4, "GroupQueryAttention": 2,
      "RotaryEmbedding": 4}  # Llama's block
EXPECTED_OPS: dict[str, dict[str, int]] = {
    "llama": _L, "mistral": _L, "qwen2": _L, "qwen2_moe": _L, "mixtral": _L, "granite": _L,
    "qwen3": {**_L, "SimplifiedLayerNormalization": 5},  # + a q and a k norm a layer
    "qwen3_moe": {**_L, "SimplifiedLayerNormalization": 5},
    "gemma": {**_L, "FastGelu": 2},
    "gemma3_text": {**_L, "SimplifiedLayerNormalization": 9, "FastGelu": 2},  # sandwich + q/k norms
    "olmo2": {**_L, "SimplifiedLayerNormalization": 8, "SkipSimplifiedLayerNormalization": 1},  # post-norms
    "starcoder2": {"LayerNormalization": 1, "SkipLayerNormalization": 4, "FastGelu": 2, "GroupQueryAttention": 2,
                   "RotaryEmbedding": 4},
    "gemma2": {"SimplifiedLayerNormalization": 5, "SkipSimplifiedLayerNormalization": 4, "FastGelu": 2,
               "RotaryEmbedding": 4},
    "phi3": _L,  # partial rotary (3/4 of each head): RotaryEmbedding(rotary_embedding_dim=12)
    "cohere": {"SimplifiedLayerNormalization": 3, "MultiHeadAttention": 2},
    "stablelm": {"LayerNormalization": 1, "SkipLayerNormalization": 4, "GroupQueryAttention": 2, "RotaryEmbedding": 4},
    "phi": {"LayerNormalization": 1, "SkipLayerNormalization": 2, "FastGelu": 2, "MultiHeadAttention": 2,
            "RotaryEmbedding": 4},
    "gpt_neox": {"LayerNormalization": 1, "SkipLayerNormalization": 2, "BiasGelu": 2, "MultiHeadAttention": 2,
                 "RotaryEmbedding": 4},
    "falcon": {"LayerNormalization": 1, "SkipLayerNormalization": 2, "Gelu": 2, "RotaryEmbedding": 4},
    "gpt2": {"SkipLayerNormalization": 5, "FastGelu": 2, "MultiHeadAttention": 2},
    "gpt_bigcode": {"SkipLayerNormalization": 5, "FastGelu": 2, "MultiHeadAttention": 2},
    "opt": {"LayerNormalization": 4, "SkipLayerNormalization": 1, "MultiHeadAttention": 2},
    "bloom": {"LayerNormalization": 2, "SkipLayerNormalization": 4, "FastGelu": 2, "MultiHeadAttention": 2},
    "bert": {"LayerNormalization": 1, "SkipLayerNormalization": 4, "BiasGelu": 2, "Attention": 2},
}
# Expected by the spec and not fused, with the pass whose tracer explains it: Cohere's interleaved
# rotary leaves an Add where the GQA rule wants a RotaryEmbedding; Gemma 2's score soft-capping sits
# between the MatMul and the Softmax an SDPA needs. Falcon's attention depends on the transformers
# release: 5.25 writes its one KV head so that the MHA rules fuse it (2 nodes); before 5.25 the
# SDPA rule finds the present KV with 1 head where it checks for 4, and it stays unfused.
_FALCON_MHA = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 25)
KNOWN_MISSES: dict[str, set[str]] = {
    "cohere": {"GroupQueryAttention"}, "gemma2": {"GroupQueryAttention"},
    **({} if _FALCON_MHA else {"falcon": {"MultiHeadAttention"}}),
}
EXPECTED_OPS["falcon"]["MultiHeadAttention"] = 2 if _FALCON_MHA else 0


@pytest.fixture(scope="module")
def optimized(artifact_cache: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("optimized")
    made: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(arch: str, precision: str = "fp32"):  # type: ignore[no-untyped-def]
        if (arch, precision) not in made:
            out = root / f"{arch}-{precision}"
            report = optimize_artifact(
                artifact_cache(f"tiny:{arch}"), out, "cpu", precision, check=True, progress=False
            )
            made[(arch, precision)] = (out, report)
        return made[(arch, precision)]

    return get


def test_every_tuned_family_has_measured_counts() -> None:
    from exporters.encoder_specs import ENCODER_FAMILIES  # their counts: tests/encoders/test_families.py
    from exporters.specs import all_specs

    assert {s.name for s in all_specs() if s.name not in ENCODER_FAMILIES} | {"bert"} == set(EXPECTED_OPS)
    assert expected_fusions("qwen3") == ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                                         "GroupQueryAttention")
    assert expected_fusions("some_untuned_family") == ()  # the generic path expects nothing


@pytest.mark.parametrize("arch", sorted(EXPECTED_OPS))
def test_architecture_fusions(arch: str, optimized, artifact_cache) -> None:  # type: ignore[no-untyped-def]
    out, report = optimized(arch)
    for op, n in EXPECTED_OPS[arch].items():
        assert report.ops.get(op, 0) == n, (op, report.ops)
    assert set(report.missing) == KNOWN_MISSES.get(arch, set())
    for _op, reasons in report.missing.items():
        assert reasons and all(r.startswith("[") for r in reasons)  # each names the pass and the tracer's reason
    # the pipeline's own --check passed, and an independent comparison agrees
    assert report.check is not None and report.check["ok"]
    src, dst = load_artifact(artifact_cache(f"tiny:{arch}")), load_artifact(out)
    result = compare_artifacts(src, dst, dst.model_path, "fp32")
    assert max(result.max_abs.values()) < 1e-4
    manifest = dst.manifest
    assert manifest["precision"] == "fp32" and manifest["device"] == "cpu"
    assert manifest["io"] == src.manifest["io"] and manifest["kv_mode"] == src.manifest["kv_mode"]
    assert {p["name"] for p in manifest["passes"]} >= {"constant-folding", "common-subexpressions", "dead-nodes"}
    assert all(set(p) == {"name", "count"} for p in manifest["passes"])
    assert ("GroupQueryAttention" in report.ops) == bool(manifest["constraints"])


@pytest.mark.parametrize("precision,bits,block_size", [("int8", 8, 16), ("int4", 4, 32)])
def test_llama_quantized(precision: str, bits: int, block_size: int, optimized) -> None:  # type: ignore[no-untyped-def]
    """The CPU defaults: the shared-buffer contract, q|k|v and gate|up fused (4 projections a
    layer; q|k|v read packed by GroupQueryAttention), the tied lm head quantized to 8 bits in
    blocks of 32 through its own copy; the --check tolerance holds."""
    import onnx

    from passes.precision import lm_head_nodes

    out, report = optimized("llama", precision)
    assert report.ops.get("MatMulNBits", 0) == 9  # (q|k|v, o, gate|up, down) × 2 layers + the lm head
    assert "MatMulInteger" not in report.ops and "DynamicQuantizeLinear" not in report.ops
    q = load_artifact(out).manifest["quantization"]
    assert q["converted_nodes"] == 9 and q["kept"] == []  # nothing left fp32: the head is quantized
    assert q["settings"]["lm_head"] == "quantized, 8-bit blocks of 32 (tied: its own transposed copy)"
    assert q["settings"]["fused_projection_groups"] == 4
    assert q["method"].endswith("MatMulNBitsQuantizer")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    (name,) = lm_head_nodes(model)
    head = next(n for n in model.graph.node if n.name == name)
    assert head.op_type == "MatMulNBits"
    assert {a.name: a.i for a in head.attribute if a.name in ("bits", "block_size")} == {"bits": 8, "block_size": 32}
    assert load_artifact(out).manifest["kv_mode"] == "shared-buffer"
    assert sum(n.op_type == "Split" for n in model.graph.node) == 2  # gate|up; q|k|v are GQA's packed input
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and len({n.input[5] for n in gqa}) == 1  # one seqlens_k for every layer
    assert {"name": "gqa-shared-lengths", "count": 1} in load_artifact(out).manifest["passes"]
    assert {k: q["settings"][k] for k in ("bits", "block_size", "symmetric", "accuracy_level", "base")} == {
        "bits": bits, "block_size": block_size, "symmetric": True, "accuracy_level": 4, "base": "fp32"}
    assert "per row" in q["settings"]["activations"]  # the record says how activations are quantized
    assert report.check["ok"] and 0 < max(report.check["max_abs_diff"].values())


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cpu_quantized_defaults_pass_verify(precision: str, optimized) -> None:  # type: ignore[no-untyped-def]
    """The CPU int8 / int4 defaults (quantized head, fused projections) pass their parity policy
    on the smoke prompts against the PyTorch fp32 reference (tiny:llama)."""
    from parity.prompts import smoke_prompts_path
    from parity.verify import verify_artifact

    out, _ = optimized("llama", precision)
    result = verify_artifact(out, smoke_prompts_path(), max_new_tokens=16, progress=False)
    assert result.precision == precision
    assert result.verdict.passed, result.verdict.reasons
    assert result.verdict.summary.drift == 0


def test_int4_block_128_and_the_head_flag(artifact_cache, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--block-size 128 reaches every projection's MatMulNBits (the CPU head keeps its own 8-bit
    blocks of 32); --no-quantize-lm-head keeps the tied head fp32, and the manifest says so."""
    import onnx

    out = tmp_path / "q"
    assert _cli("-q", "optimize", str(artifact_cache("tiny:llama")), "-o", str(out), "--precision", "int4",
                "--block-size", "128") == 0  # (no --check: a tiny random model's logits are flat)
    settings = load_artifact(out).manifest["quantization"]["settings"]
    assert settings["block_size"] == 128 and settings["lm_head"].startswith("quantized, 8-bit blocks of 32 (tied")
    nodes = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert len(nodes) == 9
    sizes = sorted(a.i for n in nodes for a in n.attribute if a.name == "block_size")
    assert sizes == [32] + [128] * 8
    kept = tmp_path / "kept"
    assert _cli("-q", "optimize", str(artifact_cache("tiny:llama")), "-o", str(kept), "--precision", "int4",
                "--no-quantize-lm-head") == 0
    q = load_artifact(kept).manifest["quantization"]
    assert q["settings"]["lm_head"] == "kept in the base precision (FusedMatMul)" and len(q["kept"]) == 1
    assert q["converted_nodes"] == 8


def test_int8_cpu_rows_are_batch_independent(optimized) -> None:  # type: ignore[no-untyped-def]
    """Every MatMulNBits of the int8 CPU graph gives a row the same bits alone as in a batch of
    eight (activation scales per row and block, unlike quantize_dynamic's one scale per tensor)."""
    import onnx
    import onnxruntime as ort

    out, _ = optimized("llama", "int8")
    model = onnx.load(str(out / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    graph = onnx.helper.make_graph(
        [node], "one", [onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, ["m", attrs["K"]])],
        [onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, ["m", attrs["N"]])],
        [t for t in model.graph.initializer if t.name in node.input[1:]])
    single = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    session = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(0).standard_normal((8, attrs["K"])).astype(np.float32)
    rows[1:, 0] *= 100.0  # outliers in the other rows must not move row 0
    batched = session.run(None, {node.input[0]: rows})[0]
    alone = session.run(None, {node.input[0]: rows[:1]})[0]
    assert np.array_equal(batched[:1], alone)


def test_int8_dynamic_is_still_available(artifact_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The former CPU int8 (quantize_dynamic) stays buildable for comparisons, and says so."""
    from passes.precision import quantize_file

    src = load_artifact(artifact_cache("tiny:llama"))
    q = quantize_file(src.model_path, tmp_path / "model.onnx", "int8", "cpu", int8_cpu_method="dynamic")
    assert q is not None and q.method.endswith("quantize_dynamic") and q.converted_nodes == 14
    with pytest.raises(ValueError, match="int8_cpu_method"):
        quantize_file(src.model_path, tmp_path / "other.onnx", "int8", "cpu", int8_cpu_method="static")


def test_left_padding_is_exact_under_gqa(optimized, artifact_cache) -> None:  # type: ignore[no-untyped-def]
    """Row 1 of the check batch is left-padded; its real positions must match the unfused graph."""
    out, report = optimized("llama")
    assert report.check["argmax_agreement"]["prefill"] == 1.0
    assert report.check["max_abs_diff"]["prefill"] < 1e-4


# ------------------------------------------------------------------------------------------------
# Refusals


def _cli(*args: str) -> int:
    from lmforge.cli import main

    return main(list(args))


def test_not_an_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    assert _cli("optimize", str(tmp_path / "src"), "-o", str(tmp_path / "out")) == 2
    assert "not an lmforge artifact" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--precision", "int3"], "unknown precision"),
    (["--device", "tpu"], "unknown device"),
    (["--precision", "fp16"], "--force"),
    (["--precision", "int4", "--block-size", "48"], "block size 48"),
    (["--precision", "fp32", "--block-size", "32"], "block size 32 for precision fp32"),
])
def test_bad_requests(flags: list[str], message: str, tmp_path: Path, artifact_cache, capsys) -> None:  # type: ignore[no-untyped-def]
    src = artifact_cache("tiny:llama")
    assert _cli("optimize", str(src), "-o", str(tmp_path / "out"), *flags) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_already_optimized(optimized, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out, _ = optimized("llama")
    assert _cli("optimize", str(out), "-o", str(tmp_path / "again")) == 2
    err = capsys.readouterr().err
    assert "already optimized" in err and "tiny:llama" in err
    assert not (tmp_path / "again").exists()


def test_check_failure_writes_nothing(artifact_cache, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import passes.check as check

    monkeypatch.setitem(check.TOLERANCES, "int4", check.Tolerance(max_abs=1e-9, min_argmax_agreement=1.0))
    with pytest.raises(PassError, match="drifts"):
        optimize_artifact(artifact_cache("tiny:llama"), tmp_path / "out", "cpu", "int4", check=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_io_change_is_refused(artifact_cache, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A pass that renames a graph output is a bug the pipeline refuses (nothing written)."""
    import passes.pipeline as pipeline
    from passes.graph_passes import GraphPass

    def rename(model, ctx) -> int:  # type: ignore[no-untyped-def]
        model.graph.outputs[0].name = "logits_renamed"
        return 1

    monkeypatch.setattr(pipeline, "final_passes", lambda: [GraphPass("evil", "cleanup", rename)])
    with pytest.raises(PassError, match="changed the graph's IO"):
        optimize_artifact(artifact_cache("tiny:llama"), tmp_path / "out", "cpu", "fp32", fuse=False, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_report(artifact_cache, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _cli("optimize", str(artifact_cache("tiny:gpt2")), "-o", str(tmp_path / "o"), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expected"]["FastGelu"] == 2 and report["missing"] == {}


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_fp16_cpu_with_query_key_norms_runs_and_checks(arch: str, artifact_cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The GQA rule re-applies q/k norms on [B, S, H, Dh]; the fp16 pass keeps norms in fp32 on the
    CPU and must cast their outputs back before the fp16 RotaryEmbedding. Untyped rewritten values
    hid that from it, and onnxruntime refused the graph (T bound to float and float16)."""
    report = optimize_artifact(artifact_cache(f"tiny:{arch}"), tmp_path / arch, "cpu", "fp16", check=True,
                               force=True, progress=False)
    assert report.ops.get("GroupQueryAttention") == 2
    assert report.check is not None and report.check["ok"]
