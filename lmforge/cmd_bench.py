"""``lmforge bench ARTIFACT... [--device] [--batch] [--peers] [--json] [--plot]``: lmforge vs its peers.

The artifacts' manifests pick the benchmark: decoders get the generation bench
(:mod:`lmforge.benchmark.harness`: tokens/s, TTFT, memory, bandwidth), encoders the embeddings
bench (:mod:`lmforge.benchmark.encoder_bench`: sentences/s and p50/p99 per batch × ``--seq``,
beside PyTorch and a default onnxruntime session). ``--encoder`` says "these are encoders"
explicitly (and refuses a decoder); a flag of the other kind is refused with the one to use.
"""

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
        help="benchmark an artifact against its peers (decoders: Hugging Face, onnxruntime-genai, optimum; "
             "encoders: PyTorch, a default onnxruntime session)",
        description="Run lmforge and its peers on the same model, prompts and lengths, alternating after a "
                    "warm-up. Decoders: median decode tok/s, time to first token, throughput, memory and "
                    "memory-bandwidth utilisation. Encoders (detected from the manifest, or --encoder): "
                    "sentences/s and p50/p99 latency per --batch × --seq. A peer that cannot run is reported "
                    "with the reason.",
    )
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                        help="artifact folder(s) of one model (e.g. its fp32, int8 and int4 variants); all "
                             "decoders or all encoders")
    parser.add_argument("--encoder", action="store_true",
                        help="the artifacts are encoders (the default is to read it from their manifests)")
    # No argparse `choices`/`type`: bad values must be one-line lmforge errors with exit code 2.
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch", default=None, metavar="B[,B…]",
                        help="batch sizes, comma-separated (default 1; encoders 1,8,32)")
    parser.add_argument("--prompt-len", default=None, metavar="N", help="prompt tokens (decoders; default 128)")
    parser.add_argument("--new-tokens", default=None, metavar="N", help="new tokens per row (decoders; default 256)")
    parser.add_argument("--seq", default=None, metavar="S[,S…]", help="tokens per sentence (encoders; default 32,128)")
    parser.add_argument("--threads", default=None, metavar="N|auto",
                        help="lmforge and PyTorch intra-op threads (encoders; default auto: one per physical core)")
    parser.add_argument("--peers", default=None, metavar="P[,P…]",
                        help="decoders: hf, hf-compile, genai, genai-graph, optimum, or none (default: all of them; "
                             "hf-compile on the CPU and genai-graph only when named); encoders: ort, pytorch, or "
                             "none (default ort,pytorch)")
    parser.add_argument("--repeats", default=None, metavar="N",
                        help="timed rounds after the warm-up (default 3; encoders 10)")
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


_DECODER_ONLY = (("prompt_len", "--prompt-len"), ("new_tokens", "--new-tokens"),
                 ("genai_precision", "--genai-precision"), ("source", "--source"), ("plot", "--plot"),
                 ("work", "--work"))
_ENCODER_ONLY = (("seq", "--seq"), ("threads", "--threads"))


def _kind(args: argparse.Namespace) -> str:
    """``"encoder"`` or ``"decoder"`` from the manifests; mixed kinds and ``--encoder`` on a decoder are refused."""
    from runtime.artifact import load_artifact

    kinds = {a: "decoder" if load_artifact(a, verify_hashes=False).is_decoder else "encoder" for a in args.artifacts}
    decoders = [a for a, k in kinds.items() if k == "decoder"]
    if args.encoder and decoders:
        raise GenerationError(f"--encoder, but {decoders[0]} is a decoder artifact",
                              fix="drop --encoder to bench decoders, or pass encoder artifacts")
    if len(set(kinds.values())) > 1:
        encoders = [a for a, k in kinds.items() if k == "encoder"]
        raise GenerationError("decoder and encoder artifacts in one bench",
                              got=f"decoder {decoders[0]}, encoder {encoders[0]}",
                              fix="run `lmforge bench` once for the decoders and once for the encoders")
    kind = "decoder" if decoders else "encoder"
    other = _ENCODER_ONLY if kind == "decoder" else _DECODER_ONLY
    given = [flag for attr, flag in other if getattr(args, attr) is not None]
    if kind == "encoder" and args.peers_site and args.peers_site != os.environ.get("LMFORGE_PEERS_SITE"):
        given.append("--peers-site")
    if given:
        hint = ("--batch and --seq set the encoder bench's shapes" if kind == "encoder"
                else "--batch, --prompt-len and --new-tokens set the decoder bench's shapes")
        raise GenerationError(f"{given[0]} does not apply to {kind} artifacts ({args.artifacts[0]} is one)",
                              fix=f"drop {given[0]}: {hint}")
    return kind


def run(args: argparse.Namespace) -> int:
    if _kind(args) == "encoder":
        return _run_encoder(args)
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
        batches=parse_batches(args.batch or "1"),
        prompt_len=_positive("--prompt-len", args.prompt_len or "128"),
        new_tokens=_positive("--new-tokens", args.new_tokens or "256", 2),
        peers=peers,
        peers_explicit=explicit,
        repeats=_positive("--repeats", args.repeats or "3"),
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


def _run_encoder(args: argparse.Namespace) -> int:
    from lmforge.benchmark.encoder_bench import EncoderBenchConfig, render_encoder_table, run_encoder_bench
    from lmforge.benchmark.encoder_peers import PEERS
    from lmforge.cmd_tune import parse_ints, parse_threads

    if args.device != "cpu":
        raise GenerationError("the encoder bench runs on the CPU", expected="--device cpu", got=repr(args.device),
                              fix="drop --device; bench/encoder_gpu.py measures encoders on CUDA")
    text = (args.peers or ",".join(PEERS)).strip()
    peers = () if text == "none" else tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if any(p not in PEERS for p in peers) or (text != "none" and not peers):
        raise GenerationError("invalid --peers for encoders", expected=", ".join(PEERS) + " or none",
                              got=repr(args.peers))
    threads = parse_threads(args.threads or "auto")
    if threads is not None:
        from runtime.cpu import intra_op_threads

        intra_op_threads(threads)  # refuses more than the process may use
    config = EncoderBenchConfig(
        artifacts=tuple(Path(a) for a in args.artifacts),
        batches=parse_ints("--batch", args.batch or "1,8,32"),
        seqs=parse_ints("--seq", args.seq or "32,128"),
        threads=threads,
        peers=peers,
        rounds=_positive("--repeats", args.repeats or "10"),
        seed=_positive("--seed", args.seed, 0),
    )
    report = run_encoder_bench(config, progress=not args.quiet)
    report["command"] = list(getattr(args, "argv", None) or ["lmforge", *sys.argv[1:]])
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", path)
    print(render_encoder_table(report))
    return 0
