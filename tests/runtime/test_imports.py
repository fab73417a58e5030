"""``runtime`` loads and samples with torch, transformers and onnx made unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCKER = textwrap.dedent(
    """
    import sys
    class _Block:
        BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "optimum")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def run_blocked(body: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_runtime_imports_without_torch_transformers_onnx() -> None:
    proc = run_blocked(
        """
        import numpy as np
        import runtime, runtime.engine, runtime.sampling, runtime.chat, runtime.detokenize
        from runtime.sampling import Sampler
        from runtime import SamplingParams
        ids = Sampler().sample(np.array([[0.0, 3.0, 1.0]], np.float32), [SamplingParams()])
        assert ids.tolist() == [1]
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx"))
        print("LOADED", bad)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout
