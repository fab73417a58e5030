"""Fusions each architecture should end with, by contrib op name.

Read from the architecture specs (``exporters.specs``, a data-only module that imports neither
torch nor transformers, so ``lmforge optimize`` stays light). A family without a tuned spec (one
``convert`` exported through the generic path) expects nothing: ``optimize`` fuses what its rules
match and the report lists it under "other fused ops".
"""

from __future__ import annotations

from exporters.specs import all_specs

__all__ = ["expected_fusions", "not_fusable"]


def expected_fusions(architecture: str) -> tuple[str, ...]:
    for spec in all_specs():
        if spec.name == architecture:
            return spec.expected_fusions
    return ()


def not_fusable(architecture: str) -> dict[str, str]:
    """Fusions onnxruntime has for a block like this family's that cannot fire on it → why
    (``exporters.encoder_specs.NOT_FUSABLE``); empty for a family without such entries."""
    from exporters.encoder_specs import NOT_FUSABLE

    return dict(NOT_FUSABLE.get(architecture, {}))
