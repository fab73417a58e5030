"""The model the peers run: the artifact's own source, loaded once and shared.

Peers must run the same weights as the artifact, so they take them from the manifest's
``source`` block (or ``--source``), through :func:`exporters.sources.load_source` — the loader
``convert`` used, so ``random:``/``tiny:`` sources rebuild the same seeded weights and a GGUF file
dequantizes the same way. Builders that want a Hugging Face folder (onnxruntime-genai, optimum)
get one: the source folder itself when it is one, else the loaded model saved once into the work
folder, keyed by the source's sha256.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError

__all__ = ["SharedSource", "source_ref"]

log = logging.getLogger(__name__)


def source_ref(manifest: dict[str, Any]) -> str:
    """The source string ``convert`` was given, rebuilt from a manifest's ``source`` block."""
    source = manifest.get("source") or {}
    kind, ref, path, gguf = source.get("kind"), source.get("ref"), source.get("path"), source.get("gguf_file")
    if kind in ("builtin", "tiny", "random", "hub") and ref:
        return str(ref)
    if kind == "gguf" and path and gguf:
        return str(Path(path) / gguf)
    if path:
        return str(path)
    if ref:
        return str(ref)
    raise ArtifactError("the artifact's manifest has no usable source block", got=repr(source)[:120],
                        fix="pass the model to the peers with --source (a folder, .gguf, builtin:, random:)")


def _save_model(model: Any, folder: Path) -> None:
    """``save_pretrained``, except for a model loaded from GGUF: transformers marks it quantized
    (though its weights are dequantized fp32) and refuses to save it, so its config is written
    without the ``quantization_config`` and its weights with safetensors directly."""
    if getattr(model, "hf_quantizer", None) is None:
        model.save_pretrained(folder)
        return
    import copy

    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]  # builders pick the model class from it
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))  # drops the tied duplicate, as save_pretrained does


class SharedSource:
    """Loads the source once (the first peer that asks), saves an HF folder once (ditto)."""

    def __init__(self, ref: str, sha256: str | None, work: Path) -> None:
        self.ref = ref
        self.sha256 = sha256
        self.work = work
        self._loaded: Any = None
        self._folder: Path | None = None
        self._error: Exception | None = None
        self._folder_error: Exception | None = None
        self._lock = threading.Lock()

    def loaded(self) -> Any:
        """The :class:`exporters.sources.LoadedSource` (fp32, CPU, eval)."""
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._loaded is None:
                from exporters.sources import load_source

                log.info("loading the peers' model from %s", self.ref)
                try:
                    self._loaded = load_source(self.ref)
                except Exception as exc:  # remembered: every peer gets the same reason, once
                    self._error = exc
                    raise
                if self.sha256 and self._loaded.sha256 != self.sha256:
                    log.warning("source %s has sha256 %s…, the artifact was made from %s…: peers may run "
                                "other weights", self.ref, self._loaded.sha256[:12], self.sha256[:12])
            return self._loaded

    def hf_folder(self) -> Path:
        """A Hugging Face model folder of the source (config, safetensors, tokenizer)."""
        with self._lock:
            if self._folder is not None:
                return self._folder
            if self._folder_error is not None:
                raise self._folder_error
        try:
            return self._make_folder()
        except Exception as exc:  # remembered: one attempt, the same reason for every peer
            self._folder_error = exc
            raise

    def _make_folder(self) -> Path:
        from exporters.sources import resolve_source

        info = resolve_source(self.ref)
        if info.kind == "hf" and info.path is not None:
            self._folder = info.path
            return info.path
        loaded = self.loaded()
        key = (self.sha256 or loaded.sha256)[:16]
        folder = self.work / f"hf-{key}"
        if not (folder / "config.json").is_file():
            tmp = self.work / f"hf-{key}.tmp"
            log.info("saving %s as a Hugging Face folder in %s (for the ONNX peers' builders)", self.ref, folder)
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder of an interrupted run
            tmp.mkdir(parents=True)
            _save_model(loaded.model, tmp)
            if loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(tmp)
            tmp.rename(folder)
        self._folder = folder
        return folder

    def release(self) -> None:
        """Drop the fp32 CPU model once every peer holds its own copy."""
        with self._lock:
            self._loaded = None
