"""Bad input that used to escape as a traceback or data loss (issue 14): each answered in one line.

Every test here reproduced its problem before the fix (noted per test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from runtime.artifact import BUILD_MARKER, MANIFEST_NAME, load_artifact, sha256_file, write_artifact
from runtime.errors import ArtifactError, InvalidRequestError, ParityError

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("lmforge ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def notes_folder(parent: Path) -> Path:
    folder = parent / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("precious")
    (folder / "sub").mkdir()
    (folder / "sub" / "more.txt").write_text("also precious")
    return folder


def assert_notes_intact(folder: Path) -> None:
    assert (folder / "todo.txt").read_text() == "precious"
    assert (folder / "sub" / "more.txt").read_text() == "also precious"


# ------------------------------------------------------------------------------------------------
# --force replaces an artifact, never a folder of someone's files (was: deleted, exit 0)


def test_optimize_force_refuses_a_folder_that_is_not_an_artifact(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = notes_folder(tmp_path)
    code, err = run_cli(capsys, "optimize", str(tiny_llama), "-o", str(notes), "--force")
    one_line_error(code, err, "not an lmforge artifact", "--force replaces only an artifact")
    assert_notes_intact(notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temporary folders left


def test_convert_force_refuses_a_folder_that_is_not_an_artifact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = notes_folder(tmp_path)
    code, err = run_cli(capsys, "convert", "tiny:llama", "-o", str(notes), "--force")
    one_line_error(code, err, "not an lmforge artifact")
    assert_notes_intact(notes)


def test_force_still_replaces_an_artifact_and_an_empty_folder(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    shutil.copytree(tiny_llama, out)
    (out / "stale.txt").write_text("from an older build")
    with write_artifact(out, force=True) as tmp:
        (tmp / MANIFEST_NAME).write_text(json.dumps({"format_version": 1}))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]
    empty = tmp_path / "empty"
    empty.mkdir()
    with write_artifact(empty, force=True) as tmp:
        (tmp / MANIFEST_NAME).write_text(json.dumps({"format_version": 1}))
    assert (empty / MANIFEST_NAME).is_file()


def test_output_that_is_a_file_is_refused_even_with_force(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not a folder"):
        with write_artifact(target, force=True):
            pass
    assert target.read_text() == "x"


# ------------------------------------------------------------------------------------------------
# optimize -o with a bad parent (was: FileNotFoundError / NotADirectoryError traceback)


def test_optimize_into_a_missing_parent_makes_it_like_convert(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "missing" / "parent" / "out"
    code, err = run_cli(capsys, "-q", "optimize", str(tiny_llama), "-o", str(out), "--no-fuse")
    assert code == 0, err
    assert load_artifact(out).precision == "fp32"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_optimize_with_a_file_as_parent(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(capsys, "optimize", str(tiny_llama), "-o", str(blocker / "out"))
    one_line_error(code, err, "cannot write to", "writable output location")
    assert blocker.read_text() == "not a folder"


def test_optimize_with_an_unwritable_parent(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # /proc refuses new folders even to root (a chmod'ed folder would not stop root).
    code, err = run_cli(capsys, "optimize", str(tiny_llama), "-o", "/proc/lmforge-no-such/out")
    one_line_error(code, err, "cannot write to", "writable output location")


# ------------------------------------------------------------------------------------------------
# hand-edited manifests (was: AttributeError / KeyError traceback)


def _edit_manifest(src: Path, dst: Path, edit: object) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    edit(manifest)  # type: ignore[operator]
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dst


def test_manifest_files_as_a_list(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    art = _edit_manifest(tiny_llama, tmp_path / "a", lambda m: m.update(files=list(m["files"])))
    with pytest.raises(ArtifactError, match="'files' is not a mapping"):
        load_artifact(art)
    code, err = run_cli(capsys, "inspect", str(art))
    one_line_error(code, err, "'files' is not a mapping")


def test_manifest_architecture_without_vocab(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = _edit_manifest(tiny_llama, tmp_path / "a", lambda m: m["architecture"].pop("vocab"))
    with pytest.raises(ArtifactError, match="'architecture' lacks 'vocab'"):
        load_artifact(art)
    code, err = run_cli(capsys, "generate", str(art), "hi", "--max-new-tokens", "2")
    one_line_error(code, err, "lacks 'vocab'")


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["files"].update({"model.onnx": "abc"}), "entry for 'model.onnx'"),
    (lambda m: m["architecture"].update(layers="2"), "'architecture.layers' is not a positive integer"),
    (lambda m: m.update(architecture=[1, 2]), "'architecture' is not a mapping"),
    (lambda m: m.update(io={"inputs": 3}), "'io' is malformed"),
])
def test_other_manifest_shapes(tiny_llama: Path, tmp_path: Path, edit: object, needle: str) -> None:
    art = _edit_manifest(tiny_llama, tmp_path / "a", edit)
    with pytest.raises(ArtifactError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_artifact(art)


# ------------------------------------------------------------------------------------------------
# stale OUT.tmp-* folders of a killed build (was: never removed)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_build(parent: Path, name: str, marker: dict | None) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"half")
    if marker is not None:
        (folder / BUILD_MARKER).write_text(json.dumps(marker))
    return folder


def test_stale_builds_of_the_same_output_are_removed(tmp_path: Path) -> None:
    import socket

    host = socket.gethostname()
    stale = _fake_build(tmp_path, "out.tmp-abcd1234", {"pid": _dead_pid(), "host": host})
    running = _fake_build(tmp_path, "out.tmp-live5678", {"pid": os.getpid(), "host": host})
    elsewhere = _fake_build(tmp_path, "out.tmp-other999", {"pid": _dead_pid(), "host": host + "-other"})
    unmarked = _fake_build(tmp_path, "out.tmp-nomark00", None)
    other_target = _fake_build(tmp_path, "out2.tmp-abcd1234", {"pid": _dead_pid(), "host": host})
    odd_name = _fake_build(tmp_path, "out.tmp-abcd1234x", {"pid": _dead_pid(), "host": host})
    with write_artifact(tmp_path / "out") as tmp:
        assert (tmp / BUILD_MARKER).is_file()  # a build in progress carries the marker …
        (tmp / MANIFEST_NAME).write_text(json.dumps({"format_version": 1}))
    assert not stale.exists()
    for kept in (running, elsewhere, unmarked, other_target, odd_name):
        assert kept.exists(), kept
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert BUILD_MARKER not in manifest["files"]  # … the finished artifact does not
    assert not (tmp_path / "out" / BUILD_MARKER).exists()


def test_killed_convert_leaves_a_marked_folder_that_the_next_run_removes(tmp_path: Path) -> None:
    """kill -9 in the middle of a real convert; the next convert of the same output cleans up."""
    import signal
    import time

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "-q", "convert", "tiny:llama", "-o", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob(f"out.tmp-*/{BUILD_MARKER}")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith("out.tmp-")]
    assert len(left) == 1 and (left[0] / BUILD_MARKER).is_file()
    code = subprocess.run([sys.executable, "-m", "lmforge", "-q", "convert", "tiny:llama", "-o", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, timeout=300).returncode
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------------------
# onnxruntime's refusal keeps its cause (was: cut before "Unsupported model IR version")


def _model_with_ir(path: Path, ir_version: int) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = ir_version
    onnx.save(model, str(path))
    return path


def test_error_line_keeps_onnxruntime_s_cause(tmp_path: Path) -> None:
    import onnxruntime as ort

    from runtime.text import error_line

    deep = tmp_path / ("a-long-folder-name-" * 8)
    deep.mkdir()
    model = _model_with_ir(deep / "model.onnx", 99)
    with pytest.raises(Exception) as caught:
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert "Unsupported model IR version" not in str(caught.value).splitlines()[0][:300]  # the old cut
    line = error_line(caught.value)
    assert "\n" not in line and len(line) <= 400
    assert "Unsupported model IR version: 99" in line
    assert "onnxruntime_src" not in line and "onnxruntime::" not in line


def test_generate_names_why_onnxruntime_refused_the_model(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    art = tmp_path / ("a-long-artifact-folder-name-" * 6)
    shutil.copytree(tiny_llama, art)
    proto = onnx.load(str(art / "model.onnx"), load_external_data=False)
    proto.ir_version = 99
    onnx.save_model(proto, str(art / "model.onnx"))
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"]["model.onnx"] = {"size": (art / "model.onnx").stat().st_size,
                                       "sha256": sha256_file(art / "model.onnx")}
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "generate", str(art), "hi", "--max-new-tokens", "2")
    one_line_error(code, err, "Unsupported model IR version: 99")


# ------------------------------------------------------------------------------------------------
# -q silences the toolchain's Python warnings (was: torch/transformers warnings printed)


def test_quiet_convert_prints_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, "-m", "lmforge", "-q", "convert", "tiny:gpt2", "-o", str(tmp_path / "o")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == "" and done.stdout == ""


# ------------------------------------------------------------------------------------------------
# lone surrogates in prompts (was: TypeError from the tokenizer)


def test_generate_refuses_a_lone_surrogate(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "generate", str(tiny_llama), "abc \ud800", "--max-new-tokens", "2")
    one_line_error(code, err, "lone surrogate U+D800 at character 4")


def test_generate_refuses_a_non_utf8_argument(tiny_llama: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"}
    done = subprocess.run([sys.executable.encode(), b"-m", b"lmforge", b"generate", os.fsencode(tiny_llama),
                           b"caf\xe9 ok", b"--max-new-tokens", b"2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    one_line_error(done.returncode, done.stderr, "lone surrogate U+DCE9 at character 3")


def test_prompts_file_with_a_lone_surrogate(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from parity.prompts import load_prompts

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "ok", "prompt": "fine", "chat": false}\n'
                       '{"id": "bad", "prompt": "abc \\ud800", "chat": false}\n', encoding="utf-8")
    with pytest.raises(ParityError, match=r"line 2: field 'prompt' holds a lone surrogate U\+D800 at character 4"):
        load_prompts(prompts)
    code, err = run_cli(capsys, "verify", str(tiny_llama), "--prompts", str(prompts))
    one_line_error(code, err, "line 2", "lone surrogate")


def test_check_text() -> None:
    from runtime.text import check_text, lone_surrogate

    assert check_text("héllo 👋", "the prompt") == "héllo 👋"
    assert lone_surrogate("ab\udfffc") == 2 and lone_surrogate("ok") is None
    with pytest.raises(InvalidRequestError, match="the prompt is not valid Unicode.*U\\+DFFF at character 2"):
        check_text("ab\udfffc", "the prompt")
    with pytest.raises(InvalidRequestError, match="must be a string"):
        check_text(5, "the prompt")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# chat content that is not a string (was: TypeError from the template)


def test_normalize_messages_accepts_text_parts() -> None:
    from runtime.chat import normalize_messages, render_chat

    messages = [{"role": "system", "content": "be brief", "name": "s"},
                {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]}]
    assert normalize_messages(messages) == [{"role": "system", "content": "be brief", "name": "s"},
                                            {"role": "user", "content": "Hello, there"}]
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    assert render_chat(template, messages, {}) == "[system]be brief[user]Hello, there"


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": 5}], "message 0's content is not text"),
    ([{"role": "user", "content": None}], "message 0's content is not text"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": 2.5}], "message 1's content is not text"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "part 0 is not text"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}], "part 1 is not text"),
    ([{"content": "no role"}], "message 0 is malformed"),
    ([{"role": "user"}], "message 0 is malformed"),
    ([{"role": "user", "content": "x \ud800"}], "lone surrogate"),
    ([], "non-empty list"),
])
def test_normalize_messages_refuses(messages: list, needle: str) -> None:
    from runtime.chat import normalize_messages, render_chat

    with pytest.raises(InvalidRequestError, match=needle.replace("(", r"\(")):
        normalize_messages(messages)
    with pytest.raises(InvalidRequestError, match=needle.replace("(", r"\(")):
        render_chat("{{ messages }}", messages, {})


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_ignores_library_warnings(quiet: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """-q drops the Python warnings a command's libraries raise; without it they still show."""
    import warnings

    import lmforge.cmd_inspect as cmd_inspect

    seen: list[str | None] = []

    def noisy(args: object) -> int:
        seen.append(os.environ.get("TRANSFORMERS_VERBOSITY"))  # what an `import transformers` here reads
        warnings.warn("torch says something about its internals", FutureWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cmd_inspect, "run", noisy)
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "x")
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*(["-q"] if quiet else []), "inspect", "x"]) == 0
    assert len(caught) == (0 if quiet else 1)
    assert seen == (["error"] if quiet else [None])
    assert "TRANSFORMERS_VERBOSITY" not in os.environ  # restored: no leak into later commands


# ------------------------------------------------------------------------------------------------
# tests that bite: the resolve-inside check, fed the one input only it catches


def test_symlink_to_an_identical_file_outside_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    """Same bytes, same size, same sha256 — only the resolve-inside-the-folder check can refuse it."""
    art = tmp_path / "art"
    shutil.copytree(tiny_llama, art)
    outside = tmp_path / "elsewhere" / "tokenizer.json"
    outside.parent.mkdir()
    shutil.move(art / "tokenizer" / "tokenizer.json", outside)
    (art / "tokenizer" / "tokenizer.json").symlink_to(outside)
    assert sha256_file(art / "tokenizer" / "tokenizer.json") == sha256_file(outside)
    with pytest.raises(ArtifactError, match="resolves outside the folder"):
        load_artifact(art)
