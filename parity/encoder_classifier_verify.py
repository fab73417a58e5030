"""``verify`` for re-rankers and classifiers (sequence-classification encoder artifacts).

Every query of the committed retrieval set (``parity/prompts/retrieval.jsonl``) is scored against
every passage — the cross-encoder's job, 16 × 16 pairs — by :meth:`runtime.Encoder.predict` (the
artifact, raw logits) and by transformers' ``AutoModelForSequenceClassification`` (PyTorch eager
fp32 on the source model, one padded batch per query). Judged per precision
(:data:`CLASSIFIER_POLICIES`):

``fp32`` — the same arithmetic in another order: every logit within ``1e-4``; every query's
    top-1 passage is PyTorch's.
``fp16`` — every logit within ``0.05``; the top-1 rule.
``int8`` — dynamic per-tensor activation quantization (:mod:`passes.encoder_int8`): every logit
    within ``0.5`` — a re-ranker's scores are used through their order — and the top-1 rule,
    except where PyTorch's own top-1/top-2 margin is under twice the measured max |Δ logit| (two
    scores that close can swap within the error the bound above accepts: a near-tie, reported as
    such, not a drift). fp16 the same, with its own bound.

For a multi-label classifier the compared logit is each label's, and "top-1" is over the pairs
of the first label's column (the score a re-ranking route would sort by).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from parity.encoder_verify import load_pairs
from runtime.errors import ParityError

__all__ = ["ClassifierPolicy", "CLASSIFIER_POLICIES", "ClassifierVerifyResult", "verify_classifier",
           "format_classifier_table", "is_classifier_artifact", "run_classifier_cli"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ClassifierPolicy:
    precision: str
    max_abs_logit: float
    near_tie: float = 0.0  # a query whose reference margin is below this may flip without failing


CLASSIFIER_POLICIES: dict[str, ClassifierPolicy] = {
    "fp32": ClassifierPolicy("fp32", max_abs_logit=1e-4),
    "fp16": ClassifierPolicy("fp16", max_abs_logit=0.05, near_tie=0.01),
    "int8": ClassifierPolicy("int8", max_abs_logit=0.5, near_tie=0.01),
}


@dataclasses.dataclass
class ClassifierVerifyResult:
    artifact: str
    precision: str
    device: str
    policy: ClassifierPolicy
    max_abs_logit: float
    queries: list[dict[str, Any]]  # id, reference_top1, candidate_top1, reference_margin, agrees
    reasons: list[str]
    timings: dict[str, float]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict[str, Any]:
        agree = sum(q["agrees"] for q in self.queries) / len(self.queries) if self.queries else 1.0
        return {"artifact": self.artifact, "kind": "classifier", "precision": self.precision, "device": self.device,
                "policy": dataclasses.asdict(self.policy), "passed": self.passed, "reasons": self.reasons,
                "summary": {"pairs": len(self.queries) ** 2, "max_abs_logit": self.max_abs_logit,
                            "top1_agreement": agree},
                "queries": self.queries, "timings_s": {k: round(v, 3) for k, v in self.timings.items()}}


def is_classifier_artifact(manifest: dict[str, Any]) -> bool:
    block = manifest.get("encoder")
    return isinstance(block, dict) and block.get("head") == "sequence-classification"


def _reference_logits(loaded: Any, queries: list[str], passages: list[str], max_length: int) -> np.ndarray:
    import torch

    from exporters.export import encoder_input_names

    names = encoder_input_names(loaded)
    rows = []
    with torch.inference_mode():
        for query in queries:
            enc = loaded.tokenizer([query] * len(passages), passages, padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt")
            rows.append(loaded.model(**{k: v for k, v in enc.items() if k in names}).logits.float().numpy())
    return np.stack(rows)  # [queries, passages, labels]


def verify_classifier(artifact: str | Path, pairs: str | Path | None = None, device: str = "cpu",
                      reference: str | None = None, threads: int | None = None) -> ClassifierVerifyResult:
    """Score every (query, passage) pair with the artifact and with PyTorch; judge by the policy."""
    from parity.reference import load_reference_source
    from runtime.artifact import load_artifact
    from runtime.encoder import Encoder

    art = load_artifact(artifact)
    policy = CLASSIFIER_POLICIES.get(art.precision)
    if policy is None:
        raise ParityError(f"no classifier parity policy for precision {art.precision!r}",
                          expected=", ".join(CLASSIFIER_POLICIES), fix="verify an fp32, fp16 or int8 artifact")
    qp = load_pairs(pairs)
    ids = [i for i, _, _ in qp]
    queries, passages = [q for _, q, _ in qp], [p for _, _, p in qp]
    timings: dict[str, float] = {}
    encoder = Encoder(art, device=device, threads=threads)
    started = time.perf_counter()
    loaded = load_reference_source(art.manifest, reference)
    ref = _reference_logits(loaded, queries, passages, encoder.max_length)
    timings["reference"] = time.perf_counter() - started
    started = time.perf_counter()
    got, _ = encoder.predict([(q, p) for q in queries for p in passages], batch_size=16, raw=True)
    got = got.reshape(ref.shape)
    timings["candidate"] = time.perf_counter() - started
    worst = float(np.abs(got - ref).max())
    results: list[dict[str, Any]] = []
    for row, query_id in enumerate(ids):
        order = np.argsort(-ref[row, :, 0])
        margin = float(ref[row, order[0], 0] - ref[row, order[1], 0]) if len(order) > 1 else float("inf")
        cand = int(np.argmax(got[row, :, 0]))
        results.append({"id": query_id, "reference_top1": ids[int(order[0])], "candidate_top1": ids[cand],
                        "reference_margin": margin, "agrees": int(order[0]) == cand})
    reasons = []
    if not np.isfinite(got).all():
        reasons.append("non-finite logits")
    if worst > policy.max_abs_logit:
        reasons.append(f"max |Δ logit| {worst:.3g} exceeds {policy.max_abs_logit:g}")
    # a flip between two passages whose reference scores are closer than the scores can move
    # (twice the measured error) is a near-tie, not a drift; fp32 allows none (near_tie 0)
    tie = max(policy.near_tie, 2 * worst) if policy.near_tie else 0.0
    for q in results:
        q["near_tie"] = not q["agrees"] and q["reference_margin"] < tie
    flips = [q for q in results if not q["agrees"] and not q["near_tie"]]
    if flips:
        reasons.append(f"top-1 passage differs from PyTorch's on {len(flips)} of {len(results)} queries: "
                       + "; ".join(f"{q['id']} (margin {q['reference_margin']:.4f})" for q in flips[:4]))
    result = ClassifierVerifyResult(str(art.path), art.precision, device, policy, worst, results, reasons, timings)
    log.info("classifier verify %s: %s", art.path, "PASS" if result.passed else "FAIL")
    return result


def format_classifier_table(result: ClassifierVerifyResult) -> str:
    lines = [f"classifier verify {result.artifact} ({result.precision}, {result.device}) against PyTorch fp32: "
             f"{len(result.queries)} queries × {len(result.queries)} passages",
             f"  {'query':<28} {'PyTorch top-1':<18} {'artifact top-1':<18} {'margin':>7}"]
    for q in result.queries:
        mark = "" if q["agrees"] else ("   ≈ near-tie" if q.get("near_tie") else "   ✗")
        lines.append(f"  {q['id'][:28]:<28} {q['reference_top1'][:18]:<18} {q['candidate_top1'][:18]:<18} "
                     f"{q['reference_margin']:>7.4f}{mark}")
    lines.append(f"  max |Δ logit| {result.max_abs_logit:.2e} (policy ≤ {result.policy.max_abs_logit:g})")
    lines.append("verdict: PASS" if result.passed else "verdict: FAIL — " + "; ".join(result.reasons))
    return "\n".join(lines)


def run_classifier_cli(args: Any) -> int:
    """``lmforge verify`` on a classifier artifact: print the table, ``--json``; 0 pass, 1 fail."""
    result = verify_classifier(args.artifact, device=args.device, reference=args.reference)
    print(format_classifier_table(result))
    if args.json:
        target = Path(args.json)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise ParityError(f"cannot write --json {target} ({exc.strerror or exc})",
                              fix="choose a writable path") from exc
    return 0 if result.passed else 1
