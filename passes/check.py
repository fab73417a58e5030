"""``--check``: run an input and an output artifact on fixed inputs and compare their outputs.

The inputs are deterministic (fixed seed, fixed shapes) and exercise what the runtime does:

* ``prefill``: a batch of two prompts of 12 tokens, the second left-padded by 5 (past length 0);
* ``decode``: one more token for both rows, fed the ``present`` KV of the prefill as ``past``.

Only positions that hold a real token are compared (a padded query row's output is undefined
and the runtime never reads it). For decoders the compared tensor is ``logits``; for encoders
``last_hidden_state``. A :class:`Tolerance` per precision bounds the maximum absolute difference
and asks a minimum agreement of the arg-max over the vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import Artifact
from runtime.decoder_io import DecoderIO
from runtime.errors import PassError

__all__ = ["Tolerance", "TOLERANCES", "CheckResult", "check_session", "compare_artifacts", "decoder_cases", "judge"]

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far an optimized artifact's outputs may move from its input's."""

    max_abs: float  # on logits (or hidden states), at real-token positions
    min_argmax_agreement: float  # fraction of compared positions whose arg-max is unchanged


# fp32: fusions reorder float arithmetic only (1e-5 on logits of ~10); 1e-3 is the export check's
# bound too. fp16/int8/int4: measured on tiny:* and SmolLM2-135M; the
# arg-max floor is what catches a broken graph, the absolute bound a catastrophic one.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-3, min_argmax_agreement=1.0),
    "fp16": Tolerance(max_abs=0.5, min_argmax_agreement=0.9),
    "int8": Tolerance(max_abs=3.0, min_argmax_agreement=0.75),
    "int4": Tolerance(max_abs=6.0, min_argmax_agreement=0.6),
}


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """Per case (``prefill``, ``decode``), max |Δ| and arg-max agreement; and the verdict."""

    max_abs: dict[str, float]
    argmax_agreement: dict[str, float]
    tolerance: Tolerance

    @property
    def ok(self) -> bool:
        return all(np.isfinite(v) and v <= self.tolerance.max_abs for v in self.max_abs.values()) and all(
            v >= self.tolerance.min_argmax_agreement for v in self.argmax_agreement.values()
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_diff": {k: float(f"{v:.4g}") for k, v in self.max_abs.items()},
            "argmax_agreement": {k: round(v, 4) for k, v in self.argmax_agreement.items()},
            "tolerance": dataclasses.asdict(self.tolerance),
            "ok": self.ok,
        }

    def describe(self) -> str:
        parts = [
            f"{k}: max|Δ| {self.max_abs[k]:.3g}, arg-max agree {self.argmax_agreement[k]:.0%}" for k in self.max_abs
        ]
        return "; ".join(parts)


def check_session(model: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def decoder_cases(art: Artifact) -> list[tuple[str, dict[str, np.ndarray], np.ndarray]]:
    """(name, feeds without KV, mask of real query positions [batch, seq]) for prefill; decode follows."""
    vocab = int(art.architecture["vocab"])
    rng = np.random.default_rng(1234)
    batch, seq, pad = 2, 12, 5
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1, :pad] = 0
    pad_id = int((art.manifest.get("generation") or {}).get("pad_token_id") or 0)
    ids[1, :pad] = pad_id
    return [("prefill", {"input_ids": ids, "attention_mask": mask}, mask.astype(bool))]


def _run_decoder(art: Artifact, model: Path) -> dict[str, np.ndarray]:
    """The check batch's prefill, then one decode step, through the artifact's concat contract."""
    session = check_session(model)
    names = {i.name for i in session.get_inputs()}
    io = DecoderIO.from_artifact(art)
    (_, feeds, _), = decoder_cases(art)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    batch = ids.shape[0]
    past = io.empty_kv(batch)
    outputs: dict[str, np.ndarray] = {}
    next_ids = np.array([[7], [11]], dtype=np.int64)
    step_mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    for case, step_ids, case_mask in (("prefill", ids, mask), ("decode", next_ids, step_mask)):
        feed = io.concat_feeds(step_ids, case_mask, past)
        result = dict(zip([o.name for o in session.get_outputs()],
                          session.run(None, {k: v for k, v in feed.items() if k in names})))
        outputs[case] = result["logits"].astype(np.float32)
        past = io.carry(result)
    return outputs


def _run_encoder(art: Artifact, model: Path) -> dict[str, np.ndarray]:
    session = check_session(model)
    names = {i.name for i in session.get_inputs()}
    vocab = int(art.architecture["vocab"])
    rng = np.random.default_rng(1234)
    ids = rng.integers(3, vocab, size=(2, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # encoders are right-padded
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    result = session.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in names})
    return {"encode": result[0].astype(np.float32)}


def _valid_positions(case: str, art: Artifact, shape: tuple[int, ...]) -> np.ndarray:
    if not art.is_decoder:
        mask = np.ones(shape[:2], dtype=bool)
        mask[1, 7:] = False
        return mask
    if case == "prefill":
        return decoder_cases(art)[0][2]
    return np.ones(shape[:2], dtype=bool)


def compare_artifacts(reference: Artifact, candidate: Artifact, candidate_model: Path, precision: str) -> CheckResult:
    """Run ``reference`` (an artifact) and ``candidate_model`` (its optimized graph) and compare."""
    runner = _run_decoder if reference.is_decoder else _run_encoder
    try:
        ref = runner(reference, reference.model_path)
        got = runner(candidate, candidate_model)
    except Exception as exc:  # any ORT failure means the optimized graph is unusable
        raise PassError(
            f"--check: the optimized graph does not run in onnxruntime ({type(exc).__name__}: {exc})",
            fix="re-run with --no-fuse to isolate a fusion, and report it; nothing was written",
        ) from exc
    result = judge(reference, ref, got, precision)
    log.info("check (%s): %s", precision, result.describe())
    return result


def judge(reference: Artifact, ref: dict[str, np.ndarray], got: dict[str, np.ndarray], precision: str) -> CheckResult:
    """Compare the reference's and the candidate's logits per case, at real-token positions only."""
    max_abs: dict[str, float] = {}
    agree: dict[str, float] = {}
    for case, expected in ref.items():
        valid = _valid_positions(case, reference, expected.shape)
        a, b = expected[valid], got[case][valid]
        max_abs[case] = float(np.max(np.abs(a - b))) if np.all(np.isfinite(b)) else float("inf")
        agree[case] = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    return CheckResult(max_abs=max_abs, argmax_agreement=agree, tolerance=TOLERANCES[precision])
