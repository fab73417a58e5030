"""onnxruntime-genai's generations through verify's comparison: the same prompts, reference and policy.

``lmforge bench --peers genai`` times a model that onnxruntime-genai's own builder makes from the
artifact's source weights; this module says what that model's outputs cost in quality, measured
exactly as ``verify`` measures an lmforge artifact, so the two can be put side by side:

* the prompts are verify's fixed set (``parity/prompts/default.jsonl`` unless given), encoded once
  with the *artifact's* tokenizer and chat template (:func:`parity.verify.encode_prompts`), and
  genai is fed those ids, so both candidates see the same tokens;
* the reference is the artifact's PyTorch fp32 reference, from the same caches
  (:func:`parity.reference.reference_runs`);
* each step's full logits come back from genai (``Generator.get_logits`` before the step's token)
  and go through :func:`parity.compare.compare_prompt`; the verdict is the artifact's precision's
  :class:`~parity.policy.Policy` (or ``precision``'s).

Greedy, at most ``max_new_tokens`` new tokens, stopping at the artifact's end-of-sequence ids
(genai stops at its configuration's, which its builder copies from the same source).

``python -m parity.genai_parity ARTIFACT GENAI_DIR [--precision int4] [--prompts FILE]``
prints the summary (and ``--json PATH`` writes every comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity.compare import CandidateRun, PromptComparison, compare_prompt, skipped
from parity.policy import Verdict, evaluate, policy_for
from parity.prompts import default_prompts_path, load_prompts
from parity.reference import reference_runs
from parity.verify import encode_prompts
from runtime.errors import ParityError

__all__ = ["GenaiParity", "genai_candidate", "verify_genai", "main"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenaiParity:
    """The comparisons and verdict of one genai model folder against an artifact's reference."""

    genai_dir: Path
    precision: str
    verdict: Verdict
    comparisons: tuple[PromptComparison, ...]

    def to_json(self) -> dict[str, Any]:
        compared = [c for c in self.comparisons if c.max_logit_diff is not None]
        return {
            "genai_dir": str(self.genai_dir), "precision": self.precision, "passed": self.verdict.passed,
            "summary": dataclasses.asdict(self.verdict.summary), "reasons": list(self.verdict.reasons),
            "max_logit_diff": max((c.max_logit_diff for c in compared), default=None),  # type: ignore[type-var]
            "mean_logit_diff": (float(np.mean([c.mean_logit_diff for c in compared])) if compared else None),
            "comparisons": [{"prompt_id": c.prompt_id, "outcome": c.classification.value,
                             "first_divergence": c.first_divergence, "ref_gap": c.ref_gap,
                             "max_logit_diff": c.max_logit_diff} for c in self.comparisons],
        }


def genai_candidate(model: Any, prompt_id: str, input_ids: Sequence[int], max_new_tokens: int,
                    eos_token_ids: Collection[int]) -> CandidateRun:
    """Greedy generation of one prompt with an ``onnxruntime_genai.Model``, with every step's logits."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(input_ids) + max_new_tokens, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([list(input_ids)], dtype=np.int32))
    tokens: list[int] = []
    rows: list[np.ndarray] = []
    eos = {int(t) for t in eos_token_ids}
    while len(tokens) < max_new_tokens and not generator.is_done():
        # onnxruntime-genai 0.18: the logits the next token is picked from are there before
        # generate_next_token, which picks it and already runs the model on it
        logits = np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1)
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if int(np.argmax(logits)) != token:  # the logits are not the ones the token was chosen from
            raise ParityError(f"prompt {prompt_id!r}: genai's logits and its greedy token disagree at step "
                              f"{len(tokens)}", fix="this onnxruntime-genai returns other logits; check its version")
        tokens.append(token)
        rows.append(logits)
        if token in eos:
            break
    return CandidateRun(prompt_id=prompt_id, tokens=tuple(tokens), logits=np.stack(rows))


def verify_genai(artifact_dir: str | Path, genai_dir: str | Path, precision: str | None = None,
                 prompts_path: str | Path | None = None, max_new_tokens: int = 32,
                 progress: bool = True) -> GenaiParity:
    """Run the genai model in ``genai_dir`` on verify's prompts and judge it like an artifact of
    ``precision`` (default: the artifact's) against the artifact's fp32 reference."""
    import onnxruntime_genai as og
    from tqdm.auto import tqdm

    from runtime import Engine

    engine = Engine.load(artifact_dir, device="cpu")
    try:
        manifest = engine.artifact.manifest
        policy = policy_for(precision or engine.artifact.precision)
        prompts = load_prompts(Path(prompts_path) if prompts_path is not None else default_prompts_path())
        input_ids, skip = encode_prompts(engine, prompts, max_new_tokens)
        eos = sorted(engine.eos_token_ids)
    finally:
        engine.close()
    run = [p for p in prompts if p.id not in skip]
    references = reference_runs(Path(artifact_dir), manifest, run, input_ids, max_new_tokens,
                                eos_token_ids=eos, progress=progress) if run else {}
    config = og.Config(str(genai_dir))
    config.clear_providers()
    model = og.Model(config)
    comparisons: dict[str, PromptComparison] = {}
    for prompt in tqdm(run, desc=f"genai ({Path(genai_dir).name})", unit="prompt", disable=not progress):
        candidate = genai_candidate(model, prompt.id, input_ids[prompt.id], max_new_tokens, eos)
        comparisons[prompt.id] = compare_prompt(references[prompt.id], candidate, policy.tie_threshold,
                                                eos_token_ids=eos)
    ordered = tuple(comparisons[p.id] if p.id in comparisons else skipped(p.id, skip[p.id]) for p in prompts)
    return GenaiParity(genai_dir=Path(genai_dir), precision=policy.precision, verdict=evaluate(policy, ordered),
                       comparisons=ordered)


def _summary_line(result: GenaiParity) -> str:
    data = result.to_json()
    s = data["summary"]
    mean = data["mean_logit_diff"]
    return (f"genai {result.genai_dir.name} ({result.precision} policy): {s['exact']} exact, {s['near_tie']} near-tie, "
            f"{s['drift']} drift of {s['prompts'] - s['skipped']}; max|Δlogit| {data['max_logit_diff']:.3f}, "
            f"mean {mean:.3f} → {'passed' if result.verdict.passed else 'FAILED'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.genai_parity", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="the lmforge artifact whose source, tokenizer and reference to use")
    parser.add_argument("genai_dir", help="an onnxruntime-genai model folder built from the same source")
    parser.add_argument("--precision", default=None, help="the policy to judge by (default: the artifact's)")
    parser.add_argument("--prompts", default=None, help="prompt set (default: verify's)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None, help="write the comparisons as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = verify_genai(args.artifact, args.genai_dir, args.precision, args.prompts, args.max_new_tokens)
    print(_summary_line(result))
    for reason in result.verdict.reasons:
        print(f"  - {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2))
    return 0 if result.verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())

