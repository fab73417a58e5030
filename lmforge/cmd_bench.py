"""``lmforge bench ARTIFACT... [--device] [--batch] [--peers] [--json] [--plot]``: lmforge vs its peers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from runtime.errors import GenerationError

__all__ = ["register", "run", "parse_batches", "parse_peers"]

log = logging.getLogger(__name__)

_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark an artifact against Hugging Face, onnxruntime-genai and optimum on the same model",
        description="Run lmforge and its peers on the same model, prompts and lengths, alternating after a "
                    "warm-up; report median decode tok/s, time to first token, throughput, memory and "
                    "memory-bandwidth utilisation. A peer that cannot run is reported with the reason.",
    )
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                        help="decoder artifact folder(s) of one model (e.g. its fp32, int8 and int4 variants)")
    # No argparse `choices`/`type`: bad values must be one-line lmforge errors with exit code 2.
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch", default="1", metavar="B[,B…]", help="batch sizes, comma-separated (default 1)")
    parser.add_argument("--prompt-len", default="128", metavar="N", help="prompt tokens (default 128)")
    parser.add_argument("--new-tokens", default="256", metavar="N", help="new tokens per row (default 256)")
    parser.add_argument("--peers", default=None, metavar="P[,P…]",
                        help="hf, hf-compile, genai, genai-graph, optimum, or none (default: all of them; "
                             "hf-compile on the CPU and genai-graph only when named)")
    parser.add_argument("--repeats", default="3", metavar="N", help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--seed", default="0", metavar="S", help="prompt ids seed (default 0)")
    parser.add_argument("--genai-precision", default=None, metavar="P[,P…]",
                        help="onnxruntime-genai builds to compare (default: the artifacts' precisions)")
    parser.add_argument("--peers-site", default=os.environ.get("LMFORGE_PEERS_SITE"), metavar="DIR",
                        help="site folder with optimum-onnx + transformers<4.58 (default $LMFORGE_PEERS_SITE)")
    parser.add_argument("--source", default=None, metavar="SOURCE",
                        help="the peers' model (default: the artifact manifest's source)")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="where peer builds are cached (default ~/.cache/lmforge/bench)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the full report here")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw tokens/s per runtime and batch size")
    parser.set_defaults(func=run)


def _positive(flag: str, text: str, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise GenerationError(f"invalid {flag}", expected=f"an integer >= {minimum}", got=repr(text))
    return value


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,16"`` → ``(1, 16)``; anything else is a one-line error."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise GenerationError("invalid --batch", expected="positive integers separated by commas, e.g. 1,16",
                              got=repr(text))
    return tuple(dict.fromkeys(int(p) for p in parts))


def parse_peers(text: str | None, device: str) -> tuple[tuple[str, ...], bool]:
    """The peers to run and whether the user named them."""
    from lmforge.benchmark.harness import default_peers
    from lmforge.benchmark.peers import PEERS

    if text is None:
        return default_peers(device), False
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["none"]:
        return (), True
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise GenerationError("unknown peer " + ", ".join(map(repr, unknown)) if unknown else "no peers named",
                              expected="a comma-separated list of " + ", ".join(PEERS) + " (or none)", got=repr(text))
    return tuple(dict.fromkeys(names)), True


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise GenerationError("invalid --device", expected="cpu or cuda", got=repr(device))
    if device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise GenerationError(
                "--device cuda needs onnxruntime's CUDAExecutionProvider, which is not available",
                got=", ".join(ort.get_available_providers()),
                fix="pip install onnxruntime-gpu (matching your CUDA) in place of onnxruntime, or use --device cpu",
            )


def run(args: argparse.Namespace) -> int:
    from lmforge.benchmark.harness import BenchConfig, render_table, run_bench

    _check_device(args.device)
    peers, explicit = parse_peers(args.peers, args.device)
    precisions: tuple[str, ...] = ()
    if args.genai_precision:
        precisions = tuple(p.strip() for p in args.genai_precision.split(",") if p.strip())
        bad = [p for p in precisions if p not in _PRECISIONS]
        if bad or not precisions:
            raise GenerationError(
                "invalid --genai-precision", expected=", ".join(_PRECISIONS), got=repr(args.genai_precision)
            )
    work = Path(args.work) if args.work else Path.home() / ".cache" / "lmforge" / "bench"
    config = BenchConfig(
        artifacts=tuple(Path(a) for a in args.artifacts),
        device=args.device,
        batches=parse_batches(args.batch),
        prompt_len=_positive("--prompt-len", args.prompt_len),
        new_tokens=_positive("--new-tokens", args.new_tokens, 2),
        peers=peers,
        peers_explicit=explicit,
        repeats=_positive("--repeats", args.repeats),
        seed=_positive("--seed", args.seed, 0),
        work=work,
        genai_precisions=precisions,
        peers_site=args.peers_site,
        source=args.source,
        command=tuple(getattr(args, "argv", None) or ["lmforge", *sys.argv[1:]]),
    )
    report = run_bench(config)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log.info("wrote %s", path)
    if args.plot:
        from lmforge.benchmark.plot import plot_report

        plot_report(report, args.plot)
    if not args.quiet:
        print(render_table(report))
    return 0
