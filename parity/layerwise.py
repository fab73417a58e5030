"""Layer-wise debugging of a failing artifact with Polygraphy (``lmforge verify --layerwise``).

When ``verify`` fails, this runs the candidate graph and an fp32 graph of the same source model on
the inputs of the first failing prompt, with every intermediate tensor marked as an output
(Polygraphy's ``ModifyOutputs(outputs=constants.MARK_ALL)`` and ``OnnxrtRunner``), compares them
with ``Comparator.compare_accuracy`` and per-output tolerances, and names the first op (in the
candidate's topological order) whose output exceeds its tolerance.

The inputs are one prefill over the prompt *and* the reference's tokens up to the failing step,
with an empty past: the last position's logits are then the ones the failing token was chosen
from, and every intermediate tensor of every earlier position is compared too.

Tensor names differ once passes have fused ops (a fused ``SkipSimplifiedLayerNormalization``
replaces a chain of ``Pow``/``ReduceMean``/``Mul`` outputs), so only tensors present in both graphs
are compared; the counts of tensors found in one graph only are reported. When that is not enough
to name an op – no intermediate tensor in common exceeds tolerance, or only a graph output does –
the inputs and the fp32 graph's tensors are written as Polygraphy JSON and the
``polygraphy debug reduce`` command that shrinks the failing graph is printed.

Tolerances (``atol``, ``rtol``, checked element-wise as ``|a - b| <= atol + rtol·|b|``): per
precision, the error an intermediate activation of that precision is expected to carry – fp32
``1e-4``/``1e-3`` (a different kernel order only), fp16 ``2e-2``/``2e-2``, int8 ``1e-1``/``5e-2``,
int4 ``3e-1``/``1e-1`` – and for ``logits`` the policy's logit tolerance (or its tie threshold
where the policy sets none), absolute.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.policy import Policy
from runtime.artifact import Artifact, KvMode, load_artifact
from runtime.errors import LmforgeError, ParityError

__all__ = [
    "DEFAULT_TOLERANCES",
    "OpDrift",
    "LayerwiseFinding",
    "resolve_against",
    "build_feeds",
    "layerwise_compare",
]

log = logging.getLogger(__name__)

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {  # precision → (atol, rtol) for intermediate tensors
    "fp32": (1e-4, 1e-3),
    "fp16": (2e-2, 2e-2),
    "int8": (1e-1, 5e-2),
    "int4": (3e-1, 1e-1),
}
_MAX_BYTES_IN_MEMORY = 1_800_000_000  # protobuf's 2 GB limit, with a margin
INPUTS_JSON = "layerwise_inputs.json"
GOLDEN_JSON = "layerwise_golden.json"


@dataclasses.dataclass(frozen=True)
class OpDrift:
    """The first op whose output exceeds its tolerance."""

    index: int  # position in the candidate's topological order
    node: str
    op_type: str
    scope: str | None  # the PyTorch module the op came from (exporter metadata), when recorded
    output: str
    max_absdiff: float
    max_reldiff: float
    atol: float
    rtol: float

    def describe(self) -> str:
        where = f" in {self.scope}" if self.scope else ""
        return (
            f"first op over tolerance (topological order): {self.node} ({self.op_type}){where}\n"
            f"  output {self.output}: max |diff| {self.max_absdiff:.3g}, max rel diff {self.max_reldiff:.3g} "
            f"(atol {self.atol:g}, rtol {self.rtol:g})"
        )


@dataclasses.dataclass(frozen=True)
class LayerwiseFinding:
    """The result of one layer-wise comparison; ``describe()`` is what the CLI prints."""

    candidate: Path
    against: Path
    label: str
    tokens: int
    compared: int
    only_candidate: int
    only_against: int
    exceeded: int
    first: OpDrift | None
    logits_max_absdiff: float | None
    reduce_command: str | None
    data_dir: Path | None

    def describe(self) -> str:
        lines = [
            f"layer-wise comparison (Polygraphy, {self.label}, {self.tokens} tokens): "
            f"{self.candidate} against fp32 {self.against}",
            f"compared {self.compared} tensors present in both graphs ({self.only_candidate} only in the candidate, "
            f"{self.only_against} only in the fp32 graph); {self.exceeded} exceed tolerance",
        ]
        if self.first is not None:
            lines.append(self.first.describe())
        else:
            lines.append("no tensor present in both graphs exceeds tolerance")
        if self.logits_max_absdiff is not None:
            lines.append(f"logits at the compared positions: max |diff| {self.logits_max_absdiff:.3g}")
        if self.reduce_command:
            lines.append("to shrink the failing graph further (inputs and fp32 tensors saved in "
                         f"{self.data_dir}; needs `pip install onnx-graphsurgeon`):")
            lines.append(f"  {self.reduce_command}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("candidate", "against", "data_dir"):
            data[key] = None if data[key] is None else str(data[key])
        return data


def _finite(value: Any) -> float:
    value = float(value)
    return value if np.isfinite(value) else float("inf")


def resolve_against(artifact_dir: str | os.PathLike[str], against: str | os.PathLike[str] | None) -> Path:
    """The fp32 artifact to compare with: ``against``, else the input artifact the manifest
    records; checked to be an fp32 concat-KV artifact of the same source. Raises ParityError."""
    from parity.verify import recorded_input_artifact

    candidate = load_artifact(artifact_dir, verify_hashes=False)
    if against is None:
        recorded = recorded_input_artifact(candidate.manifest)
        if recorded is None:
            raise ParityError(
                "--layerwise needs an fp32 artifact of the same source model to compare against, and the "
                "manifest records none",
                fix="pass --layerwise-against PATH (the folder `lmforge convert` wrote for this model)",
            )
        against = recorded
    try:
        reference = load_artifact(against)
    except LmforgeError as exc:
        raise ParityError(f"--layerwise-against {against} cannot be used ({exc.what})",
                          fix="pass --layerwise-against PATH to an fp32 artifact of the same source") from exc
    if reference.path.resolve() == candidate.path.resolve():
        raise ParityError(
            "--layerwise-against is the artifact being verified",
            fix="pass the fp32 artifact of the same source (for an fp32 artifact: a fresh `lmforge convert`)",
        )
    if reference.precision != "fp32" or reference.kv_mode is not KvMode.CONCAT:
        raise ParityError(f"--layerwise-against {reference.path} is not an fp32 artifact with kv_mode concat",
                          got=f"{reference.precision}, {reference.kv_mode.value}",
                          fix="pass the artifact `lmforge convert` wrote")
    ours = (candidate.manifest.get("source") or {}).get("sha256")
    theirs = (reference.manifest.get("source") or {}).get("sha256")
    if not ours or ours != theirs:
        raise ParityError(f"--layerwise-against {reference.path} was exported from another source model",
                          expected=f"source sha256 {str(ours)[:16]}…", got=f"{str(theirs)[:16]}…",
                          fix="pass an fp32 artifact of the same source model")
    return reference.path


def build_feeds(artifact: Artifact, input_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """One prefill over ``input_ids`` with an empty past, in the artifact's IO contract
    (:meth:`runtime.decoder_io.DecoderIO.prompt_feeds`: a shared-buffer artifact runs its whole
    step model, the graph that serves, with KV buffers of the prompt's length)."""
    from runtime.decoder_io import DecoderIO

    return DecoderIO.from_artifact(artifact).prompt_feeds(input_ids)


def _run_all_outputs(
    artifact: Artifact, feeds: Mapping[str, np.ndarray], device: str, scratch: Path
) -> dict[str, np.ndarray]:
    """Every intermediate tensor of one run (Polygraphy: ModifyOutputs(MARK_ALL) + OnnxrtRunner)."""
    from polygraphy import constants
    from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath, SaveOnnx
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    model = ModifyOutputs(OnnxFromPath(str(artifact.model_path), external_data_dir=str(artifact.path)),
                          outputs=constants.MARK_ALL)
    size = sum(p.stat().st_size for p in artifact.path.glob("model.onnx*"))
    if size > _MAX_BYTES_IN_MEMORY:  # too big to serialize to bytes: save with external data
        path = scratch / f"{artifact.path.name}-marked.onnx"
        loader: Any = SaveOnnx(model, str(path), external_data_path=path.name + ".data")
        session = SessionFromOnnx(lambda: (loader(), str(path))[1], providers=providers)
    else:
        session = SessionFromOnnx(BytesFromOnnx(model), providers=providers)
    runner = OnnxrtRunner(session, name=str(artifact.path))
    try:
        with runner:
            outputs = runner.infer(dict(feeds))
    finally:
        if size > _MAX_BYTES_IN_MEMORY:  # the session holds its own copy; the marked model is scratch
            for leftover in (path, path.with_name(path.name + ".data")):
                leftover.unlink(missing_ok=True)
    return {name: np.asarray(value) for name, value in outputs.items()}


def _scope(node: Any) -> str | None:
    """The PyTorch module an op was exported from, from the exporter's ``namespace`` metadata
    (``a: cls/model.layers.1.mlp: cls/model.layers.1.mlp.down_proj: cls/linear_13: aten.linear``)."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            segments = [s.split(":", 1)[0].strip() for s in prop.value.split("/")]
            modules = [s for s in segments[:-1] if s]
            return modules[-1] if modules else None
    return None


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == np.float16 else array


def layerwise_compare(
    candidate_dir: str | os.PathLike[str],
    against_dir: str | os.PathLike[str],
    input_ids: Sequence[int],
    *,
    device: str = "cpu",
    precision: str | None = None,
    policy: Policy | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    label: str = "",
) -> LayerwiseFinding:
    """Compare every tensor the two graphs share on one prefill of ``input_ids``; see the module
    docstring. ``precision`` (default: the candidate's) picks the default tolerances."""
    import onnx
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    candidate = load_artifact(candidate_dir, verify_hashes=False)
    against = load_artifact(against_dir, verify_hashes=False)
    precision = precision or candidate.precision
    default_atol, default_rtol = DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp16"])
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    logits_atol = atol
    if policy is not None:
        logits_atol = policy.max_logit_diff if policy.max_logit_diff is not None else policy.tie_threshold
    if not input_ids:
        raise ParityError("layer-wise comparison needs at least one input token")

    scratch = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="lmforge-layerwise-"))
    scratch.mkdir(parents=True, exist_ok=True)
    cand_feeds = build_feeds(candidate, input_ids)
    log.info(
        "layer-wise: running %s and %s with all tensors marked (%d tokens)",
        candidate.path,
        against.path,
        len(input_ids),
    )
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        cand_out = _run_all_outputs(candidate, cand_feeds, device, scratch)
        ref_out = _run_all_outputs(against, build_feeds(against, input_ids), device, scratch)

    common = [name for name in cand_out if name in ref_out]
    cand_dtypes = {name: cand_out[name].dtype for name in common}
    results = RunResults()
    results.append(
        ("candidate", [IterationResult({n: _as_float32(cand_out[n]) for n in common}, runner_name="candidate")])
    )
    results.append(("fp32", [IterationResult({n: _as_float32(ref_out[n]) for n in common}, runner_name="fp32")]))
    compare = SimpleCompareFunc(
        atol={"": atol, "logits": logits_atol}, rtol={"": rtol, "logits": 0.0}, check_shapes=True
    )
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), np.errstate(all="ignore"):
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    per_output: Mapping[str, Any] = next(iter(accuracy[0].values()))[0]
    failed = {name for name, outcome in per_output.items() if not bool(outcome)}

    graph = onnx.load(str(candidate.model_path), load_external_data=False).graph
    graph_outputs = {o.name for o in graph.output}
    first: OpDrift | None = None
    for index, node in enumerate(graph.node):
        bad = [name for name in node.output if name in failed]
        if bad:
            outcome = per_output[bad[0]]
            first = OpDrift(
                index=index, node=node.name or f"#{index}", op_type=node.op_type, scope=_scope(node), output=bad[0],
                max_absdiff=_finite(outcome.max_absdiff), max_reldiff=_finite(outcome.max_reldiff),
                atol=logits_atol if bad[0] == "logits" else atol, rtol=0.0 if bad[0] == "logits" else rtol,
            )
            break
    logits_diff = _finite(per_output["logits"].max_absdiff) if "logits" in per_output else None

    reduce_command = data_dir = None
    if first is None or first.output in graph_outputs:
        data_dir = scratch
        reduce_command = _save_reduce_data(scratch, candidate, cand_feeds, ref_out, common, cand_dtypes, atol, rtol)
    finding = LayerwiseFinding(
        candidate=candidate.path, against=against.path, label=label or "given inputs", tokens=len(input_ids),
        compared=len(common), only_candidate=len(cand_out) - len(common), only_against=len(ref_out) - len(common),
        exceeded=len(failed), first=first, logits_max_absdiff=logits_diff, reduce_command=reduce_command,
        data_dir=data_dir,
    )
    log.info("layer-wise: %s", finding.first.node if finding.first else "no op over tolerance")
    return finding


def _save_reduce_data(
    scratch: Path,
    candidate: Artifact,
    feeds: Mapping[str, np.ndarray],
    ref_out: Mapping[str, np.ndarray],
    common: Sequence[str],
    cand_dtypes: Mapping[str, np.dtype],
    atol: float,
    rtol: float,
) -> str:
    """Write the inputs (with the fp32 graph's intermediate tensors, so any subgraph can be fed)
    and the fp32 tensors as Polygraphy JSON; return the ``polygraphy debug reduce`` command."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    golden = {name: ref_out[name].astype(cand_dtypes[name]) for name in common}
    inputs = dict(golden)
    inputs.update(feeds)
    save_json([inputs], str(scratch / INPUTS_JSON))
    results = RunResults()
    results.append(("fp32", [IterationResult(golden, runner_name="fp32")]))
    results.save(str(scratch / GOLDEN_JSON))
    q = shlex.quote
    return (
        f"polygraphy debug reduce {q(str(candidate.model_path))} -o {q(str(scratch / 'reduced.onnx'))} --mode=bisect "
        f"--load-inputs {q(str(scratch / INPUTS_JSON))} --check polygraphy run polygraphy_debug.onnx --onnxrt "
        f"--load-inputs {q(str(scratch / INPUTS_JSON))} --load-outputs {q(str(scratch / GOLDEN_JSON))} "
        f"--atol {atol:g} --rtol {rtol:g}"
    )
