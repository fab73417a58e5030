"""``lmforge generate ARTIFACT PROMPT``: run an artifact with the runtime, streaming to stdout."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

__all__ = ["register", "run"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with an artifact (onnxruntime only)",
        description="Generate text from PROMPT with an lmforge artifact, streaming it to stdout.",
    )
    parser.add_argument("artifact", metavar="ARTIFACT", help="artifact folder written by `lmforge convert`")
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt (the user message with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default 128")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 = off (default)")
    parser.add_argument("--min-new-tokens", type=int, default=0, metavar="N", help="no EOS before N tokens")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="makes sampling reproducible")
    parser.add_argument("--chat", action="store_true", help="wrap PROMPT in the artifact's chat template")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from runtime import Engine, SamplingParams
    from runtime.text import check_text

    # A lone surrogate (a non-UTF-8 argument arrives as one) is refused here, before the engine
    # loads, as one line; the tokenizer would raise a bare TypeError.
    check_text(args.prompt, "the prompt")

    sampling = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, min_new_tokens=args.min_new_tokens,
        stop=tuple(args.stop),
    )
    engine = Engine.load(args.artifact, device=args.device)
    prompt = engine.chat_ids([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    if args.no_stream:
        (result,) = engine.generate_results([prompt], args.max_new_tokens, sampling)
        sys.stdout.write(result.text + "\n")
        log.info(
            "%d prompt + %d new tokens, finish %s, first token %.0f ms, decode %.1f tok/s",
            result.prompt_tokens, result.new_tokens, result.finish_reason.value, result.ttft_s * 1e3,
            result.decode_tokens_per_s,
        )
        return 0
    for piece in engine.stream(prompt, args.max_new_tokens, sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
