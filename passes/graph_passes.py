"""The ordered graph passes of ``optimize``: cleanup and fusions on an ``onnx_ir`` model.

Each :class:`GraphPass` rewrites the model in place and returns how many rewrites it made. Fusion
passes are onnxscript rule sets (``onnxscript.rewriter.ort_fusions``, plus lmforge's own rules
where those miss our exports: :mod:`passes.rule_fast_gelu`, :mod:`passes.rule_rotary_cache`,
:mod:`passes.rule_gqa`, :mod:`passes.rule_bloom_attention`); a fusion that fires zero times is
re-run with onnxscript's ``MatchingTracer`` so the report can say how far each rule got and why it
stopped.

The order follows onnxscript's ``fuse_xformers`` (norms, rotary, SDPA, then attention ops, then
GELU), with lmforge's rules slotted in next to the onnxscript rule they stand in for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer
from onnxscript.rewriter import _DEFAULT_REWRITE_RULES, pattern
from onnxscript.rewriter._basics import MatchingTracer
from onnxscript.rewriter.ort_fusions import (
    attention,
    bias_gelu,
    cos_sin_cache,
    erfgelu,
    fused_matmul_rule_sets,
    gelu,
    mha_bias,
    mha_scale,
    rms_normalization,
    rotary_embedding,
    sdpa,
    sdpa_via_mha,
    shape_optimization,
    skip_normalization,
)
from onnxscript.rewriter.rules.common import _gemm_to_matmul_add

from passes.gqa_shared_lengths import share_gqa_lengths
from passes.rule_bloom_attention import bloom_attention_rules
from passes.rule_fast_gelu import fast_gelu_rules
from passes.rule_gemm_matmul import gemm_matmul_rules
from passes.rule_gqa import gqa_rules
from passes.rule_mha_rotary import mha_rules
from passes.rule_rotary_cache import rotary_cache_rules

__all__ = ["GraphPass", "PassContext", "cleanup_passes", "fusion_passes", "final_passes", "node_count"]


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What passes may need to know beyond the graph."""

    max_positions: int  # rows of the rotary cos/sin cache (the artifact's max_context)
    debug: bool = True  # trace match failures of fusions that fire zero times


@dataclasses.dataclass
class GraphPass:
    """One named step; ``run`` returns its rewrite count. ``produces``: contrib ops it creates."""

    name: str
    kind: str  # "cleanup" | "fusion"
    run: Callable[[ir.Model, PassContext], int]
    produces: tuple[str, ...] = ()
    why_not: list[str] = dataclasses.field(default_factory=list)  # tracer lines when count == 0


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def _delta(fn: Callable[[ir.Model], object]) -> Callable[[ir.Model, PassContext], int]:
    """A cleanup pass counted as the number of nodes it removed."""

    def run(model: ir.Model, ctx: PassContext) -> int:
        before = node_count(model)
        fn(model)
        return max(0, before - node_count(model))

    return run


def _fold(model: ir.Model) -> None:
    optimizer.fold_constants(model)
    common_passes.RemoveUnusedNodesPass()(model)


def _shapes(model: ir.Model) -> None:
    common_passes.ShapeInferencePass()(model)


def _dead(model: ir.Model) -> None:
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)


def _cse(model: ir.Model) -> None:
    common_passes.CommonSubexpressionEliminationPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)


def _rules_pass(name: str, kind: str, make: Callable[[PassContext], Sequence[pattern.RewriteRuleSet]],
                produces: tuple[str, ...] = (), shape_inference: bool = False) -> GraphPass:
    """A pass applying rule sets in order; on zero rewrites, record the tracer's best matches."""
    graph_pass = GraphPass(name=name, kind=kind, run=lambda m, c: 0, produces=produces)

    def run(model: ir.Model, ctx: PassContext) -> int:
        rule_sets = make(ctx)
        count = sum(rules.apply_to_model(model) for rules in rule_sets)
        if shape_inference and count:
            common_passes.ShapeInferencePass()(model)
        graph_pass.why_not.clear()
        if count == 0 and ctx.debug and kind == "fusion":
            graph_pass.why_not.extend(_trace(model, rule_sets))
        return count

    graph_pass.run = run
    return graph_pass


def _trace(model: ir.Model, rule_sets: Sequence[pattern.RewriteRuleSet]) -> list[str]:
    """One line per rule: how many pattern nodes its best partial match covered, and why it failed."""
    lines: list[str] = []
    for rules in rule_sets:
        tracer = MatchingTracer()
        rules.apply_to_model(model, tracer=tracer)
        seen: set[str] = set()
        for rule, matches in tracer.best_matches_map.items():
            if not matches or str(rule.name) in seen:
                continue
            seen.add(str(rule.name))
            best = matches[0]
            result = best.match_result
            reason = (result.reason or "pattern did not match").strip().splitlines()[0]
            lines.append(f"{rule.name}: best match {len(result.nodes)} node(s) from {best.root_node.op_type}; {reason}")
        if not tracer.best_matches_map:
            names = dict.fromkeys(str(r.name) for r in rules.rules)
            lines.append(f"{', '.join(names)}: no node matched even the root of the pattern")
    return lines


def _onnxscript(rule_set: pattern.RewriteRuleSet) -> Callable[[PassContext], Sequence[pattern.RewriteRuleSet]]:
    return lambda ctx: [rule_set]


def cleanup_passes() -> list[GraphPass]:
    """Before fusing: fold constants, simplify shape arithmetic, share equal subexpressions, drop dead nodes."""
    return [
        GraphPass("shape-inference", "cleanup", _delta(_shapes)),
        GraphPass("constant-folding", "cleanup", _delta(_fold)),
        _rules_pass("shape-simplification", "cleanup", lambda ctx: [
            shape_optimization.rules, pattern.RewriteRuleSet(list(_DEFAULT_REWRITE_RULES))]),
        GraphPass("constant-folding-2", "cleanup", _delta(_fold)),
        GraphPass("common-subexpressions", "cleanup", _delta(_cse)),
        GraphPass("dead-nodes", "cleanup", _delta(_dead)),
    ]


def fusion_passes() -> list[GraphPass]:
    """The fusions, in dependency order (later rules match the ops earlier ones create)."""
    return [
        # onnxscript's optimize_for_ort does this first too: its attention rules expect MatMul + Add
        # projections, and leaving the 2-D Gemm of GPT-2's Conv1D lets the MHA rewrite feed it 3-D.
        _rules_pass("gemm-to-matmul-add", "fusion",
                    lambda ctx: [pattern.RewriteRuleSet([_gemm_to_matmul_add.gemm_to_matmul_add_rule]),
                                 gemm_matmul_rules()]),
        _rules_pass("erf-gelu", "fusion", _onnxscript(erfgelu.rules), ("Gelu",)),
        _rules_pass("rms-norm", "fusion", _onnxscript(rms_normalization.rms_normalization_ruleset),
                    ("SimplifiedLayerNormalization",)),
        _rules_pass("skip-layer-norm", "fusion", _onnxscript(skip_normalization.skip_layer_normalization_ruleset),
                    ("SkipLayerNormalization",)),
        _rules_pass("skip-rms-norm", "fusion", _onnxscript(skip_normalization.skip_rms_normalization_ruleset),
                    ("SkipSimplifiedLayerNormalization",)),
        _rules_pass("rotary-embedding", "fusion", _onnxscript(rotary_embedding.rotary_embedding_rules)),
        _rules_pass("rotary-cos-sin-cache", "fusion",
                    lambda ctx: [cos_sin_cache.cos_sin_cache_rules, rotary_cache_rules(ctx.max_positions)],
                    ("RotaryEmbedding",)),
        # partial rotary (Phi-3/4-mini, StableLM, GPT-NeoX): Concat(RotaryEmbedding(x[..., :d]), x[..., d:])
        # becomes one RotaryEmbedding with rotary_embedding_dim = d. Its rule matches the contrib op the
        # cos/sin-cache pass emits, so it runs after it, as in onnxscript's fuse_xformers.
        _rules_pass("partial-rotary-embedding", "fusion", _onnxscript(rotary_embedding.partial_embedding_rules)),
        GraphPass("common-subexpressions-2", "cleanup", _delta(_cse)),
        _rules_pass("sdpa", "fusion", _onnxscript(sdpa.sdpa_rules),
                    ("GroupQueryAttention", "MultiHeadAttention", "Attention"), shape_inference=True),
        _rules_pass("group-query-attention", "fusion", lambda ctx: [gqa_rules()], ("GroupQueryAttention",)),
        _rules_pass("multi-head-attention", "fusion", lambda ctx: mha_rules(), ("MultiHeadAttention",)),
        # BLOOM's 3-D ALiBi scores never reach an SDPA; the pass after it shares the per-layer bias.
        _rules_pass("bloom-attention", "fusion", lambda ctx: [bloom_attention_rules()], ("MultiHeadAttention",)),
        GraphPass("common-subexpressions-3", "cleanup", _delta(_cse)),
        _rules_pass("mha-scale", "fusion", _onnxscript(mha_scale._mha_scale_rules)),
        _rules_pass("mha-bias", "fusion", _onnxscript(mha_bias.mha_bias_rules)),
        _rules_pass("attention", "fusion", _onnxscript(attention.attention_rules), ("Attention",)),
        _rules_pass("gelu", "fusion", lambda ctx: [gelu.gelu_rules, fast_gelu_rules()], ("Gelu", "FastGelu")),
        _rules_pass("bias-gelu", "fusion", _onnxscript(bias_gelu.bias_gelu_rules), ("BiasGelu",)),
        _rules_pass("sdpa-via-mha", "fusion", _onnxscript(sdpa_via_mha._rules), ("MultiHeadAttention",)),
        _rules_pass("fused-matmul", "fusion",
                    lambda ctx: [fused_matmul_rule_sets.fused_matmul_rule_sets()], ("FusedMatMul",)),
    ]


def final_passes() -> list[GraphPass]:
    """After fusing: inline what no fusion consumed, fold, and drop dead nodes."""
    return [
        GraphPass("inline-and-fold", "cleanup", _delta(lambda m: optimizer.optimize(m))),
        GraphPass("gqa-shared-lengths", "cleanup", lambda m, c: share_gqa_lengths(m)),
        GraphPass("dead-nodes-2", "cleanup", _delta(_dead)),
    ]
