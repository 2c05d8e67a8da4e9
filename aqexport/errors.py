"""One error type that every user-facing failure goes through.

A user of a compiler wants one line: what went wrong and what to do about it. Raising
``AqexportError(cause, fix)`` anywhere lets the CLI print exactly that line and choose the
exit status, instead of a traceback from deep inside torch or ONNX Runtime.
"""

from __future__ import annotations

__all__ = ["AqexportError", "ConfigError", "PassContractError"]


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


class PassContractError(AqexportError):
    """A graph pass found the graph it was given, or the graph it produced, not as it states in
    its ``requires`` / ``ensures`` (``aqexport.lowering.run_passes`` names the pass). Usually the
    plan was made for another model or the passes ran out of order; the fix says which."""

    def __init__(self, cause: str, fix: str, pass_name: str | None = None) -> None:
        super().__init__(cause, fix)
        self.pass_name = pass_name


def explain_validation_error(error: dict, model: type, prefix: tuple[str, ...] = ()) -> ConfigError:
    """One pydantic error (``ValidationError.errors()[0]``) as one ``ConfigError`` line naming the
    key as the YAML spells it (``prefix``: the keys above ``model``) and the fix."""
    keys = [*prefix, *(str(part) for part in error["loc"])]
    loc = ".".join(keys)
    kind = error["type"]
    if kind == "extra_forbidden":
        section = model
        for part in error["loc"][:-1]:
            fields = getattr(section, "model_fields", {})
            section = fields[str(part)].annotation if str(part) in fields else None
        allowed = ", ".join(getattr(section, "model_fields", {})) or "?"
        return ConfigError(f"unknown key '{loc}'", f"remove it or use one of: {allowed}")
    if kind == "missing":
        return ConfigError(f"missing key '{loc}'", f"add '{loc}' to the config")
    return ConfigError(
        f"bad value for '{loc}': {error['msg']} (got {_short_repr(error.get('input'))})",
        f"set '{loc}' to a valid value",
    )


def _short_repr(value: object, limit: int = 80) -> str:
    """A value in an error line, cut short: the line names the key, not a pasted-in megabyte."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
