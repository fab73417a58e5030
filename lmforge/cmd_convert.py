"""``lmforge convert SOURCE -o OUT``: export a model to an fp32 artifact."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert",
        help="export a model (HF folder, .gguf, builtin:NAME, tiny:ARCH) to an ONNX artifact",
        description="Export a model with its KV cache to an fp32 ONNX artifact, checked against PyTorch.",
    )
    parser.add_argument(
        "source", help="HF model folder, .gguf file, builtin:smollm2-135m, builtin:minilm-l6, tiny:<arch>, or a hub id"
    )
    parser.add_argument("-o", "--output", required=True, help="artifact folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--max-context", type=int, default=None, help="longest prompt+generation the artifact serves")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from exporters.convert import convert
    from lmforge.cmd_inspect import render
    from runtime.artifact import load_artifact

    # a bar on a terminal, else one line per stage (lmforge.progress); -q: neither
    progress = False if args.quiet else None
    out = convert(args.source, args.output, force=args.force, max_context=args.max_context, progress=progress)
    if not args.quiet:
        print(render(load_artifact(out, verify_hashes=False)))
    return 0
