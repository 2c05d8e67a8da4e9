"""One error type that every user-facing failure goes through.

A user of a compiler wants one line: what went wrong and what to do about it. Raising
``AqexportError(cause, fix)`` anywhere lets the CLI print exactly that line and choose the
exit status, instead of a traceback from deep inside torch or ONNX Runtime.
"""

from __future__ import annotations

__all__ = ["AqexportError", "ConfigError"]


class AqexportError(Exception):
    """A failure the user can act on. ``exit_code`` 1 for runtime failures."""

    exit_code = 1

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause} — fix: {fix}")
        self.cause = cause
        self.fix = fix


class ConfigError(AqexportError):
    """Bad input (config, paths, unsupported model): exit status 2, like click's usage errors."""

    exit_code = 2
