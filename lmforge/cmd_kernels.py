"""``lmforge kernels build|status``: lmforge's CUDA kernels (custom onnxruntime ops).

``build`` compiles ``runtime/kernels/*.cu`` for this machine's GPU (or ``--arch``) into the cache
that the runtime loads them from (:mod:`runtime.kernels.build`); ``status`` says what is built
and whether a CUDA session will use it. Without a build the ONNX sampler serves (docs/kernels.md).
"""

from __future__ import annotations

import argparse
import logging

from lmforge.cli import PROGRESS_LOGGER

__all__ = ["register", "run"]

progress = logging.getLogger(PROGRESS_LOGGER)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("kernels", help="build lmforge's CUDA kernels (fused sampling, SwiGLU gate) for this GPU")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    build = actions.add_parser("build", help="compile the kernels for this machine's GPU into the cache")
    build.add_argument("--arch", default=None, help="GPU architecture, e.g. sm_90 (default: the installed GPU's)")
    build.add_argument("--force", action="store_true", help="rebuild even when a build is cached")
    build.set_defaults(func=run)
    status = actions.add_parser("status", help="show the built kernels and whether sessions will use them")
    status.set_defaults(func=run)
    selftest = actions.add_parser("selftest", help="run the kernels on this GPU without onnxruntime (checks, timings)")
    selftest.add_argument("--arch", default=None, help="GPU architecture (default: the installed GPU's)")
    selftest.add_argument("--timeout", type=float, default=120.0, help="seconds before a hang is reported")
    selftest.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from runtime.kernels.build import build_library, cache_root, detect_arch, find_nvcc, library_path, run_selftest

    if args.action == "build":
        progress.info("compiling the lmforge kernels for %s (about 10-30 s) …", args.arch or "this GPU")
        built = build_library(args.arch, force=args.force)
        state = "cached" if built.cached else f"built in {built.seconds:.1f} s with {built.nvcc}"
        print(f"lmforge kernels for {built.arch}: {built.path} ({state})")
        return 0
    if args.action == "selftest":
        progress.info("compiling and running the kernels' selftest (about 30 s) …")
        code, output = run_selftest(args.arch, args.timeout)
        print(output.rstrip())
        return 0 if code == 0 else 1
    arch = detect_arch()
    nvcc = find_nvcc()
    print(f"cache      {cache_root()}")
    print(f"nvcc       {nvcc or 'not found (pip install lmforge[kernels])'}")
    print(f"GPU        {arch or 'none found'}")
    if arch is None:
        print("kernels    not used: no GPU (the ONNX sampler serves)")
        return 0
    path = library_path(arch)
    if path.is_file():
        print(f"kernels    {path} (CUDA sessions use it; LMFORGE_KERNELS=0 turns it off)")
        print("ops        FusedSample (sampling), SiluMul (SwiGLU gates of CUDA fp16 artifacts; "
              "LMFORGE_KERNELS_SILU=0 keeps their ONNX nodes)")
    else:
        print(f"kernels    not built for {arch}: run `lmforge kernels build` (the ONNX sampler serves until then)")
    return 0
