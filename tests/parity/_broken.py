"""Build a deliberately broken copy of an fp32 artifact: one weight of one layer perturbed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from runtime.artifact import MANIFEST_NAME, sha256_file

__all__ = ["perturb_weight", "rewrite_file_hashes"]


def rewrite_file_hashes(folder: Path) -> None:
    """Recompute the manifest's ``files`` (sizes and sha256) after editing files in place."""
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["files"] = {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in manifest["files"]
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def perturb_weight(source: Path, out: Path, scope: str = "layers.1.mlp.down_proj", scale: float = 1.5) -> str:
    """Copy ``source`` to ``out`` and multiply the weight of the MatMul exported from the module
    ``scope`` by ``scale``; return that MatMul's node name."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(source, out)
    model_path = out / "model.onnx"
    model = onnx.load(str(model_path))  # with its external data
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        if node.op_type == "MatMul" and f"{scope}:" in namespace:
            weight = next(name for name in node.input if name in initializers)
            tensor = initializers[weight]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(scale), weight))
            break
    else:
        raise AssertionError(f"no MatMul from {scope} in {source}")
    (out / "model.onnx.data").unlink()
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")
    rewrite_file_hashes(out)
    return node.name
