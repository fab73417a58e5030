"""``lmforge generate`` on the tiny Llama artifact: the flags reach the engine.

A flag the command parses but does not pass on is silently ignored; each test here runs the command
line twice, with and without the flag, and checks the text changes exactly as the flag says.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import main

# Sampled, so the random tiny model writes varied bytes (greedy repeats one invalid byte); the seed
# makes both runs write the same text up to the stop string.
SAMPLED = ["--max-new-tokens", "60", "--temperature", "1.0", "--seed", "11"]


def generate(capsys: pytest.CaptureFixture[str], artifact: Path, *flags: str) -> str:
    capsys.readouterr()
    assert main(["-q", "generate", str(artifact), "hello", *SAMPLED, *flags]) == 0
    return capsys.readouterr().out


def a_stop_string(text: str) -> tuple[int, str]:
    """The first two characters past the start that occur nowhere earlier (no replacement character)."""
    for at in range(3, len(text) - 3):
        piece = text[at : at + 2]
        if "\ufffd" not in piece and "\n" not in piece and text.find(piece) == at:
            return at, piece
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("mode", [[], ["--no-stream"]], ids=["stream", "no-stream"])
def test_stop_cuts_the_printed_text_before_the_stop_string(tiny_llama: Path, capsys: pytest.CaptureFixture[str],
                                                           mode: list[str]) -> None:
    full = generate(capsys, tiny_llama, *mode)
    assert full.endswith("\n")
    text = full[:-1]
    at, stop = a_stop_string(text)
    cut = generate(capsys, tiny_llama, *mode, "--stop", stop)
    assert cut == text[:at] + "\n", (stop, text)
    assert len(cut) < len(full)


def test_any_of_several_stop_strings_cuts(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = generate(capsys, tiny_llama)[:-1]
    at, stop = a_stop_string(text)
    cut = generate(capsys, tiny_llama, "--stop", "\u2603 never written \u2603", "--stop", stop)
    assert cut == text[:at] + "\n"
