"""``lmforge serve ENCODER --instances N``: one port, N pinned workers that both answer, SIGTERM stops
them all; and the command line's refusals (exit code 2, one line)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from lmforge.cli import main  # noqa: E402
from runtime.cpu import available_cores, format_cpus, parse_cpus, split_cores  # noqa: E402
from runtime.encoder import Encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _allowed_cpus(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return parse_cpus(re.search(r"^Cpus_allowed_list:\s*(\S+)", text, re.M).group(1))  # type: ignore[union-attr]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


@pytest.mark.skipif(len(available_cores()) < 2 or not Path("/proc/self/status").exists(),
                    reason="needs 2 cores and Linux /proc")
def test_two_pinned_instances_share_one_port_and_stop_on_sigterm(minilm: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LMFORGE_CPUS", None)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(minilm), "--instances", "2", "--port", "0",
                             "--served-model-name", "m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    pids: list[int] = []
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "lmforge serve: m on http://127.0.0.1:" in line and "2 instances" in line, (line, proc.stderr)
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        assert int(url.rsplit(":", 1)[1]) > 0  # the real port, not 0
        slices = split_cores(available_cores(), 2)
        found = re.findall(r"(\d+): CPUs (\S+) pid (\d+)", line)
        assert [(int(i), parse_cpus(c)) for i, c, _ in found] == [(0, slices[0]), (1, slices[1])]
        pids = [int(p) for *_, p in found]
        for pid, cpus in zip(pids, slices):  # each worker pinned to its own slice, read back from the kernel
            assert _allowed_cpus(pid) == cpus, (pid, format_cpus(cpus))
        assert _allowed_cpus(proc.pid) == available_cores()  # the parent is not narrowed

        encoder = Encoder.load(minilm, threads=1)
        want = encoder.encode(["a sentence", "another one"])
        encoder.close()
        workers: list[str] = []
        errors: list[BaseException] = []

        def client(n: int) -> None:
            try:
                for _ in range(n):
                    with httpx.Client(timeout=30) as c:  # a new connection each time
                        r = c.post(url + "/v1/embeddings", json={"model": "m", "input": ["a sentence", "another one"],
                                                                 "encoding_format": "float"})
                    assert r.status_code == 200, r.text
                    np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], want, atol=1e-5, rtol=0)
                    workers.append(r.headers["x-lmforge-worker"])
            except BaseException as exc:  # noqa: BLE001 — asserted below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(6,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(set(workers)) == ["0", "1"], workers  # both instances answered
        metrics = httpx.get(url + "/metrics").text
        assert re.search(r'lmforge_worker_info\{pid="(\d+)",worker="[01]"\} 1\.0', metrics)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "lmforge serve: stopped" in proc.stderr.read()  # type: ignore[union-attr]
        assert all(_gone(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("extra, needle", [
    (["--instances", "0"], "invalid --instances | expected an integer >= 1 | got 0"),
    (["--instances", "999"], "invalid --instances | expected 1 to"),
    (["--instances", "2", "--device", "cuda"], "--instances 2 with --device cuda"),
])
def test_bad_instances_exit_2_with_one_line(tiny_bert: Path, extra: list[str], needle: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    if extra[1] == "2" and len(available_cores()) < 2:
        pytest.skip("needs 2 cores")
    assert main(["serve", str(tiny_bert), "--port", "0", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


@pytest.mark.skipif(len(available_cores()) < 2, reason="needs 2 cores")
def test_threads_above_the_slice_exit_2(tiny_bert: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tiny_bert), "--port", "0", "--instances", "2", "--threads", "2"]) == 2
    err = capsys.readouterr().err
    assert "invalid --threads" in err and err.count("\n") == 1


@pytest.mark.skipif(len(available_cores()) < 2, reason="needs 2 cores")
def test_a_worker_that_fails_to_start_fails_the_command(tiny_bert: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    model = broken / "model.onnx"
    model.write_bytes(b"\0" * model.stat().st_size)  # same size, not a model: the parent's unhashed check passes
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(broken), "--instances", "2", "--port", "0",
                           "--no-verify-hashes"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge serve: error: worker ") and "failed to start" in last, done.stderr
