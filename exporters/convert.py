"""``convert``: source model → verified fp32 ``concat`` artifact, written atomically."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from exporters.encoder_specs import encoder_max_positions
from exporters.export import check_against_torch, export_model, is_classifier
from exporters.sources import describe_dims, load_source, resolve_source, sentence_transformers_config
from exporters.specs import ModelKind
from runtime.artifact import FORMAT_VERSION, MANIFEST_NAME, KvMode, lmforge_version, write_artifact
from runtime.decoder_io import kv_record
from runtime.errors import ExportError
from runtime.sampler_graph import write_sampler

__all__ = ["convert", "EXPORT_TOLERANCE", "classifier_head"]

log = logging.getLogger(__name__)

# fp32 ONNX vs PyTorch eager: a correct export differs by float reordering only (~1e-5 on logits
# of magnitude ~10). Anything past this is a broken graph, and the artifact is not written.
EXPORT_TOLERANCE = 1e-3


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "lmforge": lmforge_version(),
    }


class _Stages:
    """Progress over named stages: a tqdm bar on a terminal; otherwise (a pipe, a log file, CI) one
    line when a stage starts and one with its elapsed time when it ends, on the ``lmforge.progress``
    logger, which the command line prints at its default verbosity (``lmforge.cli``)."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=len(names), unit="step", disable=not enabled, file=sys.stderr,
                         bar_format="{desc:<34} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]")
        self._lines = logging.getLogger("lmforge.progress") if not enabled else None
        self._total = len(names)
        self._index = 0
        self._started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._current: str | None = None

    def start(self, name: str) -> None:
        self._finish_current()
        self._current = name
        self._index += 1
        self._t0 = time.perf_counter()
        self._bar.set_description_str(name)
        if self._lines is not None:
            self._lines.info("[%d/%d] %s …", self._index, self._total, name)
        else:
            log.info("%s …", name)

    def _finish_current(self) -> None:
        if self._current is not None:
            elapsed = time.perf_counter() - self._t0
            self.timings[self._current] = round(elapsed, 2)
            self._bar.update(1)
            if self._lines is not None:
                self._lines.info("[%d/%d] %s: %.1f s", self._index, self._total, self._current, elapsed)
            self._current = None

    def close(self) -> None:
        self._finish_current()
        self._bar.close()


def convert(
    source: str,
    out: str | Path,
    force: bool = False,
    max_context: int | None = None,
    progress: bool | None = None,
    check: bool = True,
) -> Path:
    """Convert ``source`` into an fp32 artifact at ``out``; return ``out``.

    Raises :class:`ExportError` / :class:`ArtifactError` with a one-line message; on any failure
    nothing is left at ``out`` (an existing ``out`` is only replaced with ``force``, at the end).
    """
    out = Path(out)
    if out.exists() and not force:
        from runtime.errors import ArtifactError

        raise ArtifactError(f"output {out} already exists", fix="choose another path or pass --force to replace it")
    if max_context is not None and max_context < 2:
        raise ExportError("--max-context must be at least 2", got=str(max_context))
    info = resolve_source(source)  # cheap checks first: bad paths fail before torch is imported
    # The export extra, before any progress line: without it the CLI's one-line "needs the 'export'
    # extra" error is all a user sees.
    import torch  # noqa: F401
    import transformers  # noqa: F401

    show = sys.stderr.isatty() if progress is None else progress
    stages = _Stages(["load", "export", "check", "write"], enabled=show)
    started = time.perf_counter()
    try:
        with write_artifact(out, force=force) as tmp:
            stages.start(f"loading {source}")
            loaded = load_source(info)
            arch = describe_dims(loaded)
            if loaded.spec.kind is ModelKind.ENCODER:  # RoBERTa-style positions start past the pad id
                arch["max_positions"] = encoder_max_positions(loaded.spec.positions, arch["max_positions"],
                                                              getattr(loaded.config, "pad_token_id", None))
            arch["max_context"] = _max_context(loaded, arch, max_context)
            layers, kv_heads, head_dim = arch["layers"], arch["kv_heads"], arch["head_dim"]

            stages.start("exporting to ONNX")
            result = export_model(loaded, tmp, layers, kv_heads, head_dim)

            diff = None
            if check:
                stages.start("checking ONNX against PyTorch")
                diff = check_against_torch(loaded, tmp / "model.onnx", layers, kv_heads, head_dim)
                if not diff <= EXPORT_TOLERANCE:
                    raise ExportError(
                        f"exported graph disagrees with PyTorch: max |Δ| = {diff:.3g}",
                        expected=f"≤ {EXPORT_TOLERANCE:g}",
                        fix="run with --debug and report it; the artifact was not written",
                    )

            stages.start("writing tokenizer and manifest")
            _write_tokenizer(loaded, tmp)
            is_decoder = loaded.spec.kind is ModelKind.DECODER
            manifest: dict[str, Any] = {
                "format_version": FORMAT_VERSION,
                "model_kind": loaded.spec.kind.value,
                "source": info.to_json(loaded.sha256),
                "architecture": arch,
                "precision": "fp32",
                "device": "any",
                "kv_mode": (KvMode.CONCAT if is_decoder else KvMode.NONE).value,
                "io": {
                    "inputs": [t.to_json() for t in result.inputs],
                    "outputs": [t.to_json() for t in result.outputs],
                },
                "generation": loaded.generation,
                "passes": [],
                "tools": _tool_versions(),
                "export": {
                    "opset": result.opset,
                    "ir_version": result.ir_version,
                    "check_max_abs_diff": diff,
                    "seconds": round(time.perf_counter() - started, 2),
                },
            }
            if not is_decoder:  # pooling / normalization / max length, read by runtime.Encoder
                manifest["encoder"] = sentence_transformers_config(info.path)
                # does the tokenizer hand the model token types? (a tokenizer whose model_input_names
                # lacks them — no token type ids for a pair — means the model saw zeros)
                names = getattr(loaded.tokenizer, "model_input_names", None) or ["token_type_ids"]
                manifest["encoder"]["token_type_ids"] = "token_type_ids" in names
                if is_classifier(loaded):
                    manifest["encoder"].update(classifier_head(loaded.config))
            if is_decoder:
                logits = next(t for t in result.outputs if t.name == "logits")
                manifest["sampler"] = write_sampler(tmp, logits.dtype, int(arch["vocab"]))
                manifest["kv"] = kv_record(str(result.kv_dtype))
            with open(tmp / "generation_config.json", "w", encoding="utf-8") as fh:
                json.dump(loaded.generation, fh, indent=2)
            with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=2)
            stages.close()
    finally:
        stages.close()
    log.info("converted %s → %s in %.1f s (%s)", source, out, time.perf_counter() - started, stages.timings)
    return out


def _max_context(loaded: Any, arch: dict[str, Any], requested: int | None) -> int:
    limit = arch.get("max_positions")
    default = min(limit, loaded.spec.default_max_context) if limit else loaded.spec.default_max_context
    if requested is None:
        return int(default)
    if limit and requested > limit and loaded.spec.positions.startswith("learned"):
        raise ExportError(
            f"--max-context {requested} is longer than {loaded.spec.name}'s learned positions",
            expected=f"≤ {limit}",
            fix=f"pass --max-context {limit} or less",
        )
    if limit and requested > limit:
        log.warning("max context %d exceeds the model's trained %d positions", requested, limit)
    return int(requested)


_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Softmax": "softmax", "Tanh": "tanh"}


def classifier_head(config: Any) -> dict[str, Any]:
    """The manifest's record of a sequence-classification head: labels and the score activation.

    The activation is the one sentence-transformers' ``CrossEncoder`` applies: ``activation_fn``
    (or ``sbert_ce_default_activation_function``) from the config's ``sentence_transformers`` block
    where the checkpoint names one, else sigmoid for one label (a re-ranker's relevance) and softmax
    over several (a classifier's label probabilities), as TEI's ``/rerank`` and ``/predict`` do.
    """
    labels_map = getattr(config, "id2label", None) or {}
    count = int(getattr(config, "num_labels", None) or len(labels_map) or 1)
    labels = [str(labels_map.get(i, labels_map.get(str(i), f"LABEL_{i}"))) for i in range(count)]
    st = getattr(config, "sentence_transformers", None) or {}
    named = st.get("activation_fn") if isinstance(st, dict) else None
    named = named or getattr(config, "sbert_ce_default_activation_function", None)
    activation = _ACTIVATIONS.get(str(named).rsplit(".", 1)[-1]) if named else None
    return {"head": "sequence-classification", "labels": labels,
            "activation": activation or ("sigmoid" if count == 1 else "softmax"),
            "activation_from": "the checkpoint's sentence-transformers config" if activation else "default"}


def _write_tokenizer(loaded: Any, tmp: Path) -> None:
    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    if loaded.tokenizer is None:
        return
    loaded.tokenizer.save_pretrained(str(tok_dir))
    if not (tok_dir / "tokenizer.json").is_file():
        raise ExportError(
            "the tokenizer has no fast (tokenizer.json) form, which the runtime needs",
            fix="use a model whose tokenizer transformers can convert to a fast tokenizer",
        )
