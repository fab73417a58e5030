"""`lmforge serve` as its own process, for the tests that need the real thing, and its error count."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


@contextlib.contextmanager
def serve_process(artifact: Path, *flags: str) -> Iterator[tuple[str, int]]:
    """``lmforge serve ARTIFACT --port 0 FLAGS`` as its own process: (its URL, its pid); it must
    still be running at the end, when it is stopped (SIGTERM, then SIGKILL after 30 s)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("LMFORGE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(artifact), "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert "lmforge serve:" in line, line + proc.stderr.read()  # type: ignore[union-attr]
        yield line.split(" on ", 1)[1].split(" ", 1)[0], proc.pid
        assert proc.poll() is None, "the server died"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_errors(url: str) -> float:
    """The requests the server at ``url`` counted as its own errors (500s, failed streams)."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "lmforge_requests_total" and sample.labels.get("outcome") == "error":
                total += sample.value
    return total
