"""What a person waiting on a long command sees when stderr is not a terminal (``make demo`` piped
to a log, CI): convert's stages with their elapsed time, on the ``lmforge.progress`` logger that the
command line prints at its default verbosity and hides under ``-q``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from lmforge.cli import PROGRESS_LOGGER, main


def test_convert_prints_each_stage_and_its_elapsed_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "tiny:llama", "-o", str(tmp_path / "out")]) == 0  # capsys: stderr is no terminal
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    stages = ["loading tiny:llama", "exporting to ONNX", "checking ONNX against PyTorch",
              "writing tokenizer and manifest"]
    expected = []
    for i, stage in enumerate(stages, start=1):
        expected += [re.escape(f"[{i}/4] {stage} …"), re.escape(f"[{i}/4] {stage}: ") + r"\d+\.\d s"]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(pattern, line), (line, pattern)
    export_seconds = float(lines[3].rsplit(": ", 1)[1][:-2])
    assert export_seconds > 0.5  # the elapsed time is the stage's, not zero (a tiny export takes ~15 s)


@pytest.mark.parametrize("flags, shown", [([], True), (["-q"], False), (["-v"], True)])
def test_progress_lines_are_shown_unless_quiet(tiny_llama: Path, capsys: pytest.CaptureFixture[str],
                                               flags: list[str], shown: bool) -> None:
    assert main([*flags, "inspect", str(tiny_llama)]) == 0
    capsys.readouterr()
    logging.getLogger(PROGRESS_LOGGER).info("[1/2] waiting …")
    err = capsys.readouterr().err
    assert ("[1/2] waiting …\n" in err) is shown
    assert err.count("waiting") <= 1  # once, with no "INFO name:" prefix, also under -v
