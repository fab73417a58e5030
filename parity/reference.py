"""The PyTorch reference: eager fp32 greedy generation on the artifact's source model, with the
top-k logits of every step, cached in the artifact folder.

Reference = what the source model itself does: loaded through :func:`exporters.sources.load_source`
(fp32, eval, eager attention) and run on the CPU, one prompt at a time, with a plain KV-cache loop
(no ``generate()``: its logits processors and generation-config defaults must not decide the
reference's tokens). At each step the token is the argmax of the fp32 logits; the top-k ids and
values are kept (``torch.topk``, sorted), and generation stops after an end-of-sequence token or
``max_new_tokens``.

The reference consumes *token ids*, not text: ``verify`` encodes each prompt once (with the
artifact's tokenizer and chat template) and gives both runs the same ids, so that a numerical
comparison is never confounded by a tokenizer difference. :func:`encode_prompt` encodes with the
source's Hugging Face tokenizer, for the tokenizer parity check and for callers without a runtime.

Caches, one JSON object a line, ``{"key": {...}, "run": {...}}``, in two places:

- ``ARTIFACT/parity/reference.jsonl``, which travels with the artifact (and seeds the artifacts
  ``optimize`` makes from it), so an artifact can be verified where its source model is absent;
- a shared cache, ``references/<source sha256>-<settings digest>.jsonl`` under
  :func:`user_cache_dir` (``$LMFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmforge``, else
  ``~/.cache/lmforge``), one file per source and generation settings, so that re-converting the
  same source (``make export`` replaces the artifact, cache and all) or converting it to another
  folder does not recompute the references: on two cores the reference is the slow part of a
  verify, about a minute a prompt for SmolLM2-135M under load.

An entry is used only when its whole key matches: source weights sha256 (the manifest's), prompt
text and chat flag, the prompt's token ids, ``max_new_tokens``, ``top_k``, the end-of-sequence ids,
the torch and transformers versions and this module's format version. A verify on a new precision
of the same artifact lineage therefore reuses the references, and anything that could change them
makes the entry stale: a stale entry is never used, and is recomputed (replacing it in the file)
when the source model can be loaded. When it cannot – the weights moved, or changed since export –
:class:`ParityError` says so and how to point ``--reference`` at them. A cache file that cannot be
parsed is refused rather than silently overwritten. ``use_cache=False`` (``verify --no-cache``)
reads and writes neither cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from parity.compare import ReferenceRun
from parity.prompts import Prompt
from runtime.errors import LmforgeError, ParityError

__all__ = [
    "REFERENCE_FORMAT",
    "CACHE_RELATIVE_PATH",
    "DEFAULT_TOP_K",
    "ReferenceKey",
    "ReferenceCache",
    "CACHE_DIR_ENV",
    "user_cache_dir",
    "shared_cache_path",
    "library_versions",
    "encode_prompt",
    "generate_reference",
    "load_reference_source",
    "reference_runs",
]

log = logging.getLogger(__name__)
progress_log = logging.getLogger("lmforge.progress")  # what a person waiting sees (lmforge.cli prints it)

REFERENCE_FORMAT = 1  # bump when the generation loop or the stored data change meaning
CACHE_RELATIVE_PATH = Path("parity") / "reference.jsonl"
DEFAULT_TOP_K = 20
CACHE_DIR_ENV = "LMFORGE_CACHE_DIR"


def user_cache_dir() -> Path:
    """lmforge's cache folder: ``$LMFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmforge``, else
    ``~/.cache/lmforge`` (an empty variable counts as unset)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lmforge"
    return Path.home() / ".cache" / "lmforge"


def library_versions() -> dict[str, str]:
    """torch and transformers versions, read from package metadata (no import, so cache hits stay cheap)."""
    versions = {}
    for name in ("torch", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class ReferenceKey:
    """Everything a reference run depends on; equal keys ⇒ the cached run may be reused."""

    source_sha256: str
    prompt_id: str
    prompt_sha256: str  # of the prompt text
    chat: bool
    input_ids_sha256: str
    max_new_tokens: int
    top_k: int
    eos_token_ids: tuple[int, ...]
    torch: str
    transformers: str
    format: int = REFERENCE_FORMAT

    @classmethod
    def build(
        cls,
        source_sha256: str,
        prompt: Prompt,
        input_ids: Sequence[int],
        max_new_tokens: int,
        top_k: int,
        eos_token_ids: Sequence[int],
        versions: Mapping[str, str] | None = None,
    ) -> ReferenceKey:
        versions = library_versions() if versions is None else versions
        return cls(
            source_sha256=source_sha256,
            prompt_id=prompt.id,
            prompt_sha256=_sha256_text(prompt.prompt),
            chat=prompt.chat,
            input_ids_sha256=_sha256_text(",".join(str(int(t)) for t in input_ids)),
            max_new_tokens=int(max_new_tokens),
            top_k=int(top_k),
            eos_token_ids=tuple(sorted(int(t) for t in eos_token_ids)),
            torch=versions["torch"],
            transformers=versions["transformers"],
        )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReferenceKey:
        values = dict(data)
        values["eos_token_ids"] = tuple(values.get("eos_token_ids", ()))
        return cls(**values)

    def settings_digest(self) -> str:
        """sha256 of the fields every prompt of one run shares: source, generation settings, versions."""
        shared = {k: v for k, v in self.to_json().items() if k not in ("prompt_id", "prompt_sha256", "chat",
                                                                       "input_ids_sha256")}
        return _sha256_text(json.dumps(shared, sort_keys=True))

    def stale_fields(self, other: ReferenceKey) -> list[str]:
        """The fields in which a cached key differs from this one (for the log)."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def shared_cache_path(key: ReferenceKey, root: str | os.PathLike[str] | None = None) -> Path:
    """The shared cache file for ``key``'s source and settings, under ``root`` (default
    :func:`user_cache_dir`)."""
    base = Path(root) if root is not None else user_cache_dir()
    return base / "references" / f"{key.source_sha256[:16]}-{key.settings_digest()[:16]}.jsonl"


class ReferenceCache:
    """A reference cache file (``parity/reference.jsonl`` in an artifact folder, or a shared one):
    read once, one entry per prompt id, updated atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._entries: dict[str, tuple[ReferenceKey, dict[str, Any]]] = {}  # prompt id → (key, run json)
        self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ParityError(
                f"reference cache {self.path} cannot be read ({exc})", fix="delete it to recompute the references"
            ) from exc
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if entry["key"].get("format") != REFERENCE_FORMAT:
                    log.info("reference cache %s line %d has another format version: ignored", self.path, lineno)
                    continue
                key = ReferenceKey.from_json(entry["key"])
                run = entry["run"]
                if not isinstance(run, dict) or run.get("prompt_id") != key.prompt_id:
                    raise ValueError("run does not belong to its key")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ParityError(
                    f"reference cache {self.path} is corrupt at line {lineno} ({type(exc).__name__}: {exc})",
                    fix="delete it; the references are recomputed from the source model",
                ) from exc
            self._entries[key.prompt_id] = (key, run)

    def get(self, key: ReferenceKey) -> ReferenceRun | None:
        """The cached run for exactly this key, else None (a stale entry is logged, never used)."""
        found = self._entries.get(key.prompt_id)
        if found is None:
            return None
        cached_key, run = found
        if cached_key != key:
            log.info(
                "reference for %s is stale (%s changed): recomputing",
                key.prompt_id,
                ", ".join(key.stale_fields(cached_key)),
            )
            return None
        return ReferenceRun.from_json(run)

    def has(self, key: ReferenceKey) -> bool:
        """Whether an entry for exactly this key is present (no log, no decoding)."""
        found = self._entries.get(key.prompt_id)
        return found is not None and found[0] == key

    def put(self, key: ReferenceKey, run: ReferenceRun) -> None:
        if run.prompt_id != key.prompt_id:
            raise ParityError(
                "reference run and key name different prompts", got=f"{run.prompt_id!r} and {key.prompt_id!r}"
            )
        self._entries[key.prompt_id] = (key, run.to_json())

    def save(self) -> None:
        """Write all entries atomically (temporary file + ``os.replace``); a read-only artifact only warns."""
        lines = [
            json.dumps({"key": key.to_json(), "run": run}, ensure_ascii=False, allow_nan=False)
            for key, run in self._entries.values()
        ]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".reference-", suffix=".jsonl.tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                    fh.write("\n".join(lines) + ("\n" if lines else ""))
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the cache is shared like the artifact
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning(
                "cannot write the reference cache %s (%s); references will be recomputed next time", self.path, exc
            )


# --------------------------------------------------------------------------------------------
# Generation


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt with the source's Hugging Face tokenizer (chat template when ``chat``)."""
    if prompt.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ParityError(
                f"prompt {prompt.id!r} is a chat prompt but the source tokenizer has no chat template",
                fix="use a prompts file without chat prompts for this model",
            )
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        ids = tokenizer(prompt.prompt)["input_ids"]
    return [int(t) for t in ids]


def generate_reference(
    model: Any,
    prompt_id: str,
    input_ids: Sequence[int],
    max_new_tokens: int,
    *,
    top_k: int = DEFAULT_TOP_K,
    eos_token_ids: Sequence[int] = (),
) -> ReferenceRun:
    """Greedy fp32 generation with a KV cache, keeping the top-k logits of every step."""
    import numpy as np
    import torch

    from exporters.cache_compat import cache_kwargs, output_cache

    if max_new_tokens < 1:
        raise ParityError("max_new_tokens must be at least 1", got=str(max_new_tokens))
    if not input_ids:
        raise ParityError(f"prompt {prompt_id!r} encodes to no tokens")
    eos = {int(t) for t in eos_token_ids}
    tokens: list[int] = []
    top_ids: list[np.ndarray] = []
    top_values: list[np.ndarray] = []
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        for step in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            k = min(top_k, logits.shape[-1])
            values, indices = torch.topk(logits, k, sorted=True)
            token = int(torch.argmax(logits))
            tokens.append(token)
            top_ids.append(indices.numpy().astype(np.int64))
            top_values.append(values.numpy().astype(np.float32))
            if token in eos or step == max_new_tokens - 1:
                break
            length = ids.shape[1] + len(tokens)
            out = model(
                input_ids=torch.tensor([[token]], dtype=torch.long),
                attention_mask=torch.ones((1, length), dtype=torch.long),
                use_cache=True,
                **cache_kwargs(model, output_cache(out)),  # `cache=` on transformers 5.24+, warns otherwise
            )
    return ReferenceRun(
        prompt_id=prompt_id, tokens=tuple(tokens), top_ids=np.stack(top_ids), top_values=np.stack(top_values)
    )


def load_reference_source(manifest: Mapping[str, Any], override: str | None = None) -> Any:
    """Load the source model an artifact was exported from (or ``override``), check that its
    weights are the ones the manifest recorded, and return ``exporters.sources.LoadedSource``."""
    from exporters.sources import load_source

    source = manifest.get("source") or {}
    ref: str | None
    if override is not None:
        ref = override
    elif source.get("kind") in ("hf", "gguf") and source.get("path"):
        ref = str(Path(source["path"]) / source["gguf_file"]) if source.get("gguf_file") else str(source["path"])
    else:
        ref = source.get("ref")
    if not ref:
        raise ParityError(
            "the manifest does not record the source model", fix="pass --reference PATH to the source model"
        )
    try:
        loaded = load_source(ref)
    except LmforgeError as exc:
        raise ParityError(
            f"the artifact's source model {ref} cannot be loaded for the reference ({exc.what})",
            fix="pass --reference PATH pointing at the source model (a Hugging Face folder or a .gguf file)",
        ) from exc
    expected = source.get("sha256")
    if expected and loaded.sha256 != expected:
        raise ParityError(
            f"the source model {ref} is not the one the artifact was exported from (weights sha256 differs)",
            expected=expected[:16] + "…",
            got=loaded.sha256[:16] + "…",
            fix="pass --reference PATH to the original weights, or re-export the artifact from these",
        )
    return loaded


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def reference_runs(
    artifact_dir: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    prompts: Sequence[Prompt],
    input_ids: Mapping[str, Sequence[int]],
    max_new_tokens: int,
    *,
    top_k: int = DEFAULT_TOP_K,
    eos_token_ids: Sequence[int] | None = None,
    reference: str | None = None,
    allow_compute: bool = True,
    progress: bool = True,
    use_cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    loader: Callable[[Mapping[str, Any], str | None], Any] = load_reference_source,
) -> dict[str, ReferenceRun]:
    """The reference run of every prompt, from the artifact's cache or the shared one (under
    ``cache_dir``, default :func:`user_cache_dir`) where its key matches, else computed (the source
    model is loaded only if some prompt needs it); both caches are then brought up to date.

    ``input_ids`` maps prompt id → the token ids both runs use. ``eos_token_ids`` default to the
    manifest's ``generation.eos_token_ids``. With ``allow_compute=False`` a missing or stale
    entry raises :class:`ParityError` instead of loading the source; with ``use_cache=False``
    every reference is computed and no cache is read or written. Before a long computation the
    expected time is logged on ``lmforge.progress``, from the first prompt's time.
    """
    source_sha = (manifest.get("source") or {}).get("sha256")
    if not source_sha:
        raise ParityError("the manifest does not record the source weights' sha256", fix="re-export the artifact")
    if eos_token_ids is None:
        eos_token_ids = (manifest.get("generation") or {}).get("eos_token_ids", [])
    missing_ids = [p.id for p in prompts if p.id not in input_ids]
    if missing_ids:
        raise ParityError("no token ids given for some prompts", got=", ".join(missing_ids[:5]))
    if not prompts:
        return {}

    versions = library_versions()
    keys = {
        p.id: ReferenceKey.build(source_sha, p, input_ids[p.id], max_new_tokens, top_k, eos_token_ids, versions)
        for p in prompts
    }
    caches: list[ReferenceCache] = []
    if use_cache:
        shared = shared_cache_path(keys[prompts[0].id], cache_dir)
        caches = [ReferenceCache(Path(artifact_dir) / CACHE_RELATIVE_PATH), ReferenceCache(shared)]
    runs: dict[str, ReferenceRun] = {}
    todo: list[Prompt] = []
    for prompt in prompts:
        cached = next((run for cache in caches if (run := cache.get(keys[prompt.id])) is not None), None)
        if cached is None:
            todo.append(prompt)
        else:
            runs[prompt.id] = cached
    log.info("references: %d cached, %d to compute", len(runs), len(todo))
    if todo and not allow_compute:
        where = caches[0].path if caches else "no cache (use_cache=False)"
        raise ParityError(
            f"{len(todo)} reference(s) are missing or stale in {where} ({', '.join(p.id for p in todo[:5])})",
            fix="run verify where the source model and torch are available, to compute them",
        )
    if todo:
        cached_note = f"{len(runs)} cached, " if runs else ""
        progress_log.info("reference: %d prompt(s) to run with PyTorch fp32, one at a time (%s%s)", len(todo),
                          cached_note, f"cached afterwards in {caches[1].path.parent}" if caches else "no cache")
        loaded = loader(manifest, reference)
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # the estimate's line above the bar, not inside it, where the command line prints these lines
        printed = any(isinstance(h, logging.StreamHandler) for h in progress_log.handlers)
        with logging_redirect_tqdm(loggers=[progress_log]) if printed else contextlib.nullcontext():
            for index, prompt in enumerate(tqdm(todo, desc="reference (torch fp32)", unit="prompt",
                                                disable=not progress)):
                t0 = time.perf_counter()
                runs[prompt.id] = generate_reference(loaded.model, prompt.id, input_ids[prompt.id], max_new_tokens,
                                                     top_k=top_k, eos_token_ids=eos_token_ids)
                if index == 0 and len(todo) > 1:
                    # Per token, since a prompt may stop early at an end-of-sequence token: an upper
                    # bound at the first prompt's pace (which includes torch's warm-up).
                    took, steps = time.perf_counter() - t0, max(1, runs[prompt.id].steps)
                    bound = took / steps * max_new_tokens * (len(todo) - 1)
                    progress_log.info("reference: the first prompt took %.1f s for %d token(s); the other %d "
                                      "(up to %d tokens each) should take up to about %s",
                                      took, steps, len(todo) - 1, max_new_tokens, _duration(bound))
    elif caches:
        progress_log.info("reference: all %d prompt(s) cached", len(runs))
    for cache in caches:
        missing = [p for p in prompts if not cache.has(keys[p.id])]
        for prompt in missing:
            cache.put(keys[prompt.id], runs[prompt.id])
        if missing:
            cache.save()
    return {p.id: runs[p.id] for p in prompts}
