"""The PyTorch reference on a tiny random Llama (loaded once; ~10 s of imports) and its cache."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from parity.prompts import Prompt
from parity.reference import (
    CACHE_RELATIVE_PATH,
    ReferenceCache,
    ReferenceKey,
    encode_prompt,
    generate_reference,
    library_versions,
    load_reference_source,
    reference_runs,
    shared_cache_path,
    user_cache_dir,
)
from runtime.errors import ParityError

torch = pytest.importorskip("torch")
PROMPTS = [Prompt("raw", "The capital of France is", False), Prompt("chat", "Say hi.", True)]


@pytest.fixture(scope="module")
def tiny():
    from exporters.sources import load_source

    return load_source("tiny:llama")


@pytest.fixture()
def manifest(tiny):
    return {
        "source": {"kind": "tiny", "ref": "tiny:llama", "path": None, "sha256": tiny.sha256},
        "generation": tiny.generation,
    }


class CountingLoader:
    def __init__(self, loaded):
        self.loaded, self.calls = loaded, 0

    def __call__(self, manifest, override):
        self.calls += 1
        return self.loaded


def ids_of(tiny):
    return {p.id: encode_prompt(tiny.tokenizer, p) for p in PROMPTS}


def test_encode_prompt_applies_the_chat_template_only_to_chat_prompts(tiny):
    raw, chat = (encode_prompt(tiny.tokenizer, p) for p in PROMPTS)
    assert tiny.tokenizer.decode(raw) == "The capital of France is"
    assert tiny.tokenizer.decode(chat).startswith("<|im_start|>user\nSay hi.<|im_end|>")


def test_generation_is_greedy_and_matches_a_full_forward_pass(tiny):
    ids = encode_prompt(tiny.tokenizer, PROMPTS[0])
    run = generate_reference(tiny.model, "raw", ids, 12, top_k=5)
    assert run.steps == 12 and run.k == 5
    assert [int(r[0]) for r in run.top_ids] == list(run.tokens)  # the choice is the top-1
    with torch.inference_mode():  # no-cache recomputation of the same sequence
        logits = tiny.model(input_ids=torch.tensor([ids + list(run.tokens)])).logits[0].float()
    step_logits = logits[len(ids) - 1 : len(ids) - 1 + 12]
    assert step_logits.argmax(-1).tolist() == list(run.tokens)
    values, indices = torch.topk(step_logits, 5)
    np.testing.assert_allclose(run.top_values, values.numpy(), atol=1e-4)
    assert np.array_equal(run.top_ids[:, 0], indices[:, 0].numpy())


def test_generation_stops_after_an_end_of_sequence_token(tiny):
    ids = encode_prompt(tiny.tokenizer, PROMPTS[0])
    full = generate_reference(tiny.model, "raw", ids, 10)
    stop = full.tokens[3]
    cut = generate_reference(tiny.model, "raw", ids, 10, eos_token_ids=[stop])
    first = full.tokens.index(stop)
    assert cut.tokens == full.tokens[: first + 1]
    assert np.array_equal(cut.top_ids, full.top_ids[: first + 1])


def test_references_are_cached_and_reused_without_loading_the_source(tmp_path, tiny, manifest):
    loader = CountingLoader(tiny)
    first = reference_runs(tmp_path, manifest, PROMPTS, ids_of(tiny), 8, top_k=4, loader=loader, progress=False)
    assert loader.calls == 1 and (tmp_path / CACHE_RELATIVE_PATH).is_file()
    again = reference_runs(tmp_path, manifest, PROMPTS, ids_of(tiny), 8, top_k=4, loader=loader, progress=False)
    assert loader.calls == 1
    for pid in ("raw", "chat"):
        assert again[pid].tokens == first[pid].tokens
        assert np.array_equal(again[pid].top_values, first[pid].top_values)
    # also without compute allowed: everything is cached
    reference_runs(tmp_path, manifest, PROMPTS, ids_of(tiny), 8, top_k=4, loader=loader, allow_compute=False)


@pytest.mark.parametrize(
    "change",
    ["max_new_tokens", "top_k", "prompt_text", "input_ids", "versions", "source_sha"],
)
def test_a_stale_entry_is_never_used(tmp_path, tiny, manifest, change, monkeypatch):
    loader = CountingLoader(tiny)
    ids = ids_of(tiny)
    reference_runs(tmp_path, manifest, PROMPTS[:1], ids, 6, top_k=4, loader=loader, progress=False)
    prompts, max_new, top_k = PROMPTS[:1], 6, 4
    if change == "max_new_tokens":
        max_new = 7
    elif change == "top_k":
        top_k = 5
    elif change == "prompt_text":
        prompts = [dataclasses.replace(PROMPTS[0], prompt="The capital of Spain is")]
    elif change == "input_ids":
        ids = {"raw": ids["raw"] + [5]}
    elif change == "versions":
        monkeypatch.setattr("parity.reference.library_versions", lambda: {"torch": "0.0", "transformers": "0.0"})
    elif change == "source_sha":
        manifest = {**manifest, "source": {**manifest["source"], "sha256": "0" * 64}}
    with pytest.raises(ParityError, match=r"1 reference\(s\) are missing or stale"):
        reference_runs(tmp_path, manifest, prompts, ids, max_new, top_k=top_k, loader=loader, allow_compute=False)
    runs = reference_runs(tmp_path, manifest, prompts, ids, max_new, top_k=top_k, loader=loader, progress=False)
    assert loader.calls == 2 and runs["raw"].steps == max_new and runs["raw"].k == top_k


def test_corrupt_cache_is_refused(tmp_path, tiny, manifest):
    path = tmp_path / CACHE_RELATIVE_PATH
    path.parent.mkdir(parents=True)
    path.write_text('{"key": {"format": 1, "prompt_id": "raw"}, "run": {}\n', encoding="utf-8")
    with pytest.raises(ParityError, match=r"reference cache .* is corrupt at line 1 .*delete it"):
        reference_runs(tmp_path, manifest, PROMPTS, ids_of(tiny), 4, loader=CountingLoader(tiny))


def test_cache_entry_of_another_format_is_ignored(tmp_path):
    path = tmp_path / CACHE_RELATIVE_PATH
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": {"format": 999, "prompt_id": "raw"}, "run": {}}) + "\n", encoding="utf-8")
    key = ReferenceKey.build("s", PROMPTS[0], [1, 2], 4, 4, [2], library_versions())
    assert ReferenceCache(path).get(key) is None


def test_source_with_other_weights_is_refused(tiny, manifest, monkeypatch):
    bad = {**manifest, "source": {**manifest["source"], "sha256": "f" * 64}}
    monkeypatch.setattr("exporters.sources.load_source", lambda ref: tiny)
    with pytest.raises(ParityError, match=r"not the one the artifact was exported from .*--reference"):
        load_reference_source(bad)
    assert load_reference_source(manifest) is tiny


def test_source_that_cannot_be_found_names_the_reference_flag(tmp_path):
    manifest = {"source": {"kind": "hf", "ref": "./gone", "path": str(tmp_path / "gone"), "sha256": "0" * 64}}
    with pytest.raises(ParityError, match=r"source model .*gone cannot be loaded .*pass --reference PATH"):
        load_reference_source(manifest)


# --------------------------------------------------------------------------------------------
# The shared cache (under LMFORGE_CACHE_DIR; tests/conftest.py gives each test its own)


def test_the_shared_cache_serves_another_artifact_of_the_same_source(tmp_path, tiny, manifest):
    loader = CountingLoader(tiny)
    first = reference_runs(tmp_path / "a", manifest, PROMPTS, ids_of(tiny), 8, top_k=4, loader=loader, progress=False)
    # a re-converted artifact (no parity/ folder) of the same source: nothing is recomputed …
    again = reference_runs(tmp_path / "b", manifest, PROMPTS, ids_of(tiny), 8, top_k=4, loader=loader, progress=False)
    assert loader.calls == 1
    assert all(again[p].tokens == first[p].tokens and np.array_equal(again[p].top_values, first[p].top_values)
               for p in ("raw", "chat"))
    # … and the new artifact carries the references from then on, without the shared cache
    assert (tmp_path / "b" / CACHE_RELATIVE_PATH).read_text() == (tmp_path / "a" / CACHE_RELATIVE_PATH).read_text()


def test_other_settings_have_their_own_shared_file_and_do_not_evict(tmp_path, tiny, manifest, _own_lmforge_cache):
    loader = CountingLoader(tiny)
    for n, folder in ((6, "a"), (7, "b"), (6, "c")):  # smoke at 6 tokens, 7, then 6 again elsewhere
        reference_runs(tmp_path / folder, manifest, PROMPTS, ids_of(tiny), n, top_k=4, loader=loader, progress=False)
    assert loader.calls == 2
    files = sorted((_own_lmforge_cache / "references").iterdir())
    assert len(files) == 2 and all(f.name.startswith(tiny.sha256[:16] + "-") for f in files)


def test_no_cache_computes_everything_and_writes_nothing(tmp_path, tiny, manifest, _own_lmforge_cache):
    loader = CountingLoader(tiny)
    cached = reference_runs(tmp_path / "a", manifest, PROMPTS, ids_of(tiny), 6, top_k=4, loader=loader,
                            progress=False)
    fresh = reference_runs(tmp_path / "b", manifest, PROMPTS, ids_of(tiny), 6, top_k=4, loader=loader,
                           progress=False, use_cache=False)
    assert loader.calls == 2
    assert fresh["raw"].tokens == cached["raw"].tokens
    assert not (tmp_path / "b").exists()
    assert len(list((_own_lmforge_cache / "references").iterdir())) == 1  # the first run's file only


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LMFORGE_CACHE_DIR": "{tmp}/mine", "XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/mine"),
        ({"LMFORGE_CACHE_DIR": "", "XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/lmforge"),
        ({"LMFORGE_CACHE_DIR": "", "XDG_CACHE_HOME": ""}, "{tmp}/home/.cache/lmforge"),
    ],
)
def test_cache_folder_follows_the_environment(tmp_path, monkeypatch, env, expected):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert user_cache_dir() == Path(expected.format(tmp=tmp_path))
    key = ReferenceKey.build("ab" * 32, PROMPTS[0], [1, 2], 4, 4, [2], library_versions())
    assert shared_cache_path(key).parent == Path(expected.format(tmp=tmp_path)) / "references"


def test_the_expected_time_is_stated_after_the_first_prompt(tmp_path, tiny, manifest, caplog):
    prompts = PROMPTS + [Prompt("third", "One, two,", False)]
    ids = {**ids_of(tiny), "third": encode_prompt(tiny.tokenizer, prompts[2])}
    with caplog.at_level(logging.INFO, logger="lmforge.progress"):
        reference_runs(tmp_path, manifest, prompts, ids, 4, loader=CountingLoader(tiny), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "lmforge.progress"]
    assert lines[0].startswith("reference: 3 prompt(s) to run with PyTorch fp32")
    assert re.fullmatch(r"reference: the first prompt took \d+\.\d s for 4 token\(s\); the other 2 "
                        r"\(up to 4 tokens each\) should take up to about \d+ s", lines[1]), lines[1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmforge.progress"):
        reference_runs(tmp_path, manifest, prompts, ids, 4, loader=CountingLoader(tiny), progress=False)
    assert [r.getMessage() for r in caplog.records if r.name == "lmforge.progress"] == [
        "reference: all 3 prompt(s) cached"]
