"""Write an artifact directory atomically and describe it in ``manifest.json``.

A build writes into a hidden sibling temp directory (same filesystem, so the final ``rename``
is atomic) and only moves it into place after verification succeeded. An interrupted or failed
build therefore leaves either the previous artifact or nothing, never a half-written one. The
manifest lists the sha256 of every file, so a deployment can check it shipped what was built
(``aqexport verify``, ``aqexport.integrity``).

A build killed outright (SIGKILL, a power cut) runs no cleanup: its staging directory, or the
previous artifact renamed aside when it died between the two renames of the publish, stays
beside the output. The next build into that output, holding the output's lock (so no other
build owns them), calls ``recover_interrupted`` first: a previous artifact left aside while the
output is missing is put back, every other leftover is removed. A disk that fills while the
artifact is written is one ``AqexportError`` line naming the output's folder (the staging
directory is removed; a plan's finished blocks stay where they are).

``tempfile.mkdtemp`` makes the staging directory 0700 (private by design); before it is moved
into place it gets the mode a plain ``mkdir`` would have given it, ``0o777 & ~umask`` (0755 under
the usual 022), so other users can read a finished artifact. Files inside keep the modes they
were written with.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx_ir as ir

from aqexport import faults
from aqexport.atomic_files import out_of_space, write_atomically
from aqexport.integrity import MANIFEST_FILE, sha256_file

__all__ = [
    "DATA_FILE",
    "EXTERNAL_THRESHOLD_BYTES",
    "MODEL_FILE",
    "atomic_directory",
    "dependency_versions",
    "current_umask",
    "file_entry",
    "file_hashes",
    "json_text",
    "record_file",
    "recover_interrupted",
    "save_model",
    "write_json",
]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
#: initializers of this many bytes or more go to ``DATA_FILE``; smaller ones stay in the proto
EXTERNAL_THRESHOLD_BYTES = 1024
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


def current_umask() -> int:
    """The process umask. Linux (4.7+) states it in ``/proc/self/status``, which reads it without
    changing it; elsewhere the classic ``os.umask(0)`` then restore, which for an instant leaves
    the process (every thread) at umask 0: a file another thread creates in that instant would
    be created without the umask's restrictions."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


_STAGING, _ASIDE = ".tmp-", ".old-"
_NO_SPACE_FIX = (
    "free space there, or set output.dir to a larger filesystem, then re-run: the calibration plan's "
    "finished blocks are kept"
)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp dir that replaces ``final`` only if the block finishes without error. The
    caller holds ``final``'s build lock (``build_cache.build_lock``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{_STAGING}", dir=final.parent))
    try:
        yield staging
    except BaseException as error:
        full = out_of_space(error, final.parent, _NO_SPACE_FIX)  # before the staging files are freed
        shutil.rmtree(staging, ignore_errors=True)
        if full is not None:
            raise full from error
        raise
    staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 -> what mkdir would have made
    old = None
    if final.exists():
        old = final.parent / f".{final.name}{_ASIDE}{staging.name.rsplit('-', 1)[-1]}"
        final.rename(old)
    faults.point("publish")
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted(final: Path) -> list[str]:
    """Clean up after builds into ``final`` that were killed (module docstring); return what was
    done, one line each. Call it holding ``final``'s build lock: then no leftover is in use."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    done: list[str] = []
    prefixes = tuple(f".{final.name}{marker}" for marker in (_STAGING, _ASIDE))
    leftovers = sorted(
        path
        for path in final.parent.iterdir()
        if path.name.startswith(prefixes) and path.is_dir() and not path.is_symlink()
    )
    aside = [path for path in leftovers if path.name.startswith(f".{final.name}{_ASIDE}")]
    if aside and not final.exists():  # killed between the publish's renames: the previous artifact
        aside[-1].rename(final)
        leftovers.remove(aside[-1])
        done.append(f"restored '{final}' from '{aside[-1].name}' (a build was killed while publishing)")
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
        done.append(f"removed '{path.name}' (left by a killed build)")
    return done


def save_model(model: ir.Model, directory: Path) -> Path:
    """Save with all weights in one external data file beside the graph."""
    path = directory / MODEL_FILE
    ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES)
    faults.point("write.model")
    return path


def json_text(payload: Any) -> str:
    """How the artifact's JSON files are written (``write_json``)."""
    return json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json_text(payload))


def file_entry(path: Path) -> dict[str, Any]:
    """One file's record in ``manifest.json``'s ``files``."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def file_hashes(directory: Path, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, dict]:
    """``manifest.json``'s ``files``: posix relative path -> sha256 and size of every file."""
    return {
        path.relative_to(directory).as_posix(): file_entry(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in exclude
    }


def record_file(directory: Path, name: str, reproducible: bool) -> None:
    """Record ``directory/name`` as it is now in the artifact's ``manifest.json`` (its sha256 and
    size under ``files``, kept in path order; its name under ``not_reproducible.files`` unless
    ``reproducible``), rewriting the manifest atomically: for a file an aqexport command
    rewrites in a finished artifact (``aqexport report --regenerate``)."""
    path = Path(directory) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    files = {**manifest["files"], name: file_entry(Path(directory) / name)}
    manifest["files"] = dict(sorted(files.items()))
    if not reproducible:
        varying = manifest.setdefault("not_reproducible", {}).setdefault("files", [])
        if name not in varying:
            varying.append(name)
    write_atomically(path, json_text(manifest).encode())


def dependency_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
