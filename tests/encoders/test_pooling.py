"""Pooling as the model's sentence-transformers files say: what ``convert`` reads from a folder, and
``Encoder.encode`` against a hand computation over transformers' hidden states (what
``SentenceTransformer.encode`` does: prompt + text → tokenizer → model → Pooling → Normalize)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporters.sources import sentence_transformers_config
from runtime import Encoder
from runtime.errors import ExportError, InvalidRequestError

TEXTS = ["what is the capital of france", "Paris is the capital and largest city of France.", "x",
         "a longer passage about rivers, bridges and the boats that go under them every day"]
PROMPTS = {"query": "query: ", "passage": "passage: "}


def _write_st(folder: Path, pooling: str, normalize: bool, prompts: dict[str, str] | None = None,
              default: str | None = None, include_prompt: bool = True, extra: list[str] | None = None) -> Path:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    for name in extra or []:
        modules.append({"idx": len(modules), "name": name, "path": name,
                        "type": f"sentence_transformers.models.{name}"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
            "lasttoken": "pooling_mode_lasttoken", "weightedmean": "pooling_mode_weightedmean_tokens"}
    config = {k: False for k in keys.values()}
    config.update({keys[pooling]: True, "word_embedding_dimension": 64, "include_prompt": include_prompt})
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 96}))
    if prompts is not None:
        (folder / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": prompts, "default_prompt_name": default}))
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """tiny:bert saved as a Hugging Face folder with sentence-transformers files, and its torch model."""
    from exporters.sources import load_source

    loaded = load_source("tiny:bert")
    folder = tmp_path_factory.mktemp("st") / "tiny-bert-st"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return _write_st(folder, "lasttoken", True, PROMPTS, default="query", include_prompt=True), loaded


@pytest.fixture(scope="module")
def artifact(tiny_folder, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    from exporters.convert import convert

    return Path(convert(str(tiny_folder[0]), tmp_path_factory.mktemp("st") / "art", progress=False))


def _variant(artifact: Path, tmp_path: Path, **block: object) -> Path:
    """The same artifact with another ``encoder`` block (the manifest itself is not hashed)."""
    out = tmp_path / "variant"
    shutil.copytree(artifact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["encoder"].update(block)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _by_hand(loaded, texts: list[str], pooling: str, normalize: bool, prompt: str = "",  # type: ignore[no-untyped-def]
             include_prompt: bool = True) -> np.ndarray:
    """One text at a time, no padding: transformers' last hidden state, then the pooling in numpy."""
    import torch

    rows = []
    # sentence-transformers 6: the prompt's tokens, less one only where the last is special ([SEP], EOS)
    prompt_ids = loaded.tokenizer(prompt)["input_ids"] if prompt else []
    trailing = bool(prompt_ids) and prompt_ids[-1] in loaded.tokenizer.all_special_ids
    prompt_length = len(prompt_ids) - (1 if trailing else 0)
    for text in texts:
        ids = torch.tensor([loaded.tokenizer(prompt + text)["input_ids"]])
        with torch.no_grad():
            hidden = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  token_type_ids=torch.zeros_like(ids)).last_hidden_state[0].numpy()
        keep = np.ones(len(hidden), dtype=bool)
        if not include_prompt:
            keep[:prompt_length] = False
        h = hidden[keep]
        vector = {"cls": hidden[0], "mean": h.mean(axis=0), "max": h.max(axis=0), "lasttoken": hidden[-1]}[pooling]
        rows.append(vector / np.linalg.norm(vector) if normalize else vector)
    return np.stack(rows)


def test_convert_records_the_sentence_transformers_files(artifact: Path) -> None:
    from runtime.artifact import load_artifact

    block = load_artifact(artifact).manifest["encoder"]
    assert block == {"pooling": "lasttoken", "normalize": True, "max_seq_length": 96,
                     "from": "sentence-transformers modules.json", "prompts": PROMPTS,
                     "default_prompt_name": "query", "include_prompt": True, "token_type_ids": False}


def test_lasttoken_normalize_and_the_default_prompt_equal_the_hand_computation(artifact: Path, tiny_folder) -> None:  # type: ignore[no-untyped-def]
    loaded = tiny_folder[1]
    enc = Encoder.load(artifact, threads=1)
    got = enc.encode(TEXTS, batch_size=3)  # the default prompt "query: " applies
    np.testing.assert_allclose(got, _by_hand(loaded, TEXTS, "lasttoken", True, "query: "), atol=2e-5)
    passage = enc.encode(TEXTS, prompt_name="passage")
    np.testing.assert_allclose(passage, _by_hand(loaded, TEXTS, "lasttoken", True, "passage: "), atol=2e-5)
    plain = enc.encode(TEXTS, prompt="")
    np.testing.assert_allclose(plain, _by_hand(loaded, TEXTS, "lasttoken", True), atol=2e-5)
    assert not np.allclose(got, plain, atol=1e-3)  # the prompt changes the vectors
    with pytest.raises(InvalidRequestError, match="unknown prompt name"):
        enc.encode(TEXTS, prompt_name="document")


@pytest.mark.parametrize("pooling,normalize", [("cls", False), ("max", True), ("mean", False), ("lasttoken", False)])
def test_each_pooling_on_the_device_head(pooling: str, normalize: bool, artifact: Path, tiny_folder,  # type: ignore[no-untyped-def]
                                         tmp_path: Path) -> None:
    enc = Encoder.load(_variant(artifact, tmp_path, pooling=pooling, normalize=normalize), threads=1)
    assert enc._device_pooling  # the pooling head loaded: this is the on-device path
    got = enc.encode(TEXTS, batch_size=4, prompt="")
    np.testing.assert_allclose(got, _by_hand(tiny_folder[1], TEXTS, pooling, normalize), atol=2e-5)
    host = enc.encode(TEXTS, batch_size=4, prompt="", pooling=pooling, normalize=not normalize)  # host path
    want = _by_hand(tiny_folder[1], TEXTS, pooling, not normalize)
    np.testing.assert_allclose(host, want, atol=2e-5)


def test_include_prompt_false_leaves_the_prompt_out_of_the_mean(artifact: Path, tiny_folder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    enc = Encoder.load(_variant(artifact, tmp_path, pooling="mean", normalize=False, include_prompt=False), threads=1)
    got = enc.encode(TEXTS, prompt_name="query")
    want = _by_hand(tiny_folder[1], TEXTS, "mean", False, "query: ", include_prompt=False)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert not np.allclose(got, _by_hand(tiny_folder[1], TEXTS, "mean", False, "query: "), atol=1e-3)


def test_unsupported_modules_and_poolings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="Dense"):
        sentence_transformers_config(_write_st(tmp_path, "mean", True, extra=["Dense"]))
    with pytest.raises(ExportError, match="weightedmean"):
        sentence_transformers_config(_write_st(tmp_path, "weightedmean", False))
    with pytest.raises(ExportError, match="default_prompt_name 'doc'"):
        sentence_transformers_config(_write_st(tmp_path, "cls", False, PROMPTS, default="doc"))
    assert sentence_transformers_config(None)["from"].startswith("default")
