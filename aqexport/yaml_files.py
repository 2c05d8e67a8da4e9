"""Reading the YAML files users write (build configs, diff policies) the same way everywhere.

Its own module, free of torch, so ``aqexport diff`` (which must stay light enough to run in CI
beside two large artifacts) can read a policy without importing the build's dependencies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aqexport.errors import ConfigError

__all__ = ["read_yaml_mapping"]


def read_yaml_mapping(path: Path, kind: str, missing_fix: str, holds: str, example: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a build config, a diff policy): every way reading
    it can fail is one ``ConfigError`` naming the file, the line, and what to do."""
    if not path.is_file():
        raise ConfigError(f"{kind} '{path}' not found", missing_fix)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"'{path}' is not valid YAML{where}", "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"'{path}' must hold a mapping of {holds}", f"see {example}")
    return raw
