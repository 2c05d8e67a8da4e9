"""Skip a build whose artifact is already there, and never run two builds into one output.

**Build identity.** ``build_identity`` names everything a build's bytes depend on, and
``manifest.json`` records it under ``build_identity``, so "is the artifact up to date" is one
dict comparison (``up_to_date``) followed by ``aqexport.integrity.verify_artifact`` (the files
are still what the manifest lists). Each field and why it is there:

* ``config_sha256``: the validated config (``portable_config``), with every path taken out:
  ``output.dir`` and ``calibration.plan_dir`` say *where* things go, not what is built, and
  ``calibration.data`` / ``evaluation.text`` enter by their content's sha256 (a moved or
  copied project is still up to date; an edited text is not). ``model.source`` is left out
  too: the next two fields identify what it points to by content.
* ``source_sha256``: the source weights (the manifest's ``source.sha256``: the weight files'
  bytes, or the Hub commit).
* ``source_files_sha256``: a local model folder's other top-level files (``config.json``,
  tokenizer files, ``generation_config.json``), which the artifact copies or is shaped by but
  the weights hash does not cover; ``None`` for a GGUF or Hub source.
* ``aqexport_version`` and ``versions``: the tool and every dependency that changes what the
  exporter, the passes or the verification write (``aqexport.artifact.dependency_versions``).
* ``aqexport_code_sha256``: the ``.py`` files of ``aqexport`` (with ``aqexport.passes`` and
  ``aqexport.runtime``; not ``aqexport.diff``, which no build runs). The version string does
  not change between development commits, and an edited pass must not be answered with
  yesterday's artifact.

Hashing the inputs reads the weights once (about 1 GB/s), so an unchanged rebuild takes
seconds where a build takes minutes.

**Lock.** ``build_lock`` holds ``fcntl.flock`` (exclusive, non-blocking) on
``.<output name>.lock`` beside the output directory for the whole build; a second build into
the same output is refused with one ``ConfigError`` naming the holder's pid, instead of two
builds interleaving their renames. The file is removed while still locked, and a process
that locked a file which was removed meanwhile (its inode is no longer the path's) retries on
the new one, so removing it cannot let two builds hold "the" lock at once. ``flock`` locks
belong to the open file, so the kernel releases them when the holder dies (SIGKILL included):
a stale lock file never blocks a build. Windows has no ``fcntl``: there the lock is skipped
(this project runs on Linux and macOS).

``plan_lock`` is the same lock on a calibration's plan directory (``.<plan dir name>.lock``
beside it), held while a plan is opened and calibrated (``aqexport calibrate`` and the build's
calibrate stage): two calibrations into one ``plan_dir`` (two builds with different outputs
sharing it, or a build beside ``aqexport calibrate``) would otherwise write each other's blocks
and index, and one could read back a block the other is still writing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from aqexport import __version__
from aqexport.artifact import dependency_versions
from aqexport.config import BuildConfig
from aqexport.errors import ConfigError
from aqexport.integrity import MANIFEST_FILE, sha256_file, verify_artifact

try:
    import fcntl
except ImportError:  # Windows: no flock; builds there are not locked
    fcntl = None

__all__ = ["build_identity", "build_lock", "lock_path", "plan_lock", "portable_config", "up_to_date"]

logger = logging.getLogger(__name__)

_PATH_KEYS = (("calibration", "data"), ("calibration", "plan_dir"), ("evaluation", "text"), ("output", "dir"))
#: ``aqexport`` subpackages no build imports (``aqexport diff`` only reads artifacts): editing them
#: leaves every artifact up to date.
_READ_ONLY_SUBPACKAGES = ("diff",)
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".gguf"}


def lock_path(output_dir: Path) -> Path:
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another process"
    return f"pid {pid}" if pid.isdigit() else "another process"


#: (what the directory is, what its holder is doing, the fix) for each kind of locked directory
_BUILD = ("output", "being built", "wait for that build to finish, or build into another output.dir")
_CALIBRATION = (
    "plan_dir",
    "being calibrated",
    "wait for that calibration to finish, or set calibration.plan_dir to another directory",
)


@contextmanager
def build_lock(output_dir: Path, *, refusal: tuple[str, str, str] = _BUILD) -> Iterator[Path]:
    """Hold the output directory's build lock (see the module docstring); ``ConfigError`` if held,
    worded by ``refusal`` (what the directory is, what its holder is doing, the fix)."""
    path = lock_path(output_dir)
    if fcntl is None:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            what, doing, fix = refusal
            raise ConfigError(f"{what} '{output_dir}' is {doing} by {_holder(path)} (lock '{path}')", fix) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file as we locked it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        try:
            os.unlink(path)  # while still locked: see the module docstring
        except FileNotFoundError:
            pass
        os.close(fd)


def plan_lock(plan_dir: Path) -> AbstractContextManager[Path]:
    """Hold a plan directory's calibration lock (the module docstring); ``ConfigError`` if held."""
    return build_lock(plan_dir, refusal=_CALIBRATION)


def _relative(path: str | Path | None, base: Path) -> str | None:
    """``path`` relative to ``base`` (posix), or as it is if it is not an absolute path."""
    if path is None:
        return None
    if not os.path.isabs(str(path)):
        return str(path)
    return Path(os.path.relpath(path, base)).as_posix()


def portable_config(config: BuildConfig, base: Path) -> dict[str, Any]:
    """The config as the manifest records it: paths relative to ``base`` (the config file's
    folder), so an artifact holds no absolute build-machine path and two builds of one config
    in two checkouts record the same config."""
    dumped = config.model_dump(mode="json")
    dumped["model"]["source"] = _relative(dumped["model"]["source"], base)
    for section, key in (
        ("calibration", "data"),
        ("calibration", "plan_dir"),
        ("evaluation", "text"),
        ("output", "dir"),
    ):
        dumped[section][key] = _relative(dumped[section][key], base)
    return dumped


def _config_sha256(config: BuildConfig) -> str:
    dumped = config.model_dump(mode="json")
    del dumped["output"]["dir"], dumped["calibration"]["plan_dir"], dumped["model"]["source"]
    del dumped["build"]  # how the build may use the machine, not what it makes
    for section, key, path in (
        ("calibration", "data", config.calibration.data),
        ("evaluation", "text", config.evaluation.text),
    ):
        dumped[section][key] = None if path is None else f"sha256:{sha256_file(Path(path))}"
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def _source_files_sha256(location: str, kind: str) -> str | None:
    if kind != "local":
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(location).iterdir()):
        if path.is_file() and path.suffix not in _WEIGHT_SUFFIXES:
            digest.update(path.name.encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def _code_sha256() -> str:
    import aqexport
    import aqexport.passes
    import aqexport.runtime

    digest = hashlib.sha256()
    for package in (aqexport, aqexport.passes, aqexport.runtime):
        for root in sorted({Path(p).resolve() for p in package.__path__}):
            for path in sorted(root.rglob("*.py")):
                if package is aqexport and path.relative_to(root).parts[0] in _READ_ONLY_SUBPACKAGES:
                    continue
                digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}".encode() + b"\0")
                digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def build_identity(config: BuildConfig, config_dir: Path) -> dict[str, Any]:
    """What an artifact's bytes depend on (see the module docstring for each field)."""
    from aqexport.sources import resolve_source, source_sha256

    source = resolve_source(config.model, config_dir)
    return {
        "config_sha256": _config_sha256(config),
        "source_sha256": source_sha256(config.model, config_dir),
        "source_files_sha256": _source_files_sha256(source.location, source.kind),
        "aqexport_version": __version__,
        "aqexport_code_sha256": _code_sha256(),
        "versions": dependency_versions(),
    }


def up_to_date(output_dir: Path, identity: dict[str, Any]) -> tuple[bool, str]:
    """``(True, what was checked)`` if ``output_dir`` holds an artifact of this identity whose
    files match its manifest; else ``(False, why it is rebuilt)``."""
    manifest_path = Path(output_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        return False, f"no artifact in '{output_dir}'"
    try:
        recorded = json.loads(manifest_path.read_text()).get("build_identity")
    except (OSError, ValueError, AttributeError):
        return False, f"'{manifest_path}' is not readable"
    if not isinstance(recorded, dict):
        return False, f"'{manifest_path}' records no build_identity (an older aqexport built it)"
    if recorded != identity:
        changed = sorted(k for k in {*recorded, *identity} if recorded.get(k) != identity.get(k))
        return False, "build_identity changed: " + ", ".join(changed)
    report = verify_artifact(Path(output_dir))
    if not report.ok:
        return False, f"the artifact fails its manifest ({'; '.join(report.problems()[:3])})"
    return True, f"'{output_dir}' has this build identity and its {len(report.intact)} files match manifest.json"
