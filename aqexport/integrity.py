"""Check an artifact directory against the sha256 and size its ``manifest.json`` lists.

A build writes ``manifest.json`` last, with ``files``: ``{relative path: {"sha256": hex,
"bytes": size}}`` for every file in the directory but the manifest itself
(``aqexport.artifact.file_hashes``). ``verify_artifact`` compares the directory with it:

* **missing**: listed, not there (an incomplete copy, a deleted tokenizer);
* **changed**: listed, there, but another size or sha256 (a truncated download, a flipped
  byte, a file replaced by another build's). A size change is found from ``stat`` alone;
* **unlisted**: there, not listed, and a file the runtime would load: an ONNX graph or its
  external data (``*.onnx``, ``*.onnx.data``, ``*.data``, ``*.ort``), ``genai_config.json``,
  ``config.json`` (``bench`` reads the vocabulary size, transformers the tokenizer class) or a
  tokenizer file (``tokenizer*.json``, ``special_tokens_map.json``, ``added_tokens.json``,
  ``vocab.json``/``vocab.txt``, ``merges.txt``, ``*.model``, ``*.tiktoken``, chat templates).
  What runs would then not be what was built, so this fails like a changed file;
* **extra**: there, not listed, and nothing loads it (a README, ``.DS_Store``, notes). Reported,
  never an error.

Any missing, changed or unlisted file fails the check. The manifest itself cannot be covered
by its own hash: ``verify`` pins the files to the manifest, not the manifest to a build.

A directory with no ``manifest.json`` (an onnxruntime-genai builder output, which ``run``,
``eval`` and ``bench`` also accept) is not refused: the report says "no manifest" and callers
go on unverified. A ``manifest.json`` that is not a manifest (not JSON, no ``files``, a path
leaving the directory) fails: it is as untrustworthy as a changed file.

Nothing is cached: every call hashes every listed file, in 1 MiB ``readinto`` chunks into one
reused buffer (memory stays flat whatever the file size). OpenSSL's sha256 runs at about
1 GB/s with the SHA extensions, so the 110 MB SmolLM2-135M int4 artifact checks in about a
tenth of a second from the page cache, which is cheap enough to do before every run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from aqexport.errors import ConfigError

__all__ = [
    "MANIFEST_FILE",
    "RUNTIME_PATTERNS",
    "FileChange",
    "IntegrityReport",
    "check_artifact",
    "is_loaded_by_runtime",
    "sha256_file",
    "verify_artifact",
]

MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20
_FIX = "rebuild it, or copy it again; --no-verify skips this check"
#: File names (``fnmatch`` patterns, matched on the base name) that the runtime, transformers'
#: tokenizer loader or onnxruntime-genai read from an artifact directory.
RUNTIME_PATTERNS = (
    "*.onnx",
    "*.onnx.data",
    "*.data",
    "*.ort",
    "genai_config.json",
    "config.json",
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)


def is_loaded_by_runtime(name: str) -> bool:
    """Whether a file named ``name`` (base name or relative path) would be loaded by a run."""
    base = PurePosixPath(name).name
    return any(fnmatch.fnmatchcase(base, pattern) for pattern in RUNTIME_PATTERNS)


@dataclass(frozen=True)
class FileChange:
    """A listed file whose size or content differs from the manifest's record."""

    path: str
    expected_sha256: str
    expected_bytes: int
    actual_bytes: int
    actual_sha256: str | None = None  # None: the size already differed, so it was not hashed

    def describe(self) -> str:
        if self.actual_sha256 is None:
            return f"{self.path} changed ({self.actual_bytes} bytes, manifest {self.expected_bytes})"
        return f"{self.path} changed (sha256 {self.actual_sha256[:12]}, manifest {self.expected_sha256[:12]})"


@dataclass
class IntegrityReport:
    """What ``verify_artifact`` found. ``has_manifest`` False: nothing was checked."""

    directory: Path
    has_manifest: bool
    intact: list[str] = field(default_factory=list)
    changed: list[FileChange] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    manifest_error: str | None = None
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No file fails the manifest (also True without a manifest: nothing to fail)."""
        return not (self.changed or self.missing or self.unlisted or self.manifest_error)

    @property
    def status(self) -> str:
        if self.manifest_error or not self.ok:
            return "failed"
        return "intact" if self.has_manifest else "no manifest"

    def problems(self) -> list[str]:
        """One phrase per failing file, in directory order."""
        phrases = [change.describe() for change in self.changed]
        phrases += [f"{path} missing" for path in self.missing]
        phrases += [f"{path} not in the manifest" for path in self.unlisted]
        if self.manifest_error:
            phrases.insert(0, self.manifest_error)
        return phrases

    def summary(self) -> str:
        """One line for a terminal."""
        name = f"artifact '{self.directory}'"
        if self.status == "failed":
            return f"{name} fails its manifest: {', '.join(self.problems())}"
        if not self.has_manifest:
            return f"{name} has no {MANIFEST_FILE}: its files were not verified"
        line = (
            f"{name} matches its manifest: {len(self.intact)} files, {self.bytes_hashed / 2**20:.1f} MiB "
            f"in {self.seconds:.2f} s"
        )
        if self.extra:
            line += f"; not in the manifest (not loaded): {', '.join(self.extra)}"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "artifact": str(self.directory),
            "status": self.status,
            "ok": self.ok,
            "intact": self.intact,
            "changed": [
                {
                    "path": c.path,
                    "expected_sha256": c.expected_sha256,
                    "actual_sha256": c.actual_sha256,
                    "expected_bytes": c.expected_bytes,
                    "actual_bytes": c.actual_bytes,
                }
                for c in self.changed
            ],
            "missing": self.missing,
            "unlisted": self.unlisted,
            "extra": self.extra,
            "manifest_error": self.manifest_error,
            "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 4),
        }


def sha256_file(path: Path, buffer: bytearray | None = None) -> str:
    """sha256 of ``path`` read in 1 MiB chunks into one buffer (``buffer`` to reuse one)."""
    buffer = buffer if buffer is not None else bytearray(_CHUNK)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _listed_files(manifest_path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` section, checked for shape; ``ValueError`` says what is wrong."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{MANIFEST_FILE} unreadable ({type(exc).__name__})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{MANIFEST_FILE} has no 'files' section")
    for name, entry in files.items():
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise ValueError(f"{MANIFEST_FILE} lists '{name}', a path outside the artifact")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry.get("bytes"), bool)
        ):
            raise ValueError(f"{MANIFEST_FILE} entry for '{name}' has no sha256 and bytes")
    return files


def _present_files(directory: Path) -> list[str]:
    """Every file under ``directory`` as the manifest spells it (posix relative paths)."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.relative_to(directory).as_posix() != MANIFEST_FILE
    )


def verify_artifact(directory: Path) -> IntegrityReport:
    """Compare every file ``directory/manifest.json`` lists with its size and sha256, and name
    the files it does not list. Raises nothing for a bad artifact: read the report (``ok``,
    ``status``, ``problems()``); ``check_artifact`` turns a failure into a ``ConfigError``."""
    directory = Path(directory)
    start = time.perf_counter()
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        return IntegrityReport(directory, has_manifest=False)
    report = IntegrityReport(directory, has_manifest=True)
    try:
        listed = _listed_files(manifest_path)
    except ValueError as exc:
        report.manifest_error = str(exc)
        report.seconds = time.perf_counter() - start
        return report
    buffer = bytearray(_CHUNK)
    for name in sorted(listed):
        entry = listed[name]
        path = directory / name
        if not path.is_file():
            report.missing.append(name)
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            report.changed.append(FileChange(name, entry["sha256"], entry["bytes"], size))
            continue
        digest = sha256_file(path, buffer)
        report.bytes_hashed += size
        if digest != entry["sha256"].lower():
            report.changed.append(FileChange(name, entry["sha256"], entry["bytes"], size, digest))
        else:
            report.intact.append(name)
    for name in _present_files(directory):
        if name not in listed:
            (report.unlisted if is_loaded_by_runtime(name) else report.extra).append(name)
    report.seconds = time.perf_counter() - start
    return report


def check_artifact(directory: Path, fix: str = _FIX, rewriting: tuple[str, ...] = ()) -> IntegrityReport:
    """``verify_artifact``, raising one ``ConfigError`` (exit status 2) that names every changed,
    missing or unlisted file. Returns the report when the artifact is intact or has no manifest
    (``report.has_manifest`` False: say so and go on). ``fix``: the advice, for a caller whose
    skip flag is not ``--no-verify``; ``rewriting``: files the caller is about to write anew and
    record (``aqexport report --regenerate``), which may be changed or missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"'{directory}' is not a directory", "pass the output directory of 'aqexport build'")
    report = verify_artifact(directory)
    if rewriting:
        report = replace(
            report,
            changed=[c for c in report.changed if c.path not in rewriting],
            missing=[name for name in report.missing if name not in rewriting],
        )
    if not report.ok:
        raise ConfigError(report.summary(), fix)
    return report
