"""Every architecture via ``tiny:``: ORT logits equal PyTorch eager for prefill + 3 decode steps.

The reference is the transformers model with the cache transformers itself builds for it
(``DynamicCache(config=…)``: sliding layers where the config has a window), so a graph that
handled a family's cache differently from the model code would fail here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporters.cache_compat import cache_kwargs
from exporters.sources import load_source
from exporters.specs import TINY_WINDOW, Feature, ModelKind, all_specs
from runtime.artifact import load_artifact

DECODERS = [s.name for s in all_specs() if s.kind is ModelKind.DECODER]
WINDOWED = [s.name for s in all_specs()
            if s.kind is ModelKind.DECODER and {Feature.SLIDING_WINDOW, Feature.ALTERNATING_WINDOW} & set(s.features)]
TOL = 1e-4


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])


def _torch_step(model: Any, cache: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, use_pos: bool) -> Any:
    kwargs = {"position_ids": pos} if use_pos else {}
    kwargs.update(cache_kwargs(model, cache))  # `cache=` on transformers 5.24+, `past_key_values=` before
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)


def test_the_23_families_of_the_coverage_table_are_all_registered() -> None:
    assert set(DECODERS) >= {
        "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral", "phi", "phi3", "gemma", "gemma2",
        "gemma3_text", "granite", "olmo2", "starcoder2", "gpt_neox", "falcon", "gpt2", "gpt_bigcode", "bloom", "opt",
        "cohere", "stablelm"}
    assert set(WINDOWED) >= {"mistral", "gemma2", "gemma3_text"}


def _compare_steps(arch: str, path: Path, batch: int, prompt_len: int, pads: tuple[int, ...], steps: int,
                   seed: int) -> None:
    """Prefill + ``steps - 1`` greedy decode steps through ORT and through transformers; logits must agree."""
    from transformers import DynamicCache

    artifact = load_artifact(path)
    loaded = load_source(f"tiny:{arch}")
    # The tiny model is rebuilt from its seed: same weights as the exported ones.
    assert loaded.sha256 == artifact.manifest["source"]["sha256"]
    model = loaded.model
    session = _session(path)
    arch_info = artifact.architecture
    layers, kv_heads, head_dim = arch_info["layers"], arch_info["kv_heads"], arch_info["head_dim"]
    input_names = [i.name for i in session.get_inputs()]
    use_pos = "position_ids" in input_names
    assert use_pos == (arch != "bloom")

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, loaded.config.vocab_size, (batch, prompt_len), generator=gen)
    mask = torch.ones(batch, prompt_len, dtype=torch.int64)
    for row, pad in enumerate(pads[:batch]):  # left padding
        mask[row, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    cache = DynamicCache(config=model.config)
    past = {n: np.zeros((batch, kv_heads, 0, head_dim), np.float32) for n in input_names if n.startswith("past_")}
    cur_ids, cur_pos = ids, pos
    for step in range(steps):
        ref = _torch_step(model, cache, cur_ids, mask, cur_pos, use_pos)
        feed = {"input_ids": cur_ids.numpy(), "attention_mask": mask.numpy(), **past}
        if use_pos:
            feed["position_ids"] = cur_pos.numpy()
        outputs = session.run(None, feed)
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, outputs))
        real = mask[:, -cur_ids.shape[1]:].bool().numpy()  # padded query rows are don't-care
        diff = np.abs(got["logits"] - ref.logits.numpy())[real].max()
        assert diff <= TOL, f"{arch} batch {batch} step {step}: max |Δlogits| {diff}"
        # greedy ids agree too (a tie within TOL would be a finding of its own: none here)
        assert (got["logits"][:, -1].argmax(-1) == ref.logits[:, -1].argmax(-1).numpy()).all()
        total = mask.shape[1]
        for i in range(layers):
            for kind in ("key", "value"):
                present = got[f"present.{i}.{kind}"]
                assert present.shape == (batch, kv_heads, total, head_dim)
                past[f"past_key_values.{i}.{kind}"] = present
        # greedy next token from the reference, fed to both
        cur_ids = ref.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
        cur_pos = cur_pos[:, -1:] + 1


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("batch", [1, 3])
def test_decoder_matches_torch(arch: str, batch: int, artifact_cache: Callable[[str], Path]) -> None:
    # row 1 has 3 pads, row 2 has 5
    _compare_steps(arch, artifact_cache(f"tiny:{arch}"), batch, 7, (0, 3, 5), steps=4, seed=42 + batch)


@pytest.mark.parametrize("arch", WINDOWED)
def test_sliding_window_holds_well_past_the_window(arch: str, artifact_cache: Callable[[str], Path]) -> None:
    """Prompts of 2.5 windows (one row left-padded by 7) and decode steps past them: the graph keeps
    every layer to its window exactly as transformers' sliding cache does."""
    path = artifact_cache(f"tiny:{arch}")
    assert load_artifact(path).architecture["sliding_window"] == TINY_WINDOW
    _compare_steps(arch, path, 2, 5 * TINY_WINDOW // 2, (0, 7), steps=6, seed=5)


def test_encoder_matches_torch(artifact_cache: Callable[[str], Path]) -> None:
    path = artifact_cache("tiny:bert")
    loaded = load_source("tiny:bert")
    session = _session(path)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, loaded.config.vocab_size, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    tti = torch.zeros_like(ids)
    with torch.no_grad():
        ref = loaded.model(input_ids=ids, attention_mask=mask, token_type_ids=tti).last_hidden_state.numpy()
    got = session.run(
        ["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": tti.numpy()}
    )[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL


def test_manifest_describes_the_graph(tiny_llama: Path) -> None:
    artifact = load_artifact(tiny_llama)
    m = artifact.manifest
    assert m["kv_mode"] == "concat" and m["precision"] == "fp32"
    session = _session(tiny_llama)
    assert [i.name for i in session.get_inputs()] == [t.name for t in artifact.inputs]
    assert [o.name for o in session.get_outputs()] == [t.name for t in artifact.outputs]
    layers = m["architecture"]["layers"]
    expected_inputs = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")
    ]
    assert [t.name for t in artifact.inputs] == expected_inputs
    shapes = {t.name: t.shape for t in artifact.inputs + artifact.outputs}
    assert shapes["attention_mask"] == ("batch", "total")
    assert shapes["past_key_values.0.key"] == (
        "batch",
        m["architecture"]["kv_heads"],
        "past",
        m["architecture"]["head_dim"],
    )
    assert shapes["present.0.key"][2] == "total"
    assert m["export"]["ir_version"] <= 10
    assert m["export"]["check_max_abs_diff"] < 1e-4
    assert set(m["files"]) >= {"model.onnx", "model.onnx.data", "tokenizer/tokenizer.json", "generation_config.json"}
    for tool in ("torch", "transformers", "onnx", "onnxruntime", "lmforge"):
        assert m["tools"][tool]
