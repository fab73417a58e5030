"""GGUF files of the families llama.cpp and transformers' GGUF loader share convert, and give the
greedy ids and logits of the model they were written from.

Each file is written by :mod:`tests.exporters.gguf_fixtures` from a ``tiny:<family>`` model the way
llama.cpp's converter writes that family. Some of what a GGUF says is left out by transformers'
GGUF config mapping (Qwen3's head size, Phi-3's partial rotary, Gemma's query scalar); lmforge
restores it from the file's metadata, and without that these tests fail. What transformers cannot
load is refused in one line that says to convert the Hugging Face folder instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporters.convert import convert
from exporters.sources import load_source
from runtime.artifact import load_artifact
from runtime.decoder_io import DecoderIO
from runtime.engine import Engine
from runtime.errors import ExportError
from tests.exporters.gguf_fixtures import tiny_gguf, tiny_model
from tests.exporters.test_bad_input import assert_one_line_error, run_cli

# Longer than the tiny window (16 tokens, one a byte) so Gemma's local layers mask something.
PROMPTS = ("The capital of France is", "def fib(n):\n    return fib(n - 1) +")
NEW_TOKENS = 8
LOGIT_TOL = 1e-3  # fp32 file, fp32 graph: float reordering only

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # Llama 3.2's
# case -> (family, config overrides, the spec the GGUF converts with). llama.cpp writes Mistral as
# Llama, and so it loads; Llama 3.1+ files carry their rope scaling as a rope_freqs tensor.
CASES: dict[str, tuple[str, dict[str, object], str]] = {
    "qwen2": ("qwen2", {}, "qwen2"), "qwen3": ("qwen3", {}, "qwen3"), "mistral": ("mistral", {}, "llama"),
    "phi3": ("phi3", {}, "phi3"), "gemma2": ("gemma2", {}, "gemma2"),
    # two local layers (llama.cpp's pattern puts the global one sixth: six layers load below, and the
    # tiny: tests convert the alternating pattern)
    "gemma3": ("gemma3_text", {"num_hidden_layers": 2}, "gemma3_text"),
    "llama3": ("llama", {"rope_parameters": LLAMA3_ROPE}, "llama"),
}


def _reference(model: torch.nn.Module, ids: list[int]) -> tuple[list[int], np.ndarray]:
    prompt = torch.tensor([ids])
    with torch.no_grad():
        logits = model(prompt).logits[0].numpy()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return out[0, len(ids):].tolist(), logits


def _prefill_logits(artifact_dir: Path, ids: list[int]) -> np.ndarray:
    io = DecoderIO.from_artifact(load_artifact(artifact_dir))
    session = ort.InferenceSession(str(artifact_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, io.prompt_feeds(ids))
    return outputs[names.index("logits")][0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_gguf_converts_to_its_source_models_greedy_ids_and_logits(tmp_path: Path, case: str) -> None:
    family, overrides, spec_name = CASES[case]
    fixture = tiny_gguf(family, tmp_path / "gguf", **overrides)
    out = convert(str(fixture.path), tmp_path / "art", progress=False)
    artifact = load_artifact(out)
    source = artifact.manifest["source"]
    assert source["kind"] == "gguf" and source["gguf_file"] == fixture.path.name
    assert source["sha256"] == hashlib.sha256(fixture.path.name.encode() + fixture.path.read_bytes()).hexdigest()
    assert artifact.architecture["name"] == spec_name
    engine = Engine.load(out, "cpu")
    try:
        for text in PROMPTS:
            ids = fixture.tokenizer.encode(text)
            assert engine.encode(text) == ids  # the artifact's tokenizer, rebuilt from the file's vocabulary
            expected_ids, expected_logits = _reference(fixture.model, ids)
            assert engine.generate_ids([ids], max_new_tokens=NEW_TOKENS)[0] == expected_ids
            np.testing.assert_allclose(_prefill_logits(out, ids), expected_logits, atol=LOGIT_TOL, rtol=0)
    finally:
        engine.close()


def test_what_transformers_leaves_out_is_restored_from_the_metadata(tmp_path: Path) -> None:
    """Each family's config attribute that transformers' GGUF mapping drops comes back from the file."""
    cases = {"qwen3": ("head_dim", 16), "gemma2": ("query_pre_attn_scalar", 16)}
    for family, (attr, value) in cases.items():
        loaded = load_source(str(tiny_gguf(family, tmp_path / family).path))
        assert getattr(loaded.config, attr) == value
    phi3 = load_source(str(tiny_gguf("phi3", tmp_path / "phi3").path))
    assert phi3.config.rope_parameters["partial_rotary_factor"] == 0.75
    # Gemma 3 4B and larger scale the global layers' rotary linearly (factor 8); llama.cpp writes it
    # to the metadata, transformers' mapping drops it. Six layers: five local, then a global one.
    scaled = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    fixture = tiny_gguf("gemma3_text", tmp_path / "gemma3", rope_parameters=scaled)
    loaded = load_source(str(fixture.path))
    assert loaded.config.rope_parameters["full_attention"] == scaled["full_attention"]
    ids = torch.tensor([fixture.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, fixture.model(ids).logits)


# Families whose conversion the tiny: tests cover: here only that the GGUF loads as the model it was
# written from (exact logits), with a rotary base transformers' mapping drops for the first two.
_ROPE = {"rope_type": "default", "rope_theta": 999999.0}


@pytest.mark.parametrize("family,overrides", [
    ("starcoder2", {"rope_parameters": _ROPE}),
    ("stablelm", {"rope_parameters": {**_ROPE, "partial_rotary_factor": 0.25}}),
    ("qwen2_moe", {}), ("qwen3_moe", {}), ("llama", {}),
])
def test_more_families_load_from_gguf_as_the_model_they_were_written_from(
        tmp_path: Path, family: str, overrides: dict[str, object]) -> None:
    fixture = tiny_gguf(family, tmp_path, **overrides)
    loaded = load_source(str(fixture.path))
    assert loaded.spec.name == family and loaded.info.kind == "gguf"
    ids = torch.tensor([fixture.tokenizer.encode(PROMPTS[1])])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, fixture.model(ids).logits)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3"])
def test_a_q8_0_file_loads_dequantized_near_its_source_model(tmp_path: Path, family: str) -> None:
    """Real GGUF files are quantized: a Q8_0 file loads as fp32, within Q8_0's rounding of the source."""
    fixture = tiny_gguf(family, tmp_path, q8_0=True)
    loaded = load_source(str(fixture.path))
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    ids = torch.tensor([fixture.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        got, want = loaded.model(ids).logits, fixture.model(ids).logits
    diff = (got - want).abs().max().item()
    # quantized (not fp32), and close: Q8_0's rounding, not a wrong tensor (those differ by the
    # logits' own size); the argmax can flip where these random logits nearly tie
    assert 0 < diff < 0.05 * want.abs().max().item()


def test_a_llama_file_named_mistral_loads_as_llama(tmp_path: Path) -> None:
    """transformers reads a Llama-architecture file named exactly "mistral" as Mistral, then finds no
    tensor map for it; lmforge loads it as the Llama that llama.cpp runs."""
    fixture = tiny_gguf("mistral", tmp_path, name="mistral")
    loaded = load_source(str(fixture.path))
    assert loaded.config.model_type == "llama" and loaded.spec.name == "llama"
    ids = torch.tensor([fixture.tokenizer.encode(PROMPTS[1])])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, fixture.model(ids).logits)


def _assert_refused(path: Path, *fragments: str) -> None:
    with pytest.raises(ExportError) as info:
        load_source(str(path))
    message = str(info.value)
    assert "\n" not in message and "Hugging Face folder" in message
    for fragment in fragments:
        assert fragment in message


def test_an_architecture_transformers_cannot_load_from_gguf_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Gemma (1) is in llama.cpp's GGUF and not in transformers' GGUF mapping: `lmforge convert`
    says so in one line, exit code 2, and writes nothing."""
    path = tiny_gguf("gemma", tmp_path / "src").path
    _assert_refused(path, "architecture 'gemma'", "gemma2")
    code, err = run_cli(capsys, "convert", str(path), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "architecture 'gemma' is not one transformers' GGUF loader maps",
                          "Hugging Face folder")
    assert not (tmp_path / "out").exists()


def test_llama3_rope_scaling_is_applied_from_the_files_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.1+ files carry their ``llama3`` rope scaling as ``rope_freqs`` only; transformers'
    GGUF loader drops it and builds plain rotary. lmforge applies the factors, as llama.cpp does."""
    fixture = tiny_gguf("llama", tmp_path, rope_parameters=LLAMA3_ROPE)
    loaded = load_source(str(fixture.path))
    ids = torch.tensor([fixture.tokenizer.encode(PROMPTS[1] * 4)])
    with torch.no_grad():
        got, want = loaded.model(ids).logits, fixture.model(ids).logits
        plain = tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})(ids).logits
    assert (plain - want).abs().max() > 1e-3  # the scaling matters at this length, so the test can fail
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,tensor", [("qwen2", "rope_freqs.weight"), ("phi3", "rope_factors_long.weight")])
def test_rotary_factors_transformers_would_drop_are_refused(tmp_path: Path, family: str, tensor: str) -> None:
    """Phi-3 LongRoPE files carry ``rope_factors_long/short``, which switch with the context length;
    ``rope_freqs`` is applied for Llama only. transformers would load such a file without them, a
    different model, so lmforge refuses it."""
    fixture = tiny_gguf(family, tmp_path, extra_tensors={tensor: np.ones(8, dtype=np.float32)})
    _assert_refused(fixture.path, tensor, "dropped")
