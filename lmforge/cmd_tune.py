"""``lmforge tune ARTIFACT [--batch] [--seq] [--instances] [--threads] [--cpus]``: the CPU instance sweep.

Splits the allowed cores into N pinned instances (separate processes), drives them with the same
fixed inputs, and reports p50/p99 latency and summed throughput per configuration next to PyTorch
and a default onnxruntime session; recommends a configuration per sequence length
(:mod:`lmforge.benchmark.tune`). Exit code 2 on bad input (``--instances`` larger than the cores,
``--cpus`` outside the process's affinity, ``--threads 0``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from runtime.errors import GenerationError

__all__ = ["register", "run", "parse_ints", "parse_threads"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="sweep CPU instances × threads × batch × sequence length for an encoder artifact",
        description="Run N pinned instances of an encoder artifact (one process per slice of the cores) on the "
                    "same inputs; report p50/p99 latency and summed throughput per configuration beside PyTorch "
                    "and a default onnxruntime session, and recommend a configuration per sequence length.",
    )
    parser.add_argument("artifact", metavar="ARTIFACT", help="encoder artifact folder")
    # No argparse `type`/`choices`: bad values must be one-line lmforge errors with exit code 2.
    parser.add_argument("--batch", default="1,8,32", metavar="B[,B…]", help="batch sizes (default 1,8,32)")
    parser.add_argument("--seq", default="32,128,384", metavar="S[,S…]", help="sequence lengths (default 32,128,384)")
    parser.add_argument("--instances", default="auto", metavar="N[,N…]|auto",
                        help="instance counts; each gets its own equal slice of the cores (default auto: 1, 2, 4, … "
                             "up to the physical cores; counts above the cores are refused)")
    parser.add_argument("--threads", default="auto", metavar="N|auto",
                        help="intra-op threads per instance (default auto: the physical cores of its slice)")
    parser.add_argument("--cpus", default=None, metavar="LIST",
                        help="cores to split, e.g. 0-7,9 (default $LMFORGE_CPUS, else the process's affinity)")
    parser.add_argument("--peers", default="ort,pytorch", metavar="P[,P…]",
                        help="ort (default session, unoptimized export), pytorch, or none (default ort,pytorch)")
    parser.add_argument("--seconds", default="3", metavar="S", help="timed seconds per configuration (default 3)")
    parser.add_argument("--seed", default="0", metavar="N", help="input ids seed (default 0)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the full report here")
    parser.set_defaults(func=run)


def parse_ints(flag: str, text: str) -> tuple[int, ...]:
    """``"1,8,32"`` → ``(1, 8, 32)``: positive integers only, else a one-line error."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise GenerationError(f"invalid {flag}", expected="positive integers separated by commas, e.g. 1,8,32",
                              got=repr(text))
    return tuple(dict.fromkeys(int(p) for p in parts))


def parse_threads(text: str) -> int | None:
    """``auto`` → ``None``; a positive integer → itself; else a one-line error."""
    if str(text).strip().lower() == "auto":
        return None
    if not str(text).strip().isdigit() or int(text) < 1:
        raise GenerationError("invalid --threads", expected="auto or an integer >= 1", got=repr(text),
                              fix="pass --threads auto for one thread per physical core of each instance")
    return int(text)


def _instances(text: str, pinned: list[int] | None) -> tuple[int, ...]:
    """``auto`` → powers of two up to the physical cores to split; else :func:`parse_ints`."""
    if str(text).strip().lower() != "auto":
        return parse_ints("--instances", text)
    from runtime.cpu import available_cores, physical_cores

    cores = len(physical_cores(pinned or available_cores()))
    counts = [1]
    while counts[-1] * 2 <= cores:
        counts.append(counts[-1] * 2)
    return tuple(counts)


def _seed(text: str) -> int:
    if not str(text).strip().isdigit():
        raise GenerationError("invalid --seed", expected="an integer >= 0", got=repr(text))
    return int(text)


def run(args: argparse.Namespace) -> int:
    from lmforge.benchmark.tune import PEERS, TuneConfig, render_tune, run_tune
    from runtime.cpu import pin_from_env

    peers_text = str(args.peers).strip()
    peers = () if peers_text == "none" else tuple(dict.fromkeys(p.strip() for p in peers_text.split(",") if p.strip()))
    if any(p not in PEERS for p in peers) or (peers_text != "none" and not peers):
        raise GenerationError("invalid --peers", expected=", ".join(PEERS) + " or none", got=repr(args.peers))
    try:
        seconds = float(args.seconds)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 600:
        raise GenerationError("invalid --seconds", expected="a number in (0, 600]", got=repr(args.seconds))
    threads = parse_threads(args.threads)
    if threads is not None:
        from runtime.cpu import intra_op_threads

        intra_op_threads(threads)  # refuses more than the process may use
    pinned = pin_from_env(args.cpus)  # the sweep splits these; children inherit the mask
    config = TuneConfig(
        artifact=Path(args.artifact), batches=parse_ints("--batch", args.batch), seqs=parse_ints("--seq", args.seq),
        instances=_instances(args.instances, pinned), threads=threads, peers=peers, seconds=seconds,
        seed=_seed(args.seed),
        cpus=tuple(pinned) if pinned else None,
    )
    report = run_tune(config, progress=not args.quiet)
    report["command"] = getattr(args, "argv", None)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log.info("wrote %s", path)
    print(render_tune(report))
    return 0
