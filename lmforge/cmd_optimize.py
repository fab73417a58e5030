"""``lmforge optimize IN -o OUT --device cpu|cuda --precision fp32|fp16|int8|int4``: fuse and quantize."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "optimize",
        help="fuse an fp32 artifact's graph and convert it to fp16/int8/int4 for a device",
        description="Run lmforge's graph passes (cleanup, fusions) and a precision pass on an artifact "
                    "written by `lmforge convert`, and write a new artifact; prints the fusion report.",
    )
    parser.add_argument("artifact", help="fp32 artifact folder (from `lmforge convert`)")
    parser.add_argument("-o", "--output", required=True, help="artifact folder to write")
    # No argparse `choices`: a bad value must be a PassError (one line, exit 2) like every other refusal.
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--precision", default="fp32", help="fp32, fp16, int8 or int4 (default fp32)")
    parser.add_argument("--kv-mode", default=None,
                        help="concat or shared-buffer (default: shared-buffer for --device cuda when every "
                             "attention fuses to GroupQueryAttention, else concat)")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false", help="skip the fusion passes")
    parser.add_argument("--block-size", type=int, default=None,
                        help="int8/int4: MatMulNBits block along K, 16/32/64/128 (default 16 for CPU int8, else 32)")
    parser.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=None,
                        help="int8/int4: quantize the lm head too (default: yes for --device cpu, 8-bit; "
                             "no for cuda, where it keeps the base precision)")
    parser.add_argument("--check", action="store_true",
                        help="compare logits with the input artifact on fixed inputs; refuse to write past tolerance")
    parser.add_argument("--force", action="store_true", help="replace OUT; allow fp16 on CPU")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from passes.pipeline import optimize_artifact

    report = optimize_artifact(args.artifact, args.output, device=args.device, precision=args.precision,
                               fuse=args.fuse, check=args.check, force=args.force,
                               kv_mode=args.kv_mode, quantize_lm_head=args.quantize_lm_head,
                               block_size=args.block_size)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif not args.quiet:
        print(report.render())
    return 0
