"""Write one file so that a reader sees its old bytes or its new ones, never part of them.

The plan directory is read back by a resumed calibration, so a file half-written when the
process was killed (or the disk filled) must never be taken for a finished one: the bytes go
to ``<name>.tmp`` beside it, are flushed to the disk (``fsync``: a power cut after the rename
must not leave an empty file under the final name), and only then renamed over ``<name>``
(atomic within one filesystem). A ``.tmp`` left by a killed writer is garbage; the owner of the
directory removes it on its next open (``QuantPlan.open``).

A full disk while writing is something the user can act on, so ``out_of_space`` turns ENOSPC /
EDQUOT into one ``AqexportError`` line naming the directory and the fix, instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from aqexport import faults
from aqexport.errors import AqexportError

__all__ = ["TMP_SUFFIX", "out_of_space", "write_atomically"]

TMP_SUFFIX = ".tmp"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_SPACE_TEXT = tuple(os.strerror(code) for code in sorted(_NO_SPACE))  # "No space left on device"
_NEARLY_FULL = 1 << 20


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once (see the module docstring). Test hook:
    ``faults.point("atomic.<name>")`` with the temp file written and not yet renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        faults.point(f"atomic.{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def out_of_space(error: BaseException, where: Path, fix: str) -> AqexportError | None:
    """The one-line error for a full disk (or quota) under ``where``; ``None`` for any other
    error. Call it before freeing what the failed write used (the staging directory): not every
    writer says ENOSPC. Python's own writes do (an ``OSError`` with that errno); the Rust writers
    (tokenizers, safetensors) raise a plain exception whose text holds the OS message; numpy's
    ``tofile`` (onnx_ir's external-data writer) raises ``OSError("problem writing element N")``
    with no errno at all, which counts as a full disk when the filesystem has under 1 MiB left."""
    if isinstance(error, AqexportError):  # already one line (a plan directory that filled up)
        return None
    text = str(error)
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        why = error.strerror or text
    elif any(message in text for message in _NO_SPACE_TEXT):
        why = text
    elif isinstance(error, OSError) and error.errno is None and (free := _free_bytes(where)) < _NEARLY_FULL:
        why = f"{text}, {free} bytes free"
    else:
        return None
    return AqexportError(f"no space left on the filesystem of '{where}' ({why})", fix)


def _free_bytes(where: Path) -> int:
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return _NEARLY_FULL
