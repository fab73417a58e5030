"""Source loading, architecture specs and the torch → ONNX export with KV cache."""

from __future__ import annotations

from exporters.convert import convert
from exporters.sources import load_source, resolve_source
from exporters.specs import all_specs, get_spec

__all__ = ["convert", "load_source", "resolve_source", "all_specs", "get_spec"]
