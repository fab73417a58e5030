"""``lmforge verify ARTIFACT``: generations against the PyTorch reference on fixed prompts, judged
by the policy of the artifact's precision.

Exit codes: 0 when the policy holds (batch parity included), 1 when it does not, 2 on bad input
(an :class:`~runtime.errors.LmforgeError`, turned into one line by :mod:`lmforge.cli`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check an artifact's greedy generations against the PyTorch reference",
        description="Generate greedily on fixed prompts with the artifact and with PyTorch eager fp32 on its "
        "source model, compare them step by step, and judge the result with the precision's parity policy. "
        "Exits 0 when the policy holds, 1 when it does not, 2 on bad input.",
    )
    parser.add_argument("artifact", metavar="ARTIFACT", help="artifact folder (from `lmforge convert` or `optimize`)")
    parser.add_argument("--prompts", metavar="FILE.jsonl", default=None,
                        help="prompt set, one {\"id\", \"prompt\", \"chat\"} object a line "
                        "(default: parity/prompts/default.jsonl); for an encoder, {\"id\", \"text\"} "
                        "(default: parity/prompts/sentences.jsonl)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="N", help="new tokens per prompt (default 32)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the artifact runs (default cpu)"
    )
    parser.add_argument("--json", metavar="PATH", default=None, help="write the result as JSON")
    parser.add_argument("--report", metavar="DIR", default=None, help="write report.md and a logit-difference chart")
    parser.add_argument("--reference", metavar="PATH", default=None,
                        help="source model for the reference (HF folder or .gguf), when the recorded one moved")
    parser.add_argument("--no-cache", action="store_true",
                        help="compute the PyTorch reference afresh, reading and writing no cached references "
                        "(ARTIFACT/parity/reference.jsonl and the shared cache in $LMFORGE_CACHE_DIR, "
                        "else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="batch parity: rows per left-padded batch (default 8; 0 skips it)")
    parser.add_argument("--layerwise", action="store_true",
                        help="on failure, compare every intermediate tensor with an fp32 artifact (Polygraphy) "
                        "and name the first op that drifts")
    parser.add_argument("--layerwise-against", metavar="PATH", default=None,
                        help="fp32 artifact of the same source for --layerwise (default: the artifact the manifest "
                        "records as its input)")
    parser.set_defaults(func=run)


def _write_json(path: str, document: dict[str, Any]) -> None:
    from runtime.errors import ParityError

    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ParityError(
            f"cannot write --json {target} ({exc.strerror or exc})", fix="choose a writable path"
        ) from exc


def run(args: argparse.Namespace) -> int:
    from parity.layerwise import layerwise_compare, resolve_against
    from parity.report import format_table, to_json, write_markdown_report
    from parity.verify import failing_prompt, verify_artifact
    from runtime.artifact import load_artifact
    from runtime.errors import ParityError

    if not load_artifact(args.artifact, verify_hashes=False).is_decoder:  # encoders: parity.encoder_verify
        from parity.encoder_verify import run_cli

        return run_cli(args)
    if args.max_new_tokens < 1:
        raise ParityError("invalid --max-new-tokens", expected="an integer >= 1", got=str(args.max_new_tokens))
    if args.batch_size < 0:
        raise ParityError(
            "invalid --batch-size", expected="an integer >= 0 (0 skips batch parity)", got=str(args.batch_size)
        )
    against = resolve_against(args.artifact, args.layerwise_against) if args.layerwise else None

    result = verify_artifact(
        args.artifact, args.prompts, max_new_tokens=args.max_new_tokens, device=args.device,
        reference=args.reference, progress=not args.quiet, batch_size=args.batch_size, use_cache=not args.no_cache,
    )
    print(format_table(result.comparisons, result.verdict, precision=result.precision, decode=result.decode))
    document = to_json(result.verdict, result.comparisons, result.precision, result.policy)
    document["batch_mismatches"] = [
        {"id": m.prompt_id, "step": m.step, "single_token": m.single_token, "batch_token": m.batch_token,
         "ref_gap": m.ref_gap if m.ref_gap is None or m.ref_gap != float("inf") else None, "near_tie": m.near_tie,
         "judged_by": m.judged_by}
        for m in result.batch_mismatches
    ]
    document["max_new_tokens"] = result.max_new_tokens
    document["timings_s"] = {k: round(v, 3) for k, v in result.timings.items()}

    finding = None
    if args.layerwise and against is not None and not result.passed:
        target = failing_prompt(result)
        if target is None:
            log.warning("--layerwise: the verdict failed but no prompt or step can be pointed at")
        else:
            prompt_id, step = target
            ids = list(result.input_ids[prompt_id]) + list(result.references[prompt_id].tokens[:step])
            finding = layerwise_compare(
                result.artifact, against, ids, device=args.device, precision=result.precision,
                policy=result.policy, work_dir=Path(args.report) / "layerwise" if args.report else None,
                label=f"prompt {prompt_id}, step {step}",
            )
            print()
            print(finding.describe())
            document["layerwise"] = finding.to_json()
    elif args.layerwise:
        log.info("--layerwise: nothing failed, nothing to compare")

    if args.json:
        _write_json(args.json, document)
        print(f"json written to {args.json}")
    if args.report:
        report = write_markdown_report(args.report, result.verdict, result.comparisons, result.precision,
                                       result.policy, decode=result.decode)
        if finding is not None:
            with open(report, "a", encoding="utf-8") as fh:
                fh.write("\n## Layer-wise comparison\n\n```\n" + finding.describe() + "\n```\n")
        print(f"report written to {report}")
    sys.stdout.flush()
    return 0 if result.passed else 1
