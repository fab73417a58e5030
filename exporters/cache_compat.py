"""The name of the KV-cache argument across transformers 5.x.

transformers renamed a model's ``past_key_values`` argument (and the output field of the same name)
to ``cache``; from 5.24 the old name still works but logs "``past_key_values``/``cache_params`` are
deprecated. Use ``cache`` instead." and is due to be removed in 5.40. Older 5.x releases know only
``past_key_values``. These two helpers pick the name the installed model code declares, so one
exporter runs warning-free on every release the pin admits, and keeps running past 5.40.

The choice is read from the model's ``forward`` signature (what the model itself accepts), never
from the transformers version number: a model class written against either API gets the right name.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = ["cache_argument", "cache_kwargs", "output_cache"]

_NEW = "cache"
_OLD = "past_key_values"


@functools.cache
def _forward_parameters(model_type: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(model_type.forward).parameters)
    except (TypeError, ValueError):  # a C-implemented or wrapped forward without a signature
        return frozenset()


def cache_argument(model: Any) -> str:
    """``"cache"`` when ``model.forward`` declares it (transformers ≥ 5.24), else ``"past_key_values"``."""
    model_type: Any = type(model)  # a class is hashable; typeshed's cache wrapper asks for Hashable
    return _NEW if _NEW in _forward_parameters(model_type) else _OLD


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the argument name ``model`` prefers; spread it into the call."""
    return {cache_argument(model): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model returned: ``output.cache`` where the output class has that field, else
    ``output.past_key_values``. Reading ``"cache" in keys()`` first avoids the deprecated property,
    which logs the warning on every access."""
    keys = output.keys() if hasattr(output, "keys") else ()
    if _NEW in keys:
        return output[_NEW]
    return getattr(output, _OLD)
