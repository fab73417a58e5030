from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from parity.prompts import Prompt, default_prompts_path, load_prompts, smoke_prompts_path
from runtime.errors import ParityError


def write(tmp_path: Path, text: str | bytes, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


GOOD = '{"id": "a", "prompt": "Hello", "chat": false}\n'


# --- the loader -------------------------------------------------------------------------------


def test_loads_prompts_in_order_skipping_blank_lines_and_extra_keys(tmp_path):
    path = write(
        tmp_path,
        GOOD + "\n   \n" + '{"id": "b-2.x_y", "prompt": "Bonjour\\n\\tà vous", "chat": true, "note": "ignored"}\r\n',
    )
    assert load_prompts(path) == [Prompt("a", "Hello", False), Prompt("b-2.x_y", "Bonjour\n\tà vous", True)]


def test_unescaped_unicode_line_separators_stay_inside_a_prompt(tmp_path):
    path = write(tmp_path, '{"id": "a", "prompt": "one\u2028two\u2029three\x85four", "chat": false}\n')
    assert load_prompts(path)[0].prompt == "one\u2028two\u2029three\x85four"


def test_prompt_is_frozen():
    with pytest.raises(AttributeError):
        Prompt("a", "b", False).id = "c"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GOOD + "{not json\n", r"is not JSON Lines: line 2 is not valid JSON"),
        (GOOD + '"just a string"\n', r"line 2 is a JSON str, not an object"),
        ('[1, 2]\n', r"line 1 is a JSON list, not an object"),
        ('{"id": "a", "prompt": "x"}\n', r"line 1: field 'chat' is missing"),
        (GOOD + '{"prompt": "x", "chat": true}\n', r"line 2: field 'id' is missing"),
        ('{"id": "a", "chat": true}\n', r"line 1: field 'prompt' is missing"),
        ('{"id": "a", "prompt": "x", "chat": "yes"}\n', r"line 1: field 'chat' must be a JSON boolean, got \"yes\""),
        ('{"id": "a", "prompt": "x", "chat": 1}\n', r"field 'chat' must be a JSON boolean, got 1"),
        ('{"id": "a", "prompt": 5, "chat": true}\n', r"line 1: field 'prompt' must be a JSON string, got 5"),
        ('{"id": 7, "prompt": "x", "chat": true}\n', r"line 1: field 'id' must be a JSON string, got 7"),
        ('{"id": "a b", "prompt": "x", "chat": true}\n', r"line 1: field 'id' must be non-empty and use only"),
        ('{"id": "", "prompt": "x", "chat": true}\n', r"field 'id' must be non-empty"),
        ('{"id": "a", "prompt": "", "chat": true}\n', r"line 1: field 'prompt' is empty"),
        (GOOD + '{"id": "b", "prompt": "x", "chat": true}\n' + GOOD, r"line 3: duplicate id 'a' \(first on line 1\)"),
        ("", r"is empty"),
        ("\n  \n\n", r"is empty"),
    ],
)
def test_bad_prompt_files_are_refused_with_one_line(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(ParityError, match=message) as info:
        load_prompts(path)
    text = str(info.value)
    assert "\n" not in text
    assert str(path) in text


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(ParityError, match=r"prompts file .*nope.jsonl does not exist .*--prompts"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ParityError, match=r"is a folder"):
        load_prompts(tmp_path)


def test_non_utf8_file_is_refused(tmp_path):
    path = write(tmp_path, '{"id": "a", "prompt": "caf\xe9", "chat": false}\n'.encode("latin-1"))
    with pytest.raises(ParityError, match=r"is not UTF-8"):
        load_prompts(path)


# --- the committed sets -----------------------------------------------------------------------


def _scripts(text: str) -> set[str]:
    found = set()
    for ch in text:
        name = unicodedata.name(ch, "")
        for script in ("CJK", "HIRAGANA", "CYRILLIC", "ARABIC", "HANGUL", "DEVANAGARI", "HEBREW"):
            if name.startswith(script):
                found.add(script)
    return found


def test_default_set_is_large_and_varied():
    prompts = load_prompts(default_prompts_path())
    assert len(prompts) >= 40
    chat = [p for p in prompts if p.chat]
    assert 10 <= len(chat) <= len(prompts) - 10
    # a few long prompts (~600-1,000 tokens measured with the SmolLM2 tokenizer), both chat and raw
    long = [p for p in prompts if len(p.prompt) >= 1500]
    assert len(long) >= 5 and any(p.chat for p in long) and any(not p.chat for p in long)
    assert sum(len(p.prompt) < 60 for p in prompts) >= 10
    # long texts are real text, not one sentence repeated
    for p in long:
        pieces = [s.strip() for s in re.split(r"[.!?。；\n]", p.prompt) if len(s.strip()) >= 12]
        assert len(pieces) >= 8 and len(set(pieces)) >= 0.9 * len(pieces), p.id
    text = "".join(p.prompt for p in prompts)
    assert _scripts(text) >= {"CJK", "HIRAGANA", "CYRILLIC", "ARABIC", "HANGUL", "DEVANAGARI", "HEBREW"}
    for needle in ("def ", "function ", "SELECT ", "\t", "   ", "\u200d", "\u202e", "\u0301", "\r"):
        assert needle in text, needle
    assert any(re.search(r"\d+ [+×] \d+", p.prompt) for p in prompts)
    assert any(unicodedata.category(ch) == "So" for ch in text)  # emoji


def test_smoke_set_is_six_short_prompts_from_the_default_set():
    smoke = load_prompts(smoke_prompts_path())
    default = {p.id: p for p in load_prompts(default_prompts_path())}
    assert len(smoke) == 6
    assert {p.chat for p in smoke} == {True, False}
    assert all(len(p.prompt) < 200 for p in smoke)
    for p in smoke:  # same id, same text: references cached for one serve the other
        assert default[p.id] == p


def test_committed_files_are_plain_jsonl():
    for path in (default_prompts_path(), smoke_prompts_path()):
        raw = path.read_bytes()
        assert raw.endswith(b"\n") and b"\r\n" not in raw
        assert path.suffix == ".jsonl" and path.parent.name == "prompts"
