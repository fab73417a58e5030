"""The peers lmforge is measured against, each a :class:`~lmforge.benchmark.runner.Runner`.

* ``hf`` — transformers eager (``AutoModelForCausalLM``, SDPA attention, dynamic cache) in the
  artifact's precision on the device (fp16 on CUDA, fp32 on the CPU).
* ``hf-compile`` — the same with a static cache and transformers' compiled forward
  (``cache_implementation="static"`` + ``CompileConfig``). On the CPU compiling takes minutes and
  is only run when asked for by name.
* ``genai`` / ``genai-graph`` — onnxruntime-genai on a model its own builder makes from the same
  Hugging Face folder (cached in the work folder), without and with CUDA graphs (CUDA only).
* ``optimum`` — optimum-onnx's ``ORTModelForCausalLM`` with IO binding, in a subprocess whose
  ``PYTHONPATH`` starts with a second site (it needs transformers < 4.58).

Every peer masks EOS the way its library does (transformers ``min_new_tokens``, genai
``min_length``) so each generates exactly ``new_tokens`` tokens, greedy; a peer that cannot do
that here raises :class:`NotRun` with the reason, and the harness reports it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.benchmark.runner import NotRun, Runner, Timing, onnx_weight_bytes
from lmforge.benchmark.source import SharedSource

__all__ = ["PEERS", "HfEagerRunner", "HfCompileRunner", "GenaiRunner", "OptimumRunner", "make_peer"]

log = logging.getLogger(__name__)

PEERS = ("hf", "hf-compile", "genai", "genai-graph", "optimum")
GENAI_INSTALL = "pip install onnxruntime-genai (CPU) or onnxruntime-genai-cuda, matching onnxruntime 1.31"


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# transformers


class HfEagerRunner(Runner):
    """transformers ``generate`` in eager mode; the first token is timed by a streamer's second ``put``
    (transformers moves each step's tokens to the host before ``put``, so that is a device sync)."""

    name = "hf"

    def __init__(self, source: SharedSource, device: str, pad_token_id: int) -> None:
        super().__init__()
        self.source = source
        self.device = device
        self.pad_token_id = pad_token_id
        self.model: Any = None

    def _load(self) -> Any:
        try:
            import torch
        except ImportError as exc:
            raise NotRun("torch is not installed") from exc
        if self.device == "cuda" and not torch.cuda.is_available():
            raise NotRun(f"torch {torch.__version__} does not see a CUDA device")
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        model = copy.deepcopy(self.source.loaded().model).to(self.device, dtype=dtype).eval()
        try:
            model.set_attn_implementation("sdpa")
            attention = "sdpa"
        except Exception as exc:  # noqa: BLE001 - older/other models: keep eager attention
            log.debug("sdpa unavailable: %s", exc)
            attention = "eager"
        seen: set[int] = set()
        weight = 0
        for p in model.parameters():  # tied embeddings count once
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                weight += p.numel() * p.element_size()
        self.weight_bytes = weight
        self.kv_bytes_per_elem = 2 if dtype == torch.float16 else 4
        import transformers

        self.info.update({"dtype": str(dtype).replace("torch.", ""), "attention": attention,
                          "torch": torch.__version__, "transformers": transformers.__version__})
        return model

    def prepare(self) -> None:
        self.model = self._load()

    def _generate(self, prompt_ids: list[list[int]], new_tokens: int, **options: Any) -> Timing:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class FirstToken(BaseStreamer):
            def __init__(self) -> None:
                self.calls, self.at = 0, 0.0

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls == 2:  # the first put is the prompt
                    self.at = time.perf_counter()

            def end(self) -> None:
                pass

        ids = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        clock = FirstToken()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=self.pad_token_id, streamer=clock,
                                      **options)
        if self.device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        if self.device == "cuda":
            self.run_extras = {"torch_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20}
        got = int(out.shape[1]) - ids.shape[1]
        if got != new_tokens:
            raise RuntimeError(f"generated {got} tokens, asked for {new_tokens}")
        return Timing(ttft_s=clock.at - t0, decode_s=end - clock.at, new_tokens=new_tokens, batch=len(prompt_ids))

    def run(self, prompt_ids: list[list[int]], new_tokens: int) -> Timing:
        return self._generate(prompt_ids, new_tokens)

    def close(self) -> None:
        self.model = None


class HfCompileRunner(HfEagerRunner):
    """Static KV cache + transformers' ``torch.compile``-d forward (``mode="reduce-overhead"``,
    i.e. CUDA graphs, on CUDA). The harness's warm-up run per batch size pays the compilation."""

    name = "hf-compile"

    def __init__(self, source: SharedSource, device: str, pad_token_id: int, explicit: bool) -> None:
        super().__init__(source, device, pad_token_id)
        self.explicit = explicit

    def prepare(self) -> None:
        if self.device == "cpu" and not self.explicit:
            raise NotRun("torch.compile on the CPU takes minutes per batch size; not run by default "
                         "(ask for it by name: --peers hf-compile)")
        self.model = self._load()
        from transformers import CompileConfig

        config = CompileConfig(mode="reduce-overhead" if self.device == "cuda" else "default")
        if self.device != "cuda":
            # transformers compiles on CUDA only unless told; it declares this private flag as None
            config._compile_all_devices = True  # type: ignore[assignment]
        self.model.generation_config.cache_implementation = "static"
        self.model.generation_config.compile_config = config
        self.info.update({"cache": "static", "compile_mode": config.mode})

    def run(self, prompt_ids: list[list[int]], new_tokens: int) -> Timing:
        return self._generate(prompt_ids, new_tokens, cache_implementation="static")


# ------------------------------------------------------------------------------------------------
# onnxruntime-genai


class GenaiRunner(Runner):
    """onnxruntime-genai's ``Generator``: ``append_tokens`` (prefill) + one ``generate_next_token``
    is the first token; each later ``generate_next_token`` is a decode step then a pick. The first
    and the last tokens are read with ``get_next_tokens`` before the clock is read, so that genai's
    times end, as every runner's do, with the tokens on the host (on CUDA a call may return with
    its kernels still queued)."""

    def __init__(self, source: SharedSource, device: str, precision: str, work: Path, cuda_graph: bool,
                 name: str) -> None:
        super().__init__()
        self.source = source
        self.device = device
        self.precision = precision
        self.work = work
        self.cuda_graph = cuda_graph
        self.name = name
        self.model: Any = None

    def build(self) -> Path:
        """The genai model folder: built once by its builder, cached under the work folder."""
        key = (self.source.sha256 or "src")[:16]
        ep = "cuda" if self.device == "cuda" else "cpu"
        out = self.work / f"genai-{key}-{self.precision}-{ep}"
        if (out / "genai_config.json").is_file():
            return out
        folder = self.source.hf_folder()
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a half-built folder of an interrupted run
        log_path = self.work / f"{out.name}.build.log"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(tmp),
               "-p", self.precision, "-e", ep, "-c", str(self.work / "genai-cache")]
        log.warning("building the onnxruntime-genai %s %s model (one time, log in %s) …", self.precision, ep, log_path)
        t0 = time.perf_counter()
        with open(log_path, "w") as fh:
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not (tmp / "genai_config.json").is_file():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise NotRun(f"onnxruntime-genai's builder failed (exit {done.returncode}): {tail[0][:200]}")
        if out.exists():
            raise NotRun(f"{out} exists but has no genai_config.json; remove it")
        tmp.rename(out)
        self.info["build_s"] = round(time.perf_counter() - t0, 1)
        return out

    def prepare(self) -> None:
        if self.cuda_graph and self.device != "cuda":
            raise NotRun("CUDA graphs need --device cuda")
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise NotRun(f"onnxruntime-genai is not installed ({GENAI_INSTALL})") from exc
        if self.device == "cuda" and not og.is_cuda_available():
            raise NotRun("this onnxruntime-genai has no CUDA support (pip install onnxruntime-genai-cuda)")
        if self.device == "cpu" and self.precision in ("fp16", "bf16"):
            raise NotRun(f"onnxruntime-genai has no {self.precision} CPU model (use --genai-precision fp32/int8/int4)")
        folder = self.build()
        config = og.Config(str(folder))
        config.clear_providers()
        if self.device == "cuda":
            config.append_provider("cuda")
            if self.cuda_graph:
                config.set_provider_option("cuda", "enable_cuda_graph", "1")
        self.model = og.Model(config)
        self.weight_bytes = onnx_weight_bytes(folder)
        self.kv_bytes_per_elem = 2 if self.device == "cuda" else 4
        self.info.update({"model_dir": str(folder), "precision": self.precision, "cuda_graph": self.cuda_graph,
                          "onnxruntime_genai": og.__version__})

    def run(self, prompt_ids: list[list[int]], new_tokens: int) -> Timing:
        import onnxruntime_genai as og

        batch, length = len(prompt_ids), len(prompt_ids[0])
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length + new_tokens, min_length=length + new_tokens,
                                  batch_size=batch)
        generator = og.Generator(self.model, params)
        t0 = time.perf_counter()
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        generator.generate_next_token()
        generator.get_next_tokens()  # the first tokens on the host, as every runner's TTFT is defined
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
        generator.get_next_tokens()  # the last step finished, not just launched
        end = time.perf_counter()
        got = len(generator.get_sequence(0)) - length
        if got != new_tokens:
            raise RuntimeError(f"generated {got} tokens, asked for {new_tokens}")
        return Timing(ttft_s=first - t0, decode_s=end - first, new_tokens=new_tokens, batch=batch)

    def close(self) -> None:
        self.model = None


# ------------------------------------------------------------------------------------------------
# optimum-onnx (subprocess)


class OptimumRunner(Runner):
    """Drives :mod:`lmforge.benchmark.optimum_worker` over JSON lines, so it alternates with the
    in-process runners like any other; its stderr goes to a log file in the work folder."""

    name = "optimum"
    in_process = False

    def __init__(self, source: SharedSource, device: str, work: Path, site: str | None, pad_token_id: int) -> None:
        super().__init__()
        self.source = source
        self.device = device
        self.work = work
        self.site = site
        self.pad_token_id = pad_token_id
        self._proc: subprocess.Popen[str] | None = None
        self._mem: float | None = None

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._proc is None or self._proc.stdin is None or self._proc.stdout is None:
            raise RuntimeError("the optimum worker is not running")
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        for line in self._proc.stdout:
            if line.startswith("@@bench "):
                return json.loads(line[len("@@bench "):])
        raise RuntimeError(f"the optimum worker exited (code {self._proc.wait()}; log {self._log})")

    def prepare(self) -> None:
        if self.site is not None and not Path(self.site).is_dir():
            raise NotRun(f"--peers-site {self.site} is not a folder")
        env = dict(os.environ)
        paths = [p for p in (self.site, env.get("PYTHONPATH")) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        worker = Path(__file__).with_name("optimum_worker.py")
        self._log = self.work / "optimum-worker.log"
        self._proc = subprocess.Popen([sys.executable, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=open(self._log, "w"), text=True, env=env)
        where = f"site {self.site}" if self.site else "no --peers-site / LMFORGE_PEERS_SITE given"
        answer = self._ask({"probe": True})
        if not answer.get("ok"):
            self.close()
            raise NotRun(f"optimum-onnx is not importable ({where}): {answer.get('reason')}")
        dtype = "fp16" if self.device == "cuda" else "fp32"
        key = (self.source.sha256 or "src")[:16]
        folder = self.source.hf_folder()
        log.warning("starting optimum-onnx (export once into the work folder; log in %s) …", self._log)
        answer = self._ask({"folder": str(folder), "device": self.device, "dtype": dtype,
                            "export_dir": str(self.work / f"optimum-{key}-{dtype}-{self.device}")})
        if not answer.get("ok"):
            self.close()
            raise NotRun(f"optimum-onnx cannot run ({where}): {answer.get('reason')}")
        self.weight_bytes = int(answer.get("weight_bytes") or 0) or None
        self.kv_bytes_per_elem = 2 if dtype == "fp16" else 4
        self.info.update({"dtype": dtype, "io_binding": self.device == "cuda", "site": self.site,
                          **answer.get("versions", {})})

    def run(self, prompt_ids: list[list[int]], new_tokens: int) -> Timing:
        answer = self._ask({"prompts": prompt_ids, "new_tokens": new_tokens, "pad_token_id": self.pad_token_id})
        if not answer.get("ok"):
            raise RuntimeError(str(answer.get("reason")))
        if answer.get("mem_mb") is not None and self.device == "cpu":
            self._mem = max(self._mem or 0.0, float(answer["mem_mb"]))
        return Timing(ttft_s=float(answer["ttft_s"]), decode_s=float(answer["decode_s"]), new_tokens=new_tokens,
                      batch=len(prompt_ids))

    def own_peak_memory_mb(self) -> float | None:
        return self._mem

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write(json.dumps({"quit": True}) + "\n")
                proc.stdin.flush()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------


def make_peer(name: str, *, source: SharedSource, device: str, work: Path, pad_token_id: int, explicit: bool,
              genai_precision: str, peers_site: str | None, label: str | None = None) -> Runner:
    """One peer runner by name (``PEERS``); ``label`` overrides its name in the report."""
    runner: Runner
    if name == "hf":
        runner = HfEagerRunner(source, device, pad_token_id)
    elif name == "hf-compile":
        runner = HfCompileRunner(source, device, pad_token_id, explicit)
    elif name in ("genai", "genai-graph"):
        runner = GenaiRunner(source, device, genai_precision, work, cuda_graph=name == "genai-graph", name=name)
    elif name == "optimum":
        runner = OptimumRunner(source, device, work, peers_site, pad_token_id)
    else:
        raise KeyError(name)
    if label:
        runner.name = label
    return runner
