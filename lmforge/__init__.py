"""lmforge: Hugging Face transformer → fast, verified ONNX Runtime artifact."""

from __future__ import annotations

from runtime.artifact import lmforge_version

__all__ = ["__version__"]

__version__ = lmforge_version()
