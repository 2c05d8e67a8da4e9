"""Write an artifact directory atomically and describe it in ``manifest.json``.

A build writes into a hidden sibling temp directory (same filesystem, so the final ``rename``
is atomic) and only moves it into place after verification succeeded. An interrupted or failed
build therefore leaves either the previous artifact or nothing, never a half-written one. The
manifest lists the sha256 of every file, so a deployment can check it shipped what was built.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx_ir as ir

__all__ = [
    "MODEL_FILE",
    "atomic_directory",
    "dependency_versions",
    "file_hashes",
    "save_model",
    "write_json",
]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_TRACKED = (
    "aqexport",
    "torch",
    "transformers",
    "onnx",
    "onnx-ir",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "gguf",
    "numpy",
)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp dir that replaces ``final`` only if the block finishes without error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{staging.name.rsplit('-', 1)[-1]}"
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model(model: ir.Model, directory: Path) -> Path:
    """Save with all weights in one external data file beside the graph."""
    path = directory / MODEL_FILE
    ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=1024)
    return path


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(directory: Path, exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, dict]:
    return {
        str(path.relative_to(directory)): {"sha256": _sha256(path), "bytes": path.stat().st_size}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in exclude
    }


def dependency_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
