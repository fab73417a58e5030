"""The ``max_context`` that ``convert`` records in the manifest (``architecture.max_context``).

The runtime sizes requests (and, for shared-buffer artifacts, KV buffers) by this number, so it is
checked as written: the default for a tiny source, a value given with ``--max-context`` (below,
at and beyond the model's trained positions), and the refusal past learned positions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from exporters.specs import get_spec
from lmforge.cli import main


def recorded(artifact: Path) -> int:
    return json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))["architecture"]["max_context"]


def trained_positions(arch: str) -> int:
    config = get_spec(arch).tiny_config
    return int(config.get("max_position_embeddings") or config["n_positions"])


def convert(tmp_path: Path, source: str, *flags: str) -> tuple[int, Path]:
    out = tmp_path / source.replace(":", "-")
    return main(["-q", "convert", source, "-o", str(out), *flags]), out


def test_default_is_the_trained_positions_when_shorter_than_the_spec_default(tiny_llama: Path) -> None:
    # tiny:llama is trained on 512 positions; the Llama spec's default is 8192: the artifact gets 512
    trained, default = trained_positions("llama"), get_spec("llama").default_max_context
    assert trained < default  # the premise: the smaller of the two must win
    assert recorded(tiny_llama) == trained


def test_learned_positions_accept_exactly_their_length(tmp_path: Path) -> None:
    limit = trained_positions("gpt2")  # 256 learned positions
    assert limit < get_spec("gpt2").default_max_context  # so the default is not what is checked
    code, out = convert(tmp_path, "tiny:gpt2", "--max-context", str(limit))
    assert code == 0
    assert recorded(out) == limit


def test_rotary_positions_may_be_asked_beyond_training_with_a_warning(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    trained = trained_positions("llama")
    with caplog.at_level(logging.WARNING, logger="exporters.convert"):
        code, out = convert(tmp_path, "tiny:llama", "--max-context", str(2 * trained))
    assert code == 0
    assert recorded(out) == 2 * trained
    assert any(f"exceeds the model's trained {trained} positions" in r.getMessage() for r in caplog.records)


def test_learned_positions_refuse_a_longer_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    limit = trained_positions("gpt2")
    code, out = convert(tmp_path, "tiny:gpt2", "--max-context", str(limit + 1))
    err = capsys.readouterr().err
    assert code == 2
    assert "learned positions" in err and f"≤ {limit}" in err and f"--max-context {limit}" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
