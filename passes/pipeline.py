"""``optimize``: an fp32 ``concat`` artifact → a fused, lower-precision artifact for a device.

:func:`optimize_artifact` runs an explicit, ordered list of passes (:mod:`passes.graph_passes`:
cleanup, then fusions, then a final cleanup) on the graph as an ``onnx_ir`` model, each returning
its rewrite count; checks that the graph's IO is what the manifest says (a pass that changed it
is a bug, and the pipeline refuses it); applies the precision pass (:mod:`passes.precision`);
optionally compares the result with the input on fixed inputs (:mod:`passes.check`); and writes
a new artifact atomically with ``precision``, ``device``, ``passes`` (``[{"name", "count"}]``),
``quantization`` and ``constraints`` in its manifest. Nothing is written on any failure.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from passes.check import CheckResult, compare_artifacts
from passes.expected import expected_fusions, not_fusable
from passes.graph_passes import (
    GraphPass,
    PassContext,
    _rules_pass,
    cleanup_passes,
    final_passes,
    fusion_passes,
    node_count,
)
from passes.precision import PRECISIONS, Quantized, quantize_file
from passes.rule_gqa import GQA_CONSTRAINT
from passes.shared_buffer import SharedBuffer, compare_shared, share_kv_buffers, shared_buffer_blockers
from runtime import step_graph
from runtime.artifact import MANIFEST_NAME, MODEL_NAME, Artifact, KvMode, check_output, load_artifact, write_artifact
from runtime.errors import PassError
from runtime.sampler_graph import candidate_segments, write_sampler

__all__ = ["DEVICES", "PRECISIONS", "OptimizeReport", "optimize_artifact", "graph_io", "op_counts"]

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
_DATA_NAME = MODEL_NAME + ".data"


@dataclasses.dataclass
class OptimizeReport:
    """What ``optimize`` did: per-pass counts, fused op counts, misses with reasons, the check."""

    architecture: str
    precision: str
    device: str
    passes: list[dict[str, Any]]
    ops: dict[str, int]  # contrib / fused op counts in the final graph
    expected: dict[str, int]  # expected fusion → count in the final graph
    missing: dict[str, list[str]]  # expected fusion that fired zero times → why
    quantization: dict[str, Any] | None
    constraints: list[str]
    check: dict[str, Any] | None
    nodes_before: int
    nodes_after: int
    seconds: float
    output: str | None = None
    not_fusable: dict[str, str] = dataclasses.field(default_factory=dict)  # op → why it cannot fire here

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def render(self) -> str:
        lines = [f"optimize {self.architecture} → {self.precision} for {self.device}: "
                 f"{self.nodes_before} → {self.nodes_after} nodes in {self.seconds:.1f} s"]
        lines.append("  passes:")
        for p in self.passes:
            lines.append(f"    {p['name']:<26} {p['count']:>5}")
        lines.append("  expected fusions:")
        for op, n in self.expected.items():
            absorbed = [f"{self.ops[o]}× as {o}" for o in _SUBSUMED_BY.get(op, ()) if self.ops.get(o)]
            note = "" if n else (f"   (all absorbed: {', '.join(absorbed)})" if absorbed else "   ✗ not fused")
            lines.append(f"    {op:<34} {n:>5}{note}")
        for op, reasons in self.missing.items():
            lines.append(f"  why no {op}:")
            lines.extend(f"    - {r}" for r in (reasons or ["no rule got a partial match"]))
        for op, reason in self.not_fusable.items():
            lines.append(f"  cannot fuse {op}: {reason}")
        other = {k: v for k, v in self.ops.items() if k not in self.expected}
        if other:
            lines.append("  other fused ops: " + ", ".join(f"{k}×{v}" for k, v in sorted(other.items())))
        if self.quantization:
            q = self.quantization
            lines.append(f"  precision: {q['method']} {q['settings']} on {q['converted_nodes']} nodes; "
                         f"kept higher precision: {q['kept'] or 'nothing'}")
        for c in self.constraints:
            lines.append(f"  constraint: {c}")
        if self.check:
            lines.append(f"  check: max|Δ| {self.check['max_abs_diff']}, arg-max agreement "
                         f"{self.check['argmax_agreement']} → {'ok' if self.check['ok'] else 'FAILED'}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def graph_io(model: ir.Model) -> dict[str, list[tuple[str, str, int]]]:
    """Names, element types and ranks of the graph's inputs and outputs."""

    def describe(values: Any) -> list[tuple[str, str, int]]:
        out = []
        for v in values:
            dtype = v.dtype.name.lower() if v.dtype is not None else "?"
            rank = v.shape.rank() if v.shape is not None else -1
            out.append((str(v.name), dtype, rank))
        return out

    return {"inputs": describe(model.graph.inputs), "outputs": describe(model.graph.outputs)}


def op_counts(model: ir.Model) -> dict[str, int]:
    """Counts of contrib ops and of ONNX ops a fusion may target, in the whole graph."""
    interesting = {"LayerNormalization", "SimplifiedLayerNormalization", "MatMulNBits", "MatMulInteger",
                   "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph.all_nodes():
        if node.domain == "com.microsoft" or node.op_type in interesting:
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))


_DTYPE_NAMES = {"float": "float32", "float16": "float16", "int64": "int64", "int32": "int32"}


def _check_io(stage: str, reference: dict[str, list[tuple[str, str, int]]], model: ir.Model) -> None:
    """Refuse a graph whose IO differs from ``reference`` (names, order, dtypes, ranks)."""
    got = graph_io(model)
    if got != reference:
        diff = []
        for side in ("inputs", "outputs"):
            ref, now = reference[side], got[side]
            for a in ref:
                if a not in now:
                    diff.append(f"{side[:-1]} {a[0]} ({a[1]}, rank {a[2]}) changed or removed")
            for b in now:
                if b not in ref:
                    diff.append(f"{side[:-1]} {b[0]} ({b[1]}, rank {b[2]}) appeared")
            if not diff and ref != now:
                diff.append(f"{side} reordered")
        raise PassError(
            f"{stage} changed the graph's IO, which the manifest does not declare: " + "; ".join(diff[:4]),
            expected="the IO contract of the input artifact",
            fix="this is a bug in an lmforge pass; re-run with --no-fuse and report it",
        )


def _check_manifest_io(art: Artifact, reference: dict[str, list[tuple[str, str, int]]]) -> None:
    """The input graph must match its manifest's ``io`` before we start (else it was edited)."""
    for side, specs in (("inputs", art.inputs), ("outputs", art.outputs)):
        names = [s.name for s in specs]
        graph_names = [n for n, _, _ in reference[side]]
        if names != graph_names:
            raise PassError(
                f"artifact {art.path}: the graph's {side} differ from the manifest's io",
                expected=", ".join(names[:4]) + ("…" if len(names) > 4 else ""),
                got=", ".join(graph_names[:4]) + ("…" if len(graph_names) > 4 else ""),
                fix="re-export the artifact with `lmforge convert`",
            )


BLOCK_SIZES = (16, 32, 64, 128)


def _validate_request(art: Artifact, device: str, precision: str, force: bool, block_size: int | None = None) -> None:
    if device not in DEVICES:
        raise PassError(f"unknown device {device!r}", expected=" or ".join(DEVICES),
                        fix="pass --device cpu or --device cuda")
    if precision not in PRECISIONS:
        raise PassError(f"unknown precision {precision!r}", expected=", ".join(PRECISIONS),
                        fix="pass --precision fp32, fp16, int8 or int4")
    if art.manifest.get("passes") or art.precision != "fp32" or art.manifest.get("optimize"):
        raise PassError(
            f"artifact {art.path} is already optimized (precision {art.precision}, "
            f"{len(art.manifest.get('passes') or [])} passes applied)",
            expected="an fp32 artifact written by `lmforge convert`",
            fix=f"optimize the original conversion of {art.manifest['source'].get('ref')} instead "
                "(run `lmforge convert` again if you no longer have it)",
        )
    if art.kv_mode not in (KvMode.CONCAT, KvMode.NONE):
        raise PassError(f"artifact {art.path} has kv_mode {art.kv_mode.value}", expected="concat or none",
                        fix="optimize the artifact `lmforge convert` wrote")
    if device == "cpu" and precision == "fp16" and not force:
        raise PassError(
            "fp16 on CPU: onnxruntime's CPU provider has few fp16 kernels, so an fp16 graph runs "
            "slower than fp32 there (casts around most ops)",
            fix="use --precision int8 or int4 for CPU, --device cuda for fp16, or pass --force to build it anyway",
        )
    if block_size is not None and (precision not in ("int8", "int4") or block_size not in BLOCK_SIZES):
        raise PassError(f"block size {block_size} for precision {precision}",
                        expected=f"one of {', '.join(map(str, BLOCK_SIZES))}, with --precision int8 or int4",
                        fix="leave out --block-size for the default, or pick a listed size")
    if device == "cuda" and precision == "int8":
        log.info("int8 for CUDA: weight-only 8-bit MatMulNBits (no dynamic activation quantization)")


def _run_passes(model: ir.Model, passes: list[GraphPass], ctx: PassContext, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    records = []
    bar = tqdm(passes, unit="pass", disable=not progress, file=sys.stderr,
               bar_format="{desc:<34} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]")
    for graph_pass in bar:
        bar.set_description_str(graph_pass.name)
        started = time.perf_counter()
        count = graph_pass.run(model, ctx)
        log.debug("%s: %d in %.2f s", graph_pass.name, count, time.perf_counter() - started)
        records.append({"name": graph_pass.name, "count": int(count), "kind": graph_pass.kind})
    bar.close()
    return records


# An expected op that a later fusion absorbed is not a miss: a LayerNormalization every one of which
# became a SkipLayerNormalization, a Gelu that became a BiasGelu.
_SUBSUMED_BY = {
    "LayerNormalization": ("SkipLayerNormalization",),
    "SimplifiedLayerNormalization": ("SkipSimplifiedLayerNormalization",),
    "Gelu": ("BiasGelu",),
    "FastGelu": ("BiasGelu",),
}


def _missing_reasons(expected: dict[str, int], ops: dict[str, int], passes: list[GraphPass],
                     records: list[dict[str, Any]]) -> dict[str, list[str]]:
    counts = {r["name"]: r["count"] for r in records}
    missing: dict[str, list[str]] = {}
    for op, n in expected.items():
        if n or any(ops.get(o, 0) for o in _SUBSUMED_BY.get(op, ())):
            continue
        reasons: list[str] = []
        producers = [p for p in passes if op in p.produces]
        for p in producers:
            if counts.get(p.name, 0) == 0:
                reasons.extend(f"[{p.name}] {line}" for line in p.why_not)
            else:
                reasons.append(f"[{p.name}] fired {counts[p.name]}× but a later pass consumed or replaced its output")
        if not producers:
            reasons.append("no pass in the pipeline produces this op")
        missing[op] = reasons
    return missing


def optimize_artifact(
    src: str | Path,
    out: str | Path,
    device: str,
    precision: str,
    fuse: bool = True,
    check: bool = False,
    force: bool = False,
    progress: bool | None = None,
    kv_mode: str | None = None,
    quantize_lm_head: bool | None = None,
    block_size: int | None = None,
) -> OptimizeReport:
    """Optimize the artifact at ``src`` into a new artifact at ``out``; return the report.

    ``kv_mode``: ``None`` picks ``shared-buffer`` (:mod:`passes.shared_buffer`) for
    ``device="cuda"``, and for int8 and int4 on the CPU, when every attention fused to
    GroupQueryAttention, else keeps ``concat``;
    ``"shared-buffer"`` asks for it on any device (refused with :class:`PassError` when the
    graph cannot take it); ``"concat"`` keeps the input's contract.

    ``quantize_lm_head`` (int8/int4): quantize the lm head too (a tied head gets its own copy,
    :mod:`passes.lm_head`); ``None`` quantizes it on the CPU (8-bit, :data:`passes.precision.CPU_HEAD_BITS`:
    its fp32 GEMV was the largest single cost of a CPU decode step) and keeps it in the base
    precision on CUDA. On the CPU, and for fp16 on CUDA, projections that share an input (q/k/v,
    gate/up) are fused first (:mod:`passes.fuse_projections`); with ``shared-buffer`` the fused
    q|k|v becomes GroupQueryAttention's packed input, and on CUDA fp16 the SwiGLU gate over the
    fused gate|up is named so that lmforge's kernels can run it as one node. The measurements behind
    both: docs/benchmarks.md, "CPU: decode against the peers".
    ``block_size`` (int8/int4): the MatMulNBits block along K (16, 32, 64 or 128); ``None`` is the
    precision's default (16 for CPU int8, 32 otherwise).

    Raises :class:`PassError` / :class:`ArtifactError` (exit 2 on the command line); on any
    failure ``out`` is left as it was.
    """
    started = time.perf_counter()
    out = Path(out)
    art = load_artifact(src)
    _validate_request(art, device, precision, force, block_size)
    if out.resolve() == art.path.resolve():
        raise PassError("output and input are the same folder",
                        fix="write the optimized artifact to a new folder with -o")
    check_output(out, force)  # before the passes: -o must be writable, --force replaces only an artifact
    show = sys.stderr.isatty() if progress is None else progress
    arch = str(art.architecture.get("name"))

    model = ir.load(str(art.model_path))
    reference_io = graph_io(model)
    _check_manifest_io(art, reference_io)
    nodes_before = node_count(model)
    ctx = PassContext(max_positions=int(art.architecture.get("max_context") or 2048))
    passes = cleanup_passes() + (_encoder_passes() if fuse and not art.is_decoder else []) \
        + (fusion_passes() if fuse else []) + final_passes()
    records = _run_passes(model, passes, ctx, show)
    _check_io("the graph passes", reference_io, model)
    leftovers = sorted({n.domain for n in model.graph.all_nodes() if n.domain.startswith("ai.onnxruntime._fusion")})
    if leftovers:
        raise PassError(f"temporary fusion ops left in the graph ({leftovers})", fix="report this with --debug output")

    ops = op_counts(model)
    expected = {op: ops.get(op, 0) for op in expected_fusions(arch)} if fuse else {}
    missing = _missing_reasons(expected, ops, passes, records)
    constraints = [GQA_CONSTRAINT] if ops.get("GroupQueryAttention") else []
    shared = _want_shared_buffer(art, model, device, kv_mode, fuse, precision)

    quantized: Quantized | None = None
    check_result: CheckResult | None = None
    with tempfile.TemporaryDirectory(prefix="lmforge-optimize-", dir=out.resolve().parent) as work_dir:
        work = Path(work_dir)
        fused = work / MODEL_NAME
        ir.save(model, str(fused), external_data=fused.name + ".data")
        del model
        with write_artifact(out, force=force) as tmp:
            if precision == "fp32":
                shutil.move(str(fused), tmp / MODEL_NAME)
                shutil.move(str(work / (fused.name + ".data")), tmp / _DATA_NAME)
            else:
                head = quantize_lm_head if quantize_lm_head is not None else device == "cpu"
                quantized = quantize_file(fused, tmp / MODEL_NAME, precision, device,
                                          keep_lm_head=not head, block_size=block_size,
                                          fuse_projections=fuse and (device == "cpu" or precision == "fp16"))
                settings = quantized.settings if quantized is not None else {}
                for key, name in (("fused_projection_groups", "fused-projections"),
                                  ("named_silu_gates", "swiglu-gates-named")):
                    if settings.get(key):  # what the precision pass fused, in the fusion report too
                        records.append({"name": name, "count": int(settings[key]), "kind": "fusion"})
            sb: SharedBuffer | None = None
            io: dict[str, list[dict[str, Any]]] | None = None
            if shared:
                sb = share_kv_buffers(tmp / MODEL_NAME, art.architecture, art.manifest["kv"])
                records.append({"name": "shared-buffer-kv", "count": sb.layers, "kind": "kv"})
                records.append({"name": "rotary-into-gqa", "count": sb.rotary_folded, "kind": "fusion"})
                records.append({"name": "packed-qkv", "count": sb.qkv_packed, "kind": "fusion"})
                io = _append_step_model(tmp / MODEL_NAME, sb, int(art.architecture["vocab"]), device)
                records.append({"name": "step-model", "count": 1, "kind": "step"})
            final = ir.load(str(tmp / MODEL_NAME))
            _check_io(f"the {precision} conversion", _reference_io(io) if io else reference_io, final)
            ops = op_counts(final)
            nodes_after = node_count(final)
            del final

            for name in ("generation_config.json",):
                if (art.path / name).is_file():
                    shutil.copy2(art.path / name, tmp / name)
            if art.tokenizer_dir.is_dir():
                shutil.copytree(art.tokenizer_dir, tmp / "tokenizer")
            manifest = _manifest(art, device, precision, records, ops, quantized, constraints, fuse)
            manifest.pop("sampler", None)
            if sb is None and art.is_decoder:  # concat: the sampler for this graph's logits
                logits = next(t for t in manifest["io"]["outputs"] if t["name"] == "logits")
                manifest["sampler"] = write_sampler(tmp, logits["dtype"], int(art.architecture["vocab"]))
            if sb is not None:
                manifest["kv_mode"] = KvMode.SHARED_BUFFER.value
                manifest["io"] = io
                manifest["step"] = step_graph.manifest_entry()
                manifest["kv"] = {**manifest["kv"], "dtype": sb.kv_dtype,
                                  "max_context": int(art.architecture.get("max_context") or 2048)}
            with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=2)

            if check:
                candidate = Artifact(path=tmp, manifest=manifest)
                compare = compare_shared if sb is not None else compare_artifacts
                check_result = compare(art, candidate, tmp / MODEL_NAME, precision)
                if not check_result.ok:
                    raise PassError(
                        f"--check: the {precision} graph drifts from the input artifact past tolerance "
                        f"({check_result.describe()})",
                        expected=f"max|Δ| ≤ {check_result.tolerance.max_abs:g} and arg-max agreement ≥ "
                                 f"{check_result.tolerance.min_argmax_agreement:.0%}",
                        fix="try --no-fuse to isolate a fusion, or a higher precision; nothing was written",
                    )
                manifest["optimize"]["check"] = check_result.to_json()
                with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as fh:
                    json.dump(manifest, fh, indent=2)

    report = OptimizeReport(
        architecture=arch, precision=precision, device=device,
        passes=[{"name": r["name"], "count": r["count"]} for r in records],
        ops=ops, expected=expected, missing=missing,
        quantization=quantized.to_json() if quantized else None, constraints=constraints,
        check=check_result.to_json() if check_result else None,
        nodes_before=nodes_before, nodes_after=nodes_after,
        seconds=round(time.perf_counter() - started, 2), output=str(out),
        not_fusable=not_fusable(arch) if fuse else {},
    )
    log.info("optimized %s → %s in %.1f s", art.path, out, report.seconds)
    return report


def _encoder_passes() -> list[GraphPass]:
    """Encoder-only rewrites that let onnxscript's fusions match (:mod:`passes.rule_encoder`)."""
    from passes.rule_encoder import skip_layer_norm_no_bias_rules, two_bias_softmax_rules

    return [
        _rules_pass("encoder-two-bias-softmax", "fusion", lambda ctx: [two_bias_softmax_rules()]),
        _rules_pass("encoder-skip-layer-norm-no-bias", "fusion", lambda ctx: [skip_layer_norm_no_bias_rules()],
                    ("SkipLayerNormalization",)),
    ]


_KV_MODES = (None, KvMode.CONCAT.value, KvMode.SHARED_BUFFER.value)


def _append_step_model(path: Path, sb: SharedBuffer, vocab: int, device: str) -> dict[str, list[dict[str, Any]]]:
    """Write the step model (:mod:`runtime.step_graph`: decoder + on-device sampling + next inputs)
    into the shared-buffer graph at ``path``, in place; return the manifest's ``io`` for it.

    The nodes come from the runtime's own definition, so the graph the engine runs is byte for
    byte the one this artifact ships, hashes and verifies. On CUDA the top-k / top-p candidates
    are selected in parts of the row (:func:`runtime.sampler_graph.candidate_segments`: the same
    values; onnxruntime's CPU ``TopK`` is faster over the whole row). On the CPU a run of greedy
    rows without penalties takes an ``If`` branch holding the ``ArgMax`` alone (``branch``: the
    sampling's other nodes are skipped, not run on zero rows); CUDA steps are captured as graphs,
    which hold no control flow.
    """
    segments = candidate_segments(vocab) if device == "cuda" else 1
    path.write_bytes(step_graph.append_step(path.read_bytes(), vocab, segments=segments, branch=device != "cuda"))
    step = step_graph.step_io(vocab)
    io = sb.io_json()
    return {"inputs": io["inputs"] + step["inputs"], "outputs": io["outputs"] + step["outputs"]}


def _reference_io(io: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[str, str, int]]]:
    """A manifest ``io`` in the shape of :func:`graph_io` (onnx-ir's dtype names)."""
    names = {"float32": "float", "float16": "float16", "int64": "int64", "int32": "int32", "bool": "bool",
             "bfloat16": "bfloat16"}
    return {side: [(t["name"], names[t["dtype"]], len(t["shape"])) for t in io[side]] for side in ("inputs", "outputs")}


# The precisions that take the shared-buffer contract by default on the CPU: faster than concat at
# int8 and int4, at batch 1 and 8, with less memory (docs/benchmarks.md, "CPU: decode against the
# peers"). fp32 keeps concat there.
_CPU_SHARED_BUFFER = ("int8", "int4")


def _want_shared_buffer(art: Artifact, model: ir.Model, device: str, kv_mode: str | None, fuse: bool,
                        precision: str = "fp16") -> bool:
    """Whether to rewrite to ``shared-buffer`` (see :func:`optimize_artifact`); refuse a request it cannot meet."""
    if kv_mode not in _KV_MODES:
        raise PassError(f"unknown kv_mode {kv_mode!r}", expected="concat or shared-buffer",
                        fix="pass --kv-mode concat or --kv-mode shared-buffer (or leave it out)")
    if kv_mode == KvMode.CONCAT.value or art.kv_mode is not KvMode.CONCAT:
        if kv_mode == KvMode.SHARED_BUFFER.value:
            raise PassError(f"kv_mode shared-buffer for an artifact with kv_mode {art.kv_mode.value}",
                            expected="a decoder artifact (kv_mode concat)", fix="leave out --kv-mode")
        return False
    if kv_mode is None and device != "cuda" and precision not in _CPU_SHARED_BUFFER:
        return False
    blockers = shared_buffer_blockers(model, int(art.architecture["layers"])) if fuse else ["--no-fuse"]
    if not blockers and device == "cuda" and precision == "fp32":
        # onnxruntime's GroupQueryAttention has fp16/bf16 CUDA kernels only; with onnxruntime-gpu
        # 1.31.1 an fp32 shared-buffer graph on CUDA gives logits off by ~1
        # while the same graph on the CPU and the fp32 concat graph on CUDA agree to 1e-6.
        if kv_mode is None:
            log.info("kv_mode stays concat for fp32 on CUDA (GroupQueryAttention has no fp32 CUDA kernel)")
            return False
        raise PassError("kv_mode 'shared-buffer' for fp32 on CUDA: GroupQueryAttention has no fp32 CUDA kernel "
                        "(its fallback gives wrong logits)", expected="--precision fp16, int8 or int4 for CUDA",
                        fix="use --precision fp16, or --device cpu for an fp32 shared-buffer artifact")
    if not blockers:
        return True
    if kv_mode is None:
        log.info("kv_mode stays concat for %s: %s", art.architecture.get("name"), "; ".join(blockers))
        return False
    raise PassError(
        f"kv_mode 'shared-buffer' needs every attention fused to com.microsoft.GroupQueryAttention "
        f"({'; '.join(blockers)})",
        expected="the Llama family (llama, mistral, qwen2, smollm2), fused",
        fix="leave out --kv-mode (concat is kept for this architecture), or drop --no-fuse",
    )


def _manifest(art: Artifact, device: str, precision: str, records: list[dict[str, Any]], ops: dict[str, int],
              quantized: Quantized | None, constraints: list[str], fuse: bool) -> dict[str, Any]:
    import onnxruntime
    import onnxscript

    manifest = copy.deepcopy(art.manifest)
    manifest.pop("files", None)
    manifest.pop("created", None)
    manifest["precision"] = precision
    manifest["device"] = device
    manifest["passes"] = [{"name": r["name"], "count": r["count"]} for r in records]
    manifest["quantization"] = quantized.to_json() if quantized else None
    manifest["constraints"] = constraints
    manifest["optimize"] = {
        "from": {"path": str(art.path), "model_sha256": art.manifest["files"][MODEL_NAME]["sha256"]},
        "fused": fuse,
        "ops": ops,
    }
    tools = dict(manifest.get("tools") or {})
    tools.update({"onnxscript": onnxscript.__version__, "onnx_ir": ir.__version__,
                  "onnxruntime_optimize": onnxruntime.__version__})
    manifest["tools"] = tools
    return manifest
