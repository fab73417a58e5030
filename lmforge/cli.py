"""The ``lmforge`` command line: maps flags onto the packages' APIs.

Each sub-command lives in its own module ``lmforge/cmd_<name>.py`` exposing
``register(subparsers) -> None`` (which sets ``func`` on its parser) and a ``run(args) -> int``.
Every :class:`runtime.errors.LmforgeError` becomes one line on stderr and exit code 2; a traceback
is shown only with ``--debug``. A command that needs an optional part of lmforge which is not
installed (torch for ``convert``, fastapi for ``serve``) says which extra to install, also as one
line with exit code 2: the commands import their toolchain lazily, so the ``ModuleNotFoundError``
is caught here once rather than in every command.

Logging: lmforge's libraries log to their module loggers, shown from ``-v`` (INFO) or ``--debug``
on. One logger is for the person waiting: ``lmforge.progress`` carries the stages of a long step
with their elapsed time and the expected duration of a long run (convert's stages when stderr is
not a terminal, verify's PyTorch reference). The command line prints it as plain lines on stderr at
the default verbosity; ``-q`` hides it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from runtime.errors import LmforgeError, format_message

__all__ = ["main", "build_parser", "EXTRA_OF_MODULE", "PROGRESS_LOGGER", "missing_extra"]

PROGRESS_LOGGER = "lmforge.progress"

COMMANDS = ("convert", "optimize", "verify", "generate", "bench", "inspect", "serve", "bench-serve", "tune", "kernels")

# Top-level import name → the pyproject extra that installs it (pyproject.toml, docs/install.md).
EXTRA_OF_MODULE: dict[str, str] = {
    **dict.fromkeys(
        ("torch", "transformers", "optimum", "onnx", "onnxscript", "onnx_ir", "polygraphy",
         "onnx_graphsurgeon", "gguf", "accelerate", "safetensors", "tqdm", "matplotlib", "huggingface_hub"),
        "export",
    ),
    **dict.fromkeys(("fastapi", "uvicorn", "prometheus_client", "httpx", "starlette", "aiohttp", "zmq", "msgpack"),
                    "serve"),
    "onnxruntime_genai": "bench",
    "ray": "ray",
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that provides the module ``exc`` could not import, or None when it is not ours."""
    name = (exc.name or "").split(".")[0]
    return EXTRA_OF_MODULE.get(name)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (as logging's last resort does),
    so that a handler installed by one ``main()`` call never writes to a stream replaced since."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _show_progress(level: int) -> None:
    """Print ``lmforge.progress`` records from ``level`` on as plain lines on stderr (installed once)."""
    logger = logging.getLogger(PROGRESS_LOGGER)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False  # not twice, with the root handler's "INFO name:" prefix, under -v
    logger.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    from lmforge import __version__

    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Turn a Hugging Face transformer into a fast, verified ONNX Runtime artifact.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lmforge.cmd_{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lmforge.cmd_{name.replace('-', '_')}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = ["lmforge", *(sys.argv[1:] if argv is None else argv)]  # the command line, for reports
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "transformers", "onnxscript", "onnx_ir", "httpx", "urllib3", "matplotlib", "PIL"):
        if not args.debug:
            logging.getLogger(noisy).setLevel(logging.ERROR)
    quiet = args.quiet and not args.debug
    _show_progress(logging.WARNING if quiet else logging.DEBUG if args.debug else logging.INFO)
    # transformers sets its own logger's level when it is imported (inside the command), from
    # TRANSFORMERS_VERBOSITY; under -q its warning_once lines would print anyway. Restored after.
    verbosity = os.environ.get("TRANSFORMERS_VERBOSITY")
    if quiet and verbosity is None:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        with warnings.catch_warnings():
            if quiet:
                # -q: "only warnings and errors" means lmforge's own; the Python warnings that
                # torch, transformers and onnxscript raise (UserWarning, FutureWarning, …) are
                # about their internals, not the user's input. lmforge's warnings are log records.
                warnings.simplefilter("ignore")
            return int(args.func(args) or 0)
    except LmforgeError as exc:
        if args.debug:
            raise
        print(f"lmforge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None or args.debug:
            raise
        message = format_message(f"this command needs the '{extra}' extra", got=f"{exc.name} is not installed",
                                 fix=f"pip install 'lmforge[{extra}]'")
        print(f"lmforge {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if quiet and verbosity is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
