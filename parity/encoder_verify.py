"""``verify`` for encoders: embeddings of a fixed sentence set and a retrieval check against PyTorch.

Two committed sets (``parity/prompts/``): ``sentences.jsonl`` (varied lengths, languages, code)
and ``retrieval.jsonl`` (query/passage pairs on neighbouring topics, so a wrong neighbour is close
at hand). Every text is embedded by :class:`runtime.Encoder` (the artifact, its pooling and
normalization) and by :func:`parity.encoder_reference.reference_embeddings` (PyTorch eager fp32 on
the source model, the same pooling), then:

* per text: cosine similarity of the two embeddings and the largest per-element difference;
* retrieval: for every query, the passage with the highest cosine among *all* passages; the
  artifact's top-1 must be PyTorch's top-1 (the reference's top-1/top-2 margin is reported, so a
  flip on a near-tie reads differently from a real one).

The :class:`EncoderPolicy` of the artifact's precision judges that (:data:`ENCODER_POLICIES`):

``fp32`` — the same arithmetic in another kernel order: every element within ``1e-4`` of
    PyTorch after pooling (the issue's number; measured ~1e-6 on MiniLM), cosine ≥ 0.99999.
``fp16`` — fp16 rounds at ~5e-4 relative, accumulated over 6–12 layers: cosine ≥ 0.999.
``int8`` — set from the measurement in ``docs/encoders.md`` (MiniLM, the CPU recipe of
    :mod:`passes.encoder_int8`): mean cosine ≥ 0.99 and every text ≥ 0.97; dynamic per-tensor
    activation quantization costs ~0.5–2 % of cosine on short texts. What matters to a user is
    the ranking, so every query's top-1 passage must match PyTorch's.
``int4`` — weight error ~4× int8's: mean ≥ 0.97, every text ≥ 0.93, the same top-1 rule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ParityError

__all__ = ["EncoderPolicy", "ENCODER_POLICIES", "SentenceResult", "QueryResult", "EncoderVerifyResult",
           "DEFAULT_SENTENCES", "DEFAULT_RETRIEVAL", "load_sentences", "load_pairs", "compare_embeddings",
           "retrieval_check", "judge", "verify_encoder", "format_encoder_table", "write_encoder_report", "run_cli"]

log = logging.getLogger(__name__)

_PROMPTS = Path(__file__).resolve().parent / "prompts"
DEFAULT_SENTENCES = _PROMPTS / "sentences.jsonl"
DEFAULT_RETRIEVAL = _PROMPTS / "retrieval.jsonl"


@dataclasses.dataclass(frozen=True)
class EncoderPolicy:
    """What an encoder artifact of one precision must meet (see the module docstring for why)."""

    precision: str
    min_cosine: float  # every text
    min_mean_cosine: float
    max_abs_diff: float | None  # per element of the pooled embedding; None: not bounded
    min_top1_agreement: float = 1.0  # fraction of queries whose top-1 passage matches PyTorch's

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ENCODER_POLICIES: dict[str, EncoderPolicy] = {
    "fp32": EncoderPolicy("fp32", min_cosine=0.99999, min_mean_cosine=0.99999, max_abs_diff=1e-4),
    "fp16": EncoderPolicy("fp16", min_cosine=0.999, min_mean_cosine=0.9995, max_abs_diff=None),
    "int8": EncoderPolicy("int8", min_cosine=0.97, min_mean_cosine=0.99, max_abs_diff=None),
    "int4": EncoderPolicy("int4", min_cosine=0.93, min_mean_cosine=0.97, max_abs_diff=None),
}


@dataclasses.dataclass(frozen=True)
class SentenceResult:
    id: str
    tokens: int
    cosine: float
    max_abs_diff: float


@dataclasses.dataclass(frozen=True)
class QueryResult:
    id: str
    reference_top1: str
    candidate_top1: str
    reference_margin: float  # reference's top-1 minus top-2 cosine
    labelled: str  # the passage written for this query

    @property
    def agrees(self) -> bool:
        return self.reference_top1 == self.candidate_top1


@dataclasses.dataclass
class EncoderVerifyResult:
    artifact: str
    precision: str
    device: str
    pooling: str
    normalize: bool
    policy: EncoderPolicy
    sentences: list[SentenceResult]
    queries: list[QueryResult]
    reasons: list[str]
    timings: dict[str, float]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict[str, Any]:
        cos = [s.cosine for s in self.sentences]
        return {
            "artifact": self.artifact, "kind": "encoder", "precision": self.precision, "device": self.device,
            "pooling": self.pooling, "normalize": self.normalize, "policy": self.policy.to_json(),
            "passed": self.passed, "reasons": self.reasons,
            "summary": {"texts": len(cos), "min_cosine": min(cos), "mean_cosine": float(np.mean(cos)),
                        "max_abs_diff": max(s.max_abs_diff for s in self.sentences),
                        "top1_agreement": _agreement(self.queries),
                        "reference_label_accuracy": _label_accuracy(self.queries, candidate=False),
                        "candidate_label_accuracy": _label_accuracy(self.queries, candidate=True)},
            "sentences": [dataclasses.asdict(s) for s in self.sentences],
            "queries": [{**dataclasses.asdict(q), "agrees": q.agrees} for q in self.queries],
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


def _agreement(queries: Sequence[QueryResult]) -> float:
    return sum(q.agrees for q in queries) / len(queries) if queries else 1.0


def _label_accuracy(queries: Sequence[QueryResult], candidate: bool) -> float:
    if not queries:
        return 1.0
    return sum((q.candidate_top1 if candidate else q.reference_top1) == q.labelled for q in queries) / len(queries)


# --------------------------------------------------------------------------------------------
# Inputs


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ParityError(f"sentence file {path} does not exist", fix="pass an existing .jsonl file")
    rows: list[dict[str, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ParityError(f"{path}:{number} is not JSON ({exc.msg})", fix="one JSON object per line") from exc
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) or not row[k].strip() for k in keys):
            raise ParityError(f"{path}:{number} lacks a non-empty string for each of {list(keys)}",
                              got=line[:120], fix="fix that line")
        rows.append(row)
    if not rows:
        raise ParityError(f"{path} has no entries", expected=f"lines with {list(keys)}")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ParityError(f"{path} repeats an id", fix="give every line its own id")
    return rows


def load_sentences(path: str | Path | None = None) -> list[tuple[str, str]]:
    """``(id, text)`` from a ``{"id", "text"}`` JSONL file (default: the committed set)."""
    return [(r["id"], r["text"]) for r in _read_jsonl(Path(path or DEFAULT_SENTENCES), ("id", "text"))]


def load_pairs(path: str | Path | None = None) -> list[tuple[str, str, str]]:
    """``(id, query, passage)`` from a ``{"id", "query", "passage"}`` JSONL file."""
    rows = _read_jsonl(Path(path or DEFAULT_RETRIEVAL), ("id", "query", "passage"))
    if len(rows) < 2:
        raise ParityError("the retrieval set needs at least 2 pairs", got=str(len(rows)))
    return [(r["id"], r["query"], r["passage"]) for r in rows]


# --------------------------------------------------------------------------------------------
# Comparisons


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


def compare_embeddings(ids: Sequence[str], tokens: Sequence[int], reference: np.ndarray,
                       candidate: np.ndarray) -> list[SentenceResult]:
    """Per-text cosine and max |Δ| between two ``[n, d]`` embedding matrices."""
    cos = _cosines(reference.astype(np.float64), candidate.astype(np.float64))
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max(axis=1)
    return [SentenceResult(i, int(t), float(c), float(d)) for i, t, c, d in zip(ids, tokens, cos, diff)]


def retrieval_check(ids: Sequence[str], ref_q: np.ndarray, ref_p: np.ndarray, cand_q: np.ndarray,
                    cand_p: np.ndarray) -> list[QueryResult]:
    """Each query's top-1 passage (by cosine, over every passage) on both sides."""

    def sims(q: np.ndarray, p: np.ndarray) -> np.ndarray:
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        return qn.astype(np.float64) @ pn.astype(np.float64).T

    ref, cand = sims(ref_q, ref_p), sims(cand_q, cand_p)
    out = []
    for row, query_id in enumerate(ids):
        order = np.argsort(-ref[row])
        margin = float(ref[row, order[0]] - ref[row, order[1]]) if len(order) > 1 else float("inf")
        out.append(QueryResult(query_id, ids[int(order[0])], ids[int(np.argmax(cand[row]))], margin, query_id))
    return out


def judge(policy: EncoderPolicy, sentences: Sequence[SentenceResult], queries: Sequence[QueryResult]) -> list[str]:
    """The reasons the policy fails (empty: it holds)."""
    reasons: list[str] = []
    if not sentences:
        return ["no texts were compared"]
    worst = min(sentences, key=lambda s: s.cosine)
    if not all(np.isfinite(s.cosine) and np.isfinite(s.max_abs_diff) for s in sentences):
        reasons.append("non-finite embeddings")
    if worst.cosine < policy.min_cosine:
        reasons.append(f"cosine {worst.cosine:.6f} on {worst.id!r} is below {policy.min_cosine}")
    mean = float(np.mean([s.cosine for s in sentences]))
    if mean < policy.min_mean_cosine:
        reasons.append(f"mean cosine {mean:.6f} is below {policy.min_mean_cosine}")
    if policy.max_abs_diff is not None:
        far = max(sentences, key=lambda s: s.max_abs_diff)
        if far.max_abs_diff > policy.max_abs_diff:
            reasons.append(f"max |Δ| {far.max_abs_diff:.3g} on {far.id!r} exceeds {policy.max_abs_diff:g}")
    agreement = _agreement(queries)
    if agreement < policy.min_top1_agreement:
        flips = [f"{q.id} (→ {q.candidate_top1}, reference margin {q.reference_margin:.4f})"
                 for q in queries if not q.agrees]
        reasons.append(f"top-1 passage differs from PyTorch's on {len(flips)} of {len(queries)} queries: "
                       + "; ".join(flips[:4]))
    return reasons


# --------------------------------------------------------------------------------------------
# The run


def verify_encoder(artifact: str | Path, sentences: str | Path | None = None, pairs: str | Path | None = None,
                   device: str = "cpu", reference: str | None = None, progress: bool = False,
                   threads: int | None = None) -> EncoderVerifyResult:
    """Embed the fixed sets with the artifact and with PyTorch; judge by the precision's policy."""
    from parity.encoder_reference import reference_embeddings
    from parity.reference import load_reference_source
    from runtime.artifact import load_artifact
    from runtime.encoder import Encoder

    timings: dict[str, float] = {}
    art = load_artifact(artifact)
    policy = ENCODER_POLICIES.get(art.precision)
    if policy is None:
        raise ParityError(f"no encoder parity policy for precision {art.precision!r}",
                          expected=", ".join(ENCODER_POLICIES), fix="verify an artifact from `lmforge optimize`")
    texts = load_sentences(sentences)
    qp = load_pairs(pairs)
    encoder = Encoder(art, device=device, threads=threads)
    all_texts = [t for _, t in texts] + [q for _, q, _ in qp] + [p for _, _, p in qp]

    started = time.perf_counter()
    loaded = load_reference_source(art.manifest, reference)
    timings["load_reference"] = time.perf_counter() - started
    started = time.perf_counter()
    ref = reference_embeddings(loaded, all_texts, encoder.pooling, encoder.normalize, encoder.max_length,
                               progress=progress)
    timings["reference"] = time.perf_counter() - started
    started = time.perf_counter()
    cand = encoder.encode(all_texts, batch_size=16, prompt="")  # the reference embeds the texts as they are
    timings["candidate"] = time.perf_counter() - started
    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(all_texts)]

    n, m = len(texts), len(qp)
    ids = [i for i, _ in texts] + [f"query:{i}" for i, _, _ in qp] + [f"passage:{i}" for i, _, _ in qp]
    sentence_results = compare_embeddings(ids, lengths, ref, cand)
    pair_ids = [i for i, _, _ in qp]
    queries = retrieval_check(pair_ids, ref[n:n + m], ref[n + m:], cand[n:n + m], cand[n + m:])
    reasons = judge(policy, sentence_results, queries)
    result = EncoderVerifyResult(str(art.path), art.precision, device, encoder.pooling, encoder.normalize, policy,
                                 sentence_results, queries, reasons, timings)
    log.info("encoder verify %s: %s", art.path, "PASS" if result.passed else "FAIL")
    return result


def format_encoder_table(result: EncoderVerifyResult) -> str:
    """The per-text and per-query table ``lmforge verify`` prints, with the verdict."""
    lines = [f"encoder verify {result.artifact} ({result.precision}, {result.device}; {result.pooling} pooling"
             f"{' + normalize' if result.normalize else ''}) against PyTorch fp32",
             f"  {'text':<28} {'tokens':>6} {'cosine':>10} {'max|Δ|':>10}"]
    for s in result.sentences:
        lines.append(f"  {s.id[:28]:<28} {s.tokens:>6} {s.cosine:>10.6f} {s.max_abs_diff:>10.2e}")
    lines.append(f"  {'query':<28} {'PyTorch top-1':<18} {'artifact top-1':<18} {'margin':>7}")
    for q in result.queries:
        mark = "" if q.agrees else "   ✗"
        lines.append(f"  {q.id[:28]:<28} {q.reference_top1[:18]:<18} {q.candidate_top1[:18]:<18} "
                     f"{q.reference_margin:>7.4f}{mark}")
    summary = result.to_json()["summary"]
    p = result.policy
    lines.append(f"  min cosine {summary['min_cosine']:.6f} (policy ≥ {p.min_cosine}), "
                 f"mean {summary['mean_cosine']:.6f} "
                 f"(≥ {p.min_mean_cosine}), max|Δ| {summary['max_abs_diff']:.2e}"
                 f"{f' (≤ {p.max_abs_diff:g})' if p.max_abs_diff is not None else ''}, top-1 agreement "
                 f"{summary['top1_agreement']:.0%} (≥ {p.min_top1_agreement:.0%})")
    lines.append("verdict: PASS" if result.passed else "verdict: FAIL — " + "; ".join(result.reasons))
    return "\n".join(lines)


def write_encoder_report(folder: str | Path, result: EncoderVerifyResult) -> Path:
    """``folder/report.md``: the verdict, the policy, and the table."""
    target = Path(folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
        path = target / "report.md"
        path.write_text(
            f"# Encoder parity: {result.artifact}\n\n"
            f"**{'PASS' if result.passed else 'FAIL'}** under the {result.precision} policy "
            f"`{json.dumps(result.policy.to_json())}`\n\n"
            + "".join(f"- {r}\n" for r in result.reasons)
            + "\n```\n" + format_encoder_table(result) + "\n```\n",
            encoding="utf-8")
    except OSError as exc:
        raise ParityError(f"cannot write --report {target} ({exc.strerror or exc})",
                          fix="choose a writable folder") from exc
    return path


def run_cli(args: Any) -> int:
    """``lmforge verify`` on an encoder artifact: print the table, ``--json``/``--report``; 0 pass, 1 fail.

    ``--prompts`` names the sentence set; the decoder-only flags (``--max-new-tokens``,
    ``--batch-size``, ``--layerwise``) do not apply and are ignored with a log line.
    """
    if getattr(args, "layerwise", False):
        log.warning("--layerwise compares decoder steps; it is ignored for an encoder")
    from parity.encoder_classifier_verify import is_classifier_artifact, run_classifier_cli
    from runtime.artifact import load_artifact

    if is_classifier_artifact(load_artifact(args.artifact, verify_hashes=False).manifest):
        return run_classifier_cli(args)  # re-rankers and classifiers: logits of query × passage pairs
    result = verify_encoder(args.artifact, sentences=args.prompts, device=args.device, reference=args.reference,
                            progress=not getattr(args, "quiet", False))
    print(format_encoder_table(result))
    if args.json:
        target = Path(args.json)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise ParityError(f"cannot write --json {target} ({exc.strerror or exc})",
                              fix="choose a writable path") from exc
    if args.report:
        log.info("report: %s", write_encoder_report(args.report, result))
    return 0 if result.passed else 1
