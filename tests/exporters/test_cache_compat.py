"""The exporter passes the KV cache under the name the installed transformers prefers.

transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns on the old name (removal is
due in 5.40); 5.0–5.23 know only ``past_key_values``. ``make test-export TRANSFORMERS=5.x`` runs
this file against other releases, so it must hold on every release the pin admits.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import pytest
import torch

from exporters.cache_compat import cache_argument, output_cache


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_argument_is_the_one_forward_declares() -> None:
    model = _tiny_llama()
    params = inspect.signature(type(model).forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert cache_argument(model) == expected
    assert expected in params


def test_argument_falls_back_to_past_key_values() -> None:
    class OldModel(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values: object = None) -> None: ...

    class NewModel(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, cache: object = None) -> None: ...

    assert cache_argument(OldModel()) == "past_key_values"
    assert cache_argument(NewModel()) == "cache"


def test_output_cache_reads_either_field() -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    name = "cache" if "cache" in fields else "past_key_values"
    out = CausalLMOutputWithPast(logits=torch.zeros(1), **{name: "the-cache"})
    assert output_cache(out) == "the-cache"


def test_convert_prints_no_cache_deprecation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The FutureWarning (5.24's ``deprecate_kwarg``) and the ``warning_once`` log line both."""
    from transformers.utils import logging as hf_logging

    from exporters.convert import convert

    hf_logging.enable_propagation()  # transformers' logger does not propagate to caplog by default
    if hasattr(logging.Logger, "warning_once"):  # transformers' once-per-process cache: start afresh
        logging.Logger.warning_once.cache_clear()
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert("tiny:llama", tmp_path / "out", progress=False)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    offending = [m for m in messages if "past_key_values" in m or ("cache" in m and "deprecated" in m)]
    assert offending == [], offending
