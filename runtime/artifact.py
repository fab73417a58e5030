"""The lmforge artifact: a folder with ``manifest.json``, ``model.onnx`` (+ external data), the
tokenizer and the generation config.

This module owns reading, validating and writing the format; every other package goes through
it. It imports nothing beyond the standard library so that a service can validate an artifact
before it loads onnxruntime.

Validation refuses, before onnxruntime opens anything:

* a folder without ``manifest.json``, or a manifest that is not JSON or lacks required keys;
* an unknown ``format_version``;
* a file listed in the manifest that is absent, or whose size or sha256 differs;
* a file name in the manifest that is not a plain name inside the folder;
* external data in ``model.onnx`` whose location is outside the folder or not in the manifest.

The last check walks the ONNX protobuf with a small reader (:func:`external_data_locations`)
rather than importing ``onnx``: ``runtime`` may depend on onnxruntime, numpy and tokenizers only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import enum
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runtime._onnx_proto import read_varint
from runtime.errors import ArtifactError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MODEL_NAME",
    "KvMode",
    "TensorSpec",
    "Artifact",
    "load_artifact",
    "write_artifact",
    "check_output",
    "BUILD_MARKER",
    "sha256_file",
    "external_data_locations",
    "lmforge_version",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
_REQUIRED_KEYS = ("format_version", "source", "architecture", "precision", "kv_mode", "io", "files")
# Dimensions every artifact records (positive ints), and those a decoder's runtime also reads.
_ARCH_DIMS = ("layers", "vocab")
_DECODER_DIMS = ("heads", "kv_heads", "head_dim", "max_context")
# A file that marks an ``OUT.tmp-*`` folder as lmforge's build in progress (pid and host inside);
# it never reaches the finished artifact. Only folders carrying it are ever cleaned up.
BUILD_MARKER = ".lmforge-build"


class KvMode(str, enum.Enum):
    """How the decoder graph carries its KV cache (docs/architecture.md, "The decoder's IO contract")."""

    CONCAT = "concat"
    SHARED_BUFFER = "shared-buffer"
    NONE = "none"  # encoders


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and shape with named axes."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(data["shape"]))


def lmforge_version() -> str:
    """The installed lmforge version, or the source tree's when it runs uninstalled."""
    try:
        from importlib.metadata import version

        return version("lmforge")
    except Exception:  # noqa: BLE001 - metadata absent when run from a plain checkout
        return "0.1.0"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A validated artifact folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.get("model_file", MODEL_NAME)

    @property
    def kv_mode(self) -> KvMode:
        return KvMode(self.manifest["kv_mode"])

    @property
    def architecture(self) -> dict[str, Any]:
        return self.manifest["architecture"]

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    @property
    def is_decoder(self) -> bool:
        return self.manifest.get("model_kind", "decoder") == "decoder"

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(t) for t in self.manifest["io"]["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(t) for t in self.manifest["io"]["outputs"]]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def generation_config(self) -> dict[str, Any]:
        path = self.path / "generation_config.json"
        if not path.is_file():
            return {}
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)


# --------------------------------------------------------------------------------------------
# Reading


def _check_plain_name(root: Path, name: str) -> Path:
    """A manifest file name must resolve to a path inside the artifact folder."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or name.strip() == "":
        raise ArtifactError(
            f"artifact {root}: manifest lists file {name!r} outside the folder",
            expected="a relative path inside the artifact",
            fix="re-export the artifact with `lmforge convert`",
        )
    resolved = (root / candidate).resolve()
    if root.resolve() not in resolved.parents:
        raise ArtifactError(
            f"artifact {root}: file {name!r} resolves outside the folder (to {resolved})",
            fix="remove the symbolic link or re-export the artifact",
        )
    return resolved


def _check_shape(root: Path, manifest: dict[str, Any]) -> None:
    """The manifest's structure, before anything indexes into it (a hand edit must not traceback)."""

    def refuse(what: str, expected: str, got: Any) -> ArtifactError:
        return ArtifactError(
            f"artifact {root}: manifest {what}", expected=expected, got=repr(got)[:80],
            fix="restore manifest.json or re-export the artifact",
        )

    files = manifest["files"]
    if not isinstance(files, dict):
        raise refuse("'files' is not a mapping of file names", '{"model.onnx": {"size": …, "sha256": …}, …}',
                     type(files).__name__)
    for name, info in files.items():
        if not isinstance(info, dict) or not isinstance(info.get("size"), int) or not isinstance(
            info.get("sha256"), str
        ):
            raise refuse(f"entry for {name!r} in 'files' is malformed", '{"size": int, "sha256": str}', info)
    arch = manifest["architecture"]
    if not isinstance(arch, dict):
        raise refuse("'architecture' is not a mapping", '{"layers": …, "vocab": …, …}', type(arch).__name__)
    is_decoder = manifest.get("model_kind", "decoder") == "decoder"
    for key in _ARCH_DIMS + (_DECODER_DIMS if is_decoder else ()):
        value = arch.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            if key not in arch:
                raise refuse(f"'architecture' lacks {key!r}", "a positive integer", value)
            raise refuse(f"'architecture.{key}' is not a positive integer", "a positive integer", value)
    io = manifest["io"]
    if not isinstance(io, dict) or not all(isinstance(io.get(k), list) for k in ("inputs", "outputs")):
        raise refuse("'io' is malformed", '{"inputs": [...], "outputs": [...]}', io)
    for spec in io["inputs"] + io["outputs"]:
        if not isinstance(spec, dict) or not {"name", "dtype", "shape"} <= spec.keys():
            raise refuse("'io' lists a tensor without name, dtype and shape", '{"name", "dtype", "shape"}', spec)


def load_artifact(path: str | os.PathLike[str], verify_hashes: bool = True) -> Artifact:
    """Read and validate an artifact folder; raise :class:`ArtifactError` naming the fix."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(
            f"artifact {root} does not exist", fix="pass the folder written by `lmforge convert`"
        )
    if not root.is_dir():
        raise ArtifactError(
            f"artifact {root} is not a folder", fix="pass the folder written by `lmforge convert`"
        )
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{root} is not an lmforge artifact: {MANIFEST_NAME} is missing",
            fix="pass a folder written by `lmforge convert`, or convert the model first",
        )
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"{manifest_path} cannot be read as JSON ({exc})", fix="re-export the artifact"
        ) from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} is not a JSON object", fix="re-export the artifact")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact {root} has an unknown format_version",
            expected=str(FORMAT_VERSION),
            got=repr(version),
            fix="re-export it with this lmforge version, or upgrade lmforge",
        )
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(
            f"{manifest_path} lacks required keys {missing}", fix="re-export the artifact"
        )
    try:
        KvMode(manifest["kv_mode"])
    except ValueError as exc:
        raise ArtifactError(
            f"artifact {root} has an unknown kv_mode",
            expected=", ".join(m.value for m in KvMode),
            got=repr(manifest["kv_mode"]),
            fix="re-export the artifact",
        ) from exc

    _check_shape(root, manifest)
    files: dict[str, Any] = manifest["files"]
    for name, info in files.items():
        file_path = _check_plain_name(root, name)
        if not file_path.is_file():
            raise ArtifactError(
                f"artifact {root}: file {name} listed in the manifest is missing",
                fix="copy the whole folder, or re-export the artifact",
            )
        size = file_path.stat().st_size
        if size != info.get("size"):
            raise ArtifactError(
                f"artifact {root}: {name} has been altered",
                expected=f"{info.get('size')} bytes",
                got=f"{size} bytes",
                fix="re-export the artifact or restore the file",
            )
        if verify_hashes:
            digest = sha256_file(file_path)
            if digest != info.get("sha256"):
                raise ArtifactError(
                    f"artifact {root}: {name} has been altered (sha256 differs from the manifest)",
                    fix="re-export the artifact or restore the file",
                )

    model_name = manifest.get("model_file", MODEL_NAME)
    if model_name not in files:
        raise ArtifactError(
            f"artifact {root}: the manifest does not list {model_name}", fix="re-export the artifact"
        )
    for location in external_data_locations(root / model_name):
        _check_plain_name(root, location)
        if location not in files:
            raise ArtifactError(
                f"artifact {root}: {model_name} reads external data from {location!r}, "
                "which the manifest does not list",
                fix="re-export the artifact; never edit external data paths by hand",
            )
    return Artifact(path=root, manifest=manifest)


# --------------------------------------------------------------------------------------------
# A minimal protobuf walk for external data locations


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """Yield (field number, wire type, value) of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
            yield field, wire, value
        elif wire == 1:
            yield field, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            yield field, wire, buf[pos : pos + length]
            pos += length
        elif wire == 5:
            yield field, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


# ONNX field numbers (onnx.proto3): ModelProto.graph=7; GraphProto.node=1, initializer=5,
# sparse_initializer=15; NodeProto.attribute=5; AttributeProto.g=6, graphs=11;
# TensorProto.external_data=13 (StringStringEntryProto key=1, value=2);
# SparseTensorProto.values=1, indices=2.


def _tensor_locations(tensor: bytes, out: set[str]) -> None:
    for field, wire, value in _fields(tensor):
        if field == 13 and wire == 2:
            key = loc = None
            for f2, _w2, v2 in _fields(value):  # type: ignore[arg-type]
                if f2 == 1:
                    key = bytes(v2).decode("utf-8", "replace")
                elif f2 == 2:
                    loc = bytes(v2).decode("utf-8", "replace")
            if key == "location" and loc is not None:
                out.add(loc)


def _graph_locations(graph: bytes, out: set[str]) -> None:
    for field, wire, value in _fields(graph):
        if wire != 2:
            continue
        if field == 5:
            _tensor_locations(value, out)  # type: ignore[arg-type]
        elif field == 15:
            for f2, _w2, v2 in _fields(value):  # type: ignore[arg-type]
                if f2 in (1, 2):
                    _tensor_locations(v2, out)  # type: ignore[arg-type]
        elif field == 1:
            for f2, w2, v2 in _fields(value):  # type: ignore[arg-type]
                if f2 == 5 and w2 == 2:
                    for f3, w3, v3 in _fields(v2):  # type: ignore[arg-type]
                        if f3 == 6 and w3 == 2:
                            _graph_locations(v3, out)  # type: ignore[arg-type]
                        elif f3 == 11 and w3 == 2:
                            _graph_locations(v3, out)  # type: ignore[arg-type]
                        elif f3 == 5 and w3 == 2:  # AttributeProto.t
                            _tensor_locations(v3, out)  # type: ignore[arg-type]


def external_data_locations(model_path: Path) -> set[str]:
    """The external-data file names an ONNX model refers to, read without the ``onnx`` package."""
    try:
        buf = model_path.read_bytes()
        out: set[str] = set()
        for field, wire, value in _fields(buf):
            if field == 7 and wire == 2:
                _graph_locations(value, out)  # type: ignore[arg-type]
        return out
    except (OSError, ValueError) as exc:
        raise ArtifactError(
            f"{model_path} is not a readable ONNX model ({exc})", fix="re-export the artifact"
        ) from exc


# --------------------------------------------------------------------------------------------
# Writing


def _file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _describe_files(root: Path) -> dict[str, Any]:
    files: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME and path.relative_to(root).as_posix() != BUILD_MARKER:
            files[path.relative_to(root).as_posix()] = _file_entry(path)
    return files


def check_output(out: str | os.PathLike[str], force: bool = False) -> Path:
    """Refuse an output path that :func:`write_artifact` must not write; make its parent folder.

    Called first by ``convert`` and ``optimize`` (through :func:`write_artifact`, and by
    ``optimize`` before its passes run) so that a bad ``-o`` costs nothing. Refused, each with one
    :class:`ArtifactError` line: an existing ``out`` without ``force``; an existing ``out`` that
    is a file; with ``force``, an existing non-empty folder that is not an lmforge artifact (no
    ``manifest.json``): ``--force`` replaces an artifact, never a folder of someone's files; a
    parent that cannot be made or written (a file on the way, no permission, a read-only disk).
    Returns the resolved parent folder.
    """
    target = Path(out)
    if target.exists() or target.is_symlink():
        if not force:
            raise ArtifactError(
                f"output {target} already exists", fix="choose another path or pass --force to replace it"
            )
        if not target.is_dir():
            raise ArtifactError(f"output {target} exists and is not a folder", fix="choose another path")
        if not (target / MANIFEST_NAME).is_file() and any(target.iterdir()):
            raise ArtifactError(
                f"output {target} is a folder that is not an lmforge artifact (no {MANIFEST_NAME}); "
                "--force replaces only an artifact",
                fix="choose another path with -o, or move that folder's files away yourself",
            )
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(
            f"cannot write to {parent} ({exc.strerror or exc})", fix="choose a writable output location with -o"
        ) from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(
            f"cannot write to {parent} (permission denied)", fix="choose a writable output location with -o"
        )
    return parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _clean_stale_builds(parent: Path, name: str) -> None:
    """Remove ``NAME.tmp-*`` folders that a killed build of the same output left behind.

    Only a folder whose name is exactly ``NAME.tmp-`` plus :func:`tempfile.mkdtemp`'s 8-character
    suffix, that holds :data:`BUILD_MARKER`, and whose recorded process on this host is gone, is
    removed; a build still running (its pid alive) or started on another host is left alone.
    """
    pattern = re.compile(re.escape(name) + r"\.tmp-[a-z0-9_]{8}")
    host = socket.gethostname()
    try:
        candidates = [p for p in parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return
    for folder in candidates:
        marker = folder / BUILD_MARKER
        if folder.is_symlink() or not folder.is_dir() or not marker.is_file():
            continue
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            pid, owner = int(info["pid"]), str(info["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if owner != host or _pid_alive(pid):
            continue
        log.info("removing %s, left by a build (pid %d) that did not finish", folder, pid)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def write_artifact(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Build an artifact atomically.

    Yields a temporary folder beside ``out`` (``OUT.tmp-*``) to write files into; the caller
    puts a partial manifest (without ``files``) at ``tmp/manifest.json``. On a clean exit the file
    list with sizes and sha256 is added and the folder is renamed onto ``out``; on any exception
    the temporary folder is removed and ``out`` is left as it was. A process killed mid-way leaves
    only an ``OUT.tmp-*`` folder, never a half-written ``out``; the next build of the same ``out``
    removes it (it carries :data:`BUILD_MARKER` naming its process). ``out`` is checked first by
    :func:`check_output` (``force`` replaces only an existing artifact).
    """
    target = Path(out)
    parent = check_output(target, force)
    _clean_stale_builds(parent, target.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an artifact is shared like any folder
        (tmp / BUILD_MARKER).write_text(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), encoding="utf-8"
        )
    except OSError as exc:
        raise ArtifactError(
            f"cannot write to {parent} ({exc.strerror or exc})",
            fix="choose a writable output location with -o",
        ) from exc
    try:
        yield tmp
        manifest_path = tmp / MANIFEST_NAME
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        manifest["files"] = _describe_files(tmp)
        manifest.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        with open(manifest_path, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2)
            fh.write("\n")
        (tmp / BUILD_MARKER).unlink(missing_ok=True)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{target.name}.old-", dir=parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        log.info("wrote artifact %s", target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
