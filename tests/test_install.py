"""Install sets: ``pip install lmforge`` is the runtime alone; the toolchain is the ``export`` extra.

The fast tests read pyproject.toml and drive the CLI with the toolchain hidden. The slow test
builds the wheel, installs it with only its four runtime dependencies into a fresh venv, and
generates from the tiny-llama artifact there: the promise docs/architecture.md makes to services.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from lmforge.cli import EXTRA_OF_MODULE, main

REPO = Path(__file__).resolve().parents[1]
BASE = {"onnxruntime", "numpy", "tokenizers", "jinja2"}
TOOLCHAIN = {"torch", "transformers", "onnx", "onnxscript", "onnx-ir", "optimum", "polygraphy",
             "onnx-graphsurgeon", "gguf", "accelerate", "safetensors", "matplotlib"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def test_base_install_is_the_runtime_alone() -> None:
    project = _project()["project"]
    assert {_name(r) for r in project["dependencies"]} == BASE
    extras = project["optional-dependencies"]
    assert TOOLCHAIN <= {_name(r) for r in extras["export"]}
    assert {_name(r) for r in extras["cuda"]} == {"onnxruntime-gpu"}
    assert {"fastapi", "uvicorn", "prometheus-client", "httpx"} <= {_name(r) for r in extras["serve"]}
    assert {"pytest", "openai", "ruff", "fastapi", "onnxruntime-genai"} <= {_name(r) for r in extras["dev"]}


def test_torch_is_a_range_not_one_build() -> None:
    (torch,) = [r for r in _project()["project"]["optional-dependencies"]["export"] if _name(r) == "torch"]
    assert "==" not in torch and ">=" in torch and "<" in torch, torch
    # the CPU wheel is the Makefile's choice, through a constraints file
    assert "torch==2.13.*" in (REPO / "constraints" / "cpu.txt").read_text()
    assert "-c $(CONSTRAINTS)" in (REPO / "Makefile").read_text()


def test_license_is_an_spdx_string() -> None:
    data = _project()
    assert data["project"]["license"] == "Apache-2.0"
    (setuptools,) = [r for r in data["build-system"]["requires"] if _name(r) == "setuptools"]
    assert int(re.search(r">=(\d+)", setuptools).group(1)) >= 77  # the first with SPDX license strings


def test_every_extra_the_cli_names_exists() -> None:
    extras = set(_project()["project"]["optional-dependencies"])
    assert set(EXTRA_OF_MODULE.values()) <= extras


_TOOLCHAIN_MODULES = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "optimum", "polygraphy",
                      "onnx_graphsurgeon", "gguf", "tqdm", "matplotlib")
_OUR_TOOLCHAIN_PACKAGES = ("exporters", "passes", "parity", "lmforge.benchmark")


@pytest.fixture()
def without_toolchain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import torch`` (and the rest of the export extra) fail as on a base install."""
    for name in list(sys.modules):
        if name.split(".")[0] in _TOOLCHAIN_MODULES or name.startswith(_OUR_TOOLCHAIN_PACKAGES):
            monkeypatch.delitem(sys.modules, name)
    for name in _TOOLCHAIN_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ModuleNotFoundError


@pytest.mark.parametrize("argv", [
    ["convert", "tiny:llama", "-o", "{tmp}/out"],
    ["optimize", "{art}", "-o", "{tmp}/out"],
    ["verify", "{art}"],
    ["bench", "{art}"],
])
def test_command_without_its_extra_names_it(argv: list[str], tiny_llama: Path, tmp_path: Path,
                                            without_toolchain: None, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([a.format(tmp=tmp_path, art=tiny_llama) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lmforge {argv[0]}: error: this command needs the 'export' extra"), lines[0]
    assert "pip install 'lmforge[export]'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_unrelated_missing_module_still_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only our extras' modules become the one-line hint; a bug importing something else stays loud."""
    import lmforge.cmd_inspect as cmd_inspect

    def broken(args: object) -> int:
        import no_such_module_anywhere  # noqa: F401

        return 0

    monkeypatch.setattr(cmd_inspect, "run", broken)  # register() binds `run` when the parser is built
    with pytest.raises(ModuleNotFoundError, match="no_such_module_anywhere"):
        main(["inspect", "x"])


# ------------------------------------------------------------------------------------------------
# A fresh venv with the base install only


def _run(cmd: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


def _tree_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


@pytest.mark.slow
def test_fresh_venv_with_the_base_install_generates(tiny_llama: Path, tmp_path: Path) -> None:
    """Build the wheel, install it with its four runtime dependencies only, generate from tiny-llama.

    Bounded: the wheel build and the installs run under timeouts (pip takes the dependencies from
    its cache when they are there). Prints the venv's size and the import time of ``runtime``.
    """
    started = time.perf_counter()
    wheels = tmp_path / "wheels"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(wheels), str(REPO)], timeout=180, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("lmforge-*.whl")

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=60)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # pip from the outer interpreter, aimed at the new venv: no pip bootstrap inside it.
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check"]
    installed = _run([*pip, "--no-deps", str(wheel)], timeout=120)
    assert installed.returncode == 0, installed.stderr[-2000:]
    metadata = _run([str(python), "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('lmforge')))"],
                    timeout=60)
    base_requirements = [r for r in metadata.stdout.splitlines() if "extra ==" not in r]
    assert {_name(r) for r in base_requirements} == BASE, metadata.stdout
    deps = _run([*pip, *base_requirements], timeout=300)
    assert deps.returncode == 0, deps.stderr[-2000:]

    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    probe = (
        "import json, sys, time\n"
        "t0 = time.perf_counter()\n"
        "from runtime import Engine\n"
        "t1 = time.perf_counter()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxscript', 'optimum') if m in sys.modules)\n"
        "print(json.dumps({'import_s': t1 - t0, 'heavy': heavy, 'runtime': sys.modules['runtime'].__file__}))\n"
    )
    imported = _run([str(python), "-c", probe], timeout=120, cwd=tmp_path, env=env)
    assert imported.returncode == 0, imported.stderr[-2000:]
    facts = json.loads(imported.stdout.strip().splitlines()[-1])
    assert facts["heavy"] == []
    assert str(venv) in facts["runtime"]  # the installed wheel, not the checkout

    lmforge = venv / "bin" / "lmforge"
    generated = _run([str(lmforge), "generate", str(tiny_llama), "Hello", "--max-new-tokens", "4", "--no-stream"],
                     timeout=120, cwd=tmp_path, env=env)
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout.endswith("\n") and "Traceback" not in generated.stderr

    refused = _run([str(lmforge), "convert", "tiny:llama", "-o", str(tmp_path / "out")], timeout=60,
                   cwd=tmp_path, env=env)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert re.fullmatch(r"lmforge convert: error: this command needs the 'export' extra \| got \w+ is not "
                        r"installed \| pip install 'lmforge\[export\]'", line), line

    site = next((venv / "lib").glob("python3*/site-packages"))
    print(f"\nbase install: {_tree_mib(site):.0f} MiB in site-packages, `from runtime import Engine` "
          f"{facts['import_s'] * 1e3:.0f} ms, test {time.perf_counter() - started:.0f} s")
