"""Reading the YAML files users write (build configs, diff policies) the same way everywhere.

Its own module, free of torch, so ``aqexport diff`` (which must stay light enough to run in CI
beside two large artifacts) can read a policy without importing the build's dependencies.

These files may come from anyone (a pull request's policy, a config in a shared repository), so
reading one must be safe whatever it holds:

* only YAML's plain types are built (``SafeLoader``): a tag such as ``!!python/object/apply``
  is refused by name instead of running code or being reported as a syntax error;
* the file is refused above ``MAX_YAML_BYTES`` before it is parsed (a config is a few hundred
  bytes; a multi-megabyte one is a mistake or an attack on the parser's memory);
* anchors and aliases are allowed, but the document they expand to is counted on the composed
  node graph, before any Python object exists: above ``MAX_YAML_NODES`` nodes (a "billion
  laughs" alias bomb expands to 10⁹ from a few hundred bytes) or a recursive alias, it is
  refused, so validation and error messages never walk an exponential structure;
* nesting deeper than the parser's recursion allows is one line, not a ``RecursionError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aqexport.errors import ConfigError

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_NODES", "read_yaml_mapping"]

#: Largest YAML file read (bytes): far above any real config or policy, far below harm.
MAX_YAML_BYTES = 1 << 20
#: Most nodes (scalars, lists, mappings) a document may expand to once aliases are followed.
MAX_YAML_NODES = 100_000


def _expanded_nodes(root: yaml.Node, path: Path) -> int:
    """Nodes ``root`` stands for with every alias expanded, counted once per distinct node
    (memoized on identity, so an alias bomb is counted in linear time). Stops at the limit."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(
                f"'{path}' holds a recursive YAML alias (an anchor used inside itself)",
                "replace the alias with the values it should stand for",
            )
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_YAML_NODES:
            raise ConfigError(
                f"'{path}' expands to more than {MAX_YAML_NODES} YAML values once its aliases are "
                "followed (an alias bomb)",
                "write the values out instead of nesting aliases of aliases",
            )
        sizes[key] = total
        return total

    return size(root)


def _read_text(path: Path, kind: str) -> str:
    """The file's text, refused above ``MAX_YAML_BYTES`` without reading the rest of it."""
    with path.open("rb") as handle:
        data = handle.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{kind} '{path}' is larger than {MAX_YAML_BYTES / 2**20:g} MiB, too large to be one",
            f"pass the {kind} itself (a few hundred bytes of YAML), not another file",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{kind} '{path}' is not UTF-8 text (byte {exc.start})", f"pass the {kind} itself, saved as UTF-8"
        ) from None


def _parse(text: str, path: Path) -> Any:
    """Compose, check the expanded size, then construct plain Python values only."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, path)
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}" if mark else ""
        tag = f" {exc.problem.split('tag ')[-1]}" if exc.problem and "tag " in exc.problem else ""
        raise ConfigError(
            f"'{path}' uses the YAML tag{tag}{where}, which aqexport does not build",
            "remove the tag: configs hold plain mappings, lists, strings and numbers",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"'{path}' is not valid YAML{where}", "fix the YAML syntax") from None
    except RecursionError:
        raise ConfigError(f"'{path}' nests lists or mappings too deeply to read", "flatten the YAML") from None
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path, kind: str, missing_fix: str, holds: str, example: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a build config, a diff policy): every way reading
    it can fail, hostile content included, is one ``ConfigError`` naming the file and the fix."""
    if not path.is_file():
        raise ConfigError(f"{kind} '{path}' not found", missing_fix)
    raw = _parse(_read_text(path, kind), path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"'{path}' must hold a mapping of {holds}", f"see {example}")
    return raw
