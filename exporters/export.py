"""torch → ONNX export with the KV cache, following the decoder IO contract (docs/architecture.md).

The model is wrapped in a module whose forward takes flat tensors — ``input_ids``,
``attention_mask``, ``position_ids`` and one ``past_key_values.{i}.key|value`` per layer — builds
a ``transformers`` ``DynamicCache`` from the pasts, runs the unmodified ``transformers`` model code
with eager attention, and returns ``logits`` and the flat ``present.{i}.key|value``. That wrapper
is exported with ``torch.onnx.export(dynamo=True)``: ``torch.export`` traces symbolic batch,
sequence and past lengths, so one graph serves prefill (past length 0) and decode (any past) at
any batch size, and left padding works through the attention mask and explicit position ids.

Eager attention (not SDPA) is exported on purpose: it leaves the MatMul/Softmax subgraph that the
attention fusions in ``passes/`` match, and runs on every ONNX Runtime execution provider.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

from exporters.cache_compat import cache_argument, output_cache
from exporters.sources import LoadedSource
from exporters.specs import ModelKind
from runtime.artifact import TensorSpec
from runtime.decoder_io import kv_names
from runtime.errors import ExportError

__all__ = ["ExportResult", "export_model", "OPSET", "MAX_IR_VERSION", "check_against_torch", "takes_position_ids",
           "encoder_input_names", "is_classifier"]

log = logging.getLogger(__name__)

OPSET = 18
# onnxruntime 1.31 refuses IR version 14; onnx 1.23 writes newer than ORT reads unless capped.
MAX_IR_VERSION = 10
EXTERNAL_DATA = "model.onnx.data"

_TORCH_TO_ONNX_DTYPE = {"torch.float32": "float32", "torch.float16": "float16", "torch.int64": "int64"}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kv_dtype: str | None
    opset: int
    ir_version: int


def _past_names(layers: int) -> list[str]:
    return kv_names(layers, "past")


def _present_names(layers: int) -> list[str]:
    return kv_names(layers, "present")


def is_classifier(loaded: LoadedSource) -> bool:
    """An encoder with a sequence-classification head (cross-encoder, re-ranker, NLI/sentiment)."""
    return loaded.spec.kind is ModelKind.ENCODER and type(loaded.model).__name__.endswith("ForSequenceClassification")


def takes_position_ids(loaded: LoadedSource) -> bool:
    """Whether the graph gets a ``position_ids`` input: not for ALiBi models, nor for a model
    whose ``forward`` takes none (it derives positions from the mask or the cache)."""
    import inspect

    try:
        declared = "position_ids" in inspect.signature(type(loaded.model).forward).parameters
    except (TypeError, ValueError):
        declared = True
    return loaded.spec.positions != "alibi" and declared


def _decoder_wrapper(loaded: LoadedSource, layers: int, with_positions: bool) -> Any:
    import torch
    from transformers import DynamicCache

    model = loaded.model
    cache_name = cache_argument(model)

    def run(input_ids: Any, attention_mask: Any, position_ids: Any, past: tuple[Any, ...]) -> tuple[Any, ...]:
        # Full (growing) layers for every layer, even where the config has a sliding window: the
        # concat contract returns the whole past + new KV, and the model's own sliding-window mask
        # (built from the config, not from the cache) keeps each layer to its window. A sliding
        # cache layer would instead cut the KV at the window with a length guard torch.export
        # cannot trace past (`past <= window - 1`).
        cache = DynamicCache()
        for i in range(layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        # The cache goes in under the name the model declares (``cache`` from transformers 5.24,
        # ``past_key_values`` before): the old name warns on 5.24 and is removed in 5.40.
        kwargs: dict[str, Any] = {cache_name: cache}
        if with_positions:
            kwargs["position_ids"] = position_ids
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        presents: list[Any] = []
        for layer in output_cache(out).layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)

    if with_positions:

        class DecoderWithPast(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
                return run(input_ids, attention_mask, position_ids, past)

    else:

        class DecoderWithPast(torch.nn.Module):  # type: ignore[no-redef]
            """ALiBi models (BLOOM) take positions from the mask: no position_ids input."""

            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any, *past: Any) -> tuple[Any, ...]:
                return run(input_ids, attention_mask, None, past)

    return DecoderWithPast().eval()


def encoder_input_names(loaded: LoadedSource) -> list[str]:
    """The encoder graph's inputs: ``input_ids``, ``attention_mask`` and, only where the model has
    more than one token type, ``token_type_ids`` (BERT, ELECTRA). RoBERTa-style checkpoints
    (``type_vocab_size`` 1), DeBERTa-v3 (0), and models whose ``forward`` takes none (DistilBERT,
    MPNet, ModernBERT) get no ``token_type_ids`` input: a constant input would be a trap."""
    import inspect

    try:
        declared = "token_type_ids" in inspect.signature(type(loaded.model).forward).parameters
    except (TypeError, ValueError):
        declared = False
    types = int(getattr(loaded.config, "type_vocab_size", 0) or 0)
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if declared and types > 1 else [])


def _encoder_outputs(out: Any) -> tuple[Any, ...]:
    """``logits`` for a sequence-classification head; else ``last_hidden_state`` (+ ``pooler_output``)."""
    if getattr(out, "logits", None) is not None:
        return (out.logits,)
    if getattr(out, "pooler_output", None) is not None:
        return out.last_hidden_state, out.pooler_output
    return (out.last_hidden_state,)


def _encoder_wrapper(loaded: LoadedSource) -> Any:
    import torch

    model = loaded.model

    if "token_type_ids" in encoder_input_names(loaded):

        class Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> tuple[Any, ...]:
                return _encoder_outputs(model(input_ids=input_ids, attention_mask=attention_mask,
                                              token_type_ids=token_type_ids))
    else:

        class Encoder(torch.nn.Module):  # type: ignore[no-redef]
            """One token type (RoBERTa, DeBERTa-v3) or none in ``forward`` (DistilBERT, MPNet, ModernBERT)."""

            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, ...]:
                return _encoder_outputs(model(input_ids=input_ids, attention_mask=attention_mask))

    return Encoder().eval()


def encoder_output_names(n_outputs: int, classifier: bool) -> list[str]:
    return ["logits"] if classifier else ["last_hidden_state", "pooler_output"][:n_outputs]


def dummy_decoder_inputs(
    loaded: LoadedSource, batch: int, seq: int, past: int, layers: int, kv_heads: int, head_dim: int,
    with_positions: bool, pad_first: int = 0, seed: int = 0,
) -> tuple[list[str], tuple[Any, ...]]:
    """Deterministic decoder inputs; the first row is left-padded by ``pad_first`` positions."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = int(loaded.config.vocab_size)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    if pad_first:
        attention_mask[0, :pad_first] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    pasts = tuple(torch.randn(batch, kv_heads, past, head_dim, generator=gen) for _ in range(2 * layers))
    names = ["input_ids", "attention_mask"] + (["position_ids"] if with_positions else []) + _past_names(layers)
    values = (input_ids, attention_mask) + ((position_ids,) if with_positions else ()) + pasts
    return names, values


def _rename_io_dims(model_proto: Any, axes: dict[str, dict[int, str]]) -> None:
    """Give graph inputs/outputs the contract's axis names (torch.export names them s0, s53…)."""
    for value in list(model_proto.graph.input) + list(model_proto.graph.output):
        wanted = axes.get(value.name)
        if wanted is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for index, name in wanted.items():
            if index < len(dims) and not dims[index].HasField("dim_value"):
                dims[index].dim_param = name


def _io_specs(model_proto: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    def spec(value: Any) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in tensor_type.shape.dim)
        return TensorSpec(value.name, dtype, shape)

    return [spec(v) for v in model_proto.graph.input], [spec(v) for v in model_proto.graph.output]


def export_model(loaded: LoadedSource, out_dir: Path, layers: int, kv_heads: int, head_dim: int) -> ExportResult:
    """Export ``loaded`` to ``out_dir/model.onnx`` (+ ``model.onnx.data``); return its IO."""
    import onnx
    import torch

    model_path = out_dir / "model.onnx"
    is_decoder = loaded.spec.kind is ModelKind.DECODER
    with_positions = takes_position_ids(loaded)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=1 << 20)
    if is_decoder:
        wrapper = _decoder_wrapper(loaded, layers, with_positions)
        past = torch.export.Dim("past", min=0, max=1 << 20)
        names, values = dummy_decoder_inputs(loaded, 2, 3, 5, layers, kv_heads, head_dim, with_positions)
        fixed: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}]
        if with_positions:
            fixed.append({0: batch, 1: seq})
        dynamic_shapes: tuple[Any, ...] = (*fixed, tuple({0: batch, 2: past} for _ in range(2 * layers)))
        output_names = ["logits"] + _present_names(layers)
        axes: dict[str, dict[int, str]] = {
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"},
            "logits": {0: "batch", 1: "seq"},
        }
        for name in _past_names(layers):
            axes[name] = {0: "batch", 2: "past"}
        for name in _present_names(layers):
            axes[name] = {0: "batch", 2: "total"}
    else:
        wrapper = _encoder_wrapper(loaded)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, int(loaded.config.vocab_size), (2, 7), generator=gen)
        mask = torch.ones(2, 7, dtype=torch.int64)
        mask[0, -2:] = 0
        names = encoder_input_names(loaded)
        values = (ids, mask, torch.zeros_like(ids))[:len(names)]
        dynamic_shapes = tuple({0: batch, 1: seq} for _ in names)
        with torch.no_grad():
            n_out = len(wrapper(*values))
        output_names = encoder_output_names(n_out, is_classifier(loaded))
        axes = {n: {0: "batch", 1: "seq"} for n in names}
        axes["last_hidden_state"] = {0: "batch", 1: "seq"}
        axes["pooler_output"] = {0: "batch"}
        axes["logits"] = {0: "batch"}

    quiet = not log.isEnabledFor(logging.DEBUG)
    if quiet:
        # torch's exporter logs one warning per optional torchvision op it cannot register and
        # warns about axis renames; neither concerns a transformer. torch resets its loggers on
        # import, so this has to happen here, not in the CLI.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                wrapper,
                values,
                input_names=names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                opset_version=OPSET,
                external_data=True,
                optimize=True,
                verbose=False,
            )
        if program is None:  # torch returns None only when asked to write the file itself
            raise ExportError("torch.onnx.export returned no program", fix="report this with your torch version")
        program.save(str(model_path), external_data=True)
    except ExportError:
        raise
    except Exception as exc:  # torch.export raises many types
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch.onnx.export failed for {loaded.info.ref} ({first})",
            fix="run with --debug for the full trace; this architecture may need an exporter patch",
        ) from exc

    proto = onnx.load(str(model_path), load_external_data=False)
    _rename_io_dims(proto, axes)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.save_model(proto, str(model_path))
    data_files = {p.name for p in out_dir.iterdir() if p.name != "model.onnx"}
    if data_files and data_files != {EXTERNAL_DATA}:
        log.debug("export wrote extra files: %s", data_files)
    inputs, outputs = _io_specs(proto)
    kv_dtype = None
    if is_decoder:
        present = [o for o in outputs if o.name.startswith("present.")]
        kv_dtype = present[0].dtype if present else None
    return ExportResult(inputs, outputs, kv_dtype, OPSET, proto.ir_version)


def check_against_torch(
    loaded: LoadedSource, model_path: Path, layers: int, kv_heads: int, head_dim: int
) -> float:
    """Run ORT (CPU) and PyTorch on a left-padded prefill and one decode step; return max |Δlogits|."""
    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    input_names = {i.name for i in session.get_inputs()}
    if loaded.spec.kind is ModelKind.ENCODER:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, int(loaded.config.vocab_size), (2, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        values = (ids, mask, torch.zeros_like(ids))[:len(input_names)]
        output = "logits" if is_classifier(loaded) else "last_hidden_state"
        with torch.no_grad():
            ref = _encoder_wrapper(loaded)(*values)[0].numpy()
        feed = {n: v.numpy() for n, v in zip(encoder_input_names(loaded), values)}
        got = session.run([output], feed)[0]
        if output == "logits":
            return float(np.abs(got - ref).max())
        real = mask.numpy().astype(bool)  # padded rows' hidden states are not used by any pooling
        return float(np.abs(got - ref)[real].max())

    with_positions = "position_ids" in input_names
    worst = 0.0
    for batch, seq, past, pad in ((2, 6, 0, 2), (2, 1, 6, 2)):
        names, values = dummy_decoder_inputs(
            loaded, batch, seq, past, layers, kv_heads, head_dim, with_positions, pad_first=pad, seed=past + 7
        )
        wrapper = _decoder_wrapper(loaded, layers, with_positions)
        with torch.no_grad():
            want = wrapper(*values)[0].numpy()
        feed = {n: v.numpy() for n, v in zip(names, values)}
        got = session.run(["logits"], feed)[0]
        valid = feed["attention_mask"][:, past:].astype(bool)  # compare real (non-pad) positions only
        worst = max(worst, float(np.abs(got - want)[valid].max()))
    return worst
