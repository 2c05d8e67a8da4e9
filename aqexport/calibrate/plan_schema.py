"""A dataclass ⇄ (safetensors tensors, JSON metadata) codec driven by the dataclass fields alone.

The QuantPlan's on-disk format used to be written out three times by hand (which tensor goes
where, which scalar goes into ``plan.json``, and how both are read back), and the three had to
agree. Here the fields themselves are the schema: :func:`to_record` walks ``dataclasses.fields``
with their resolved type hints and sends every ``torch.Tensor`` leaf to the tensor dict (named by
its path, ``linears.self_attn.q_proj.scale``) and everything else to a JSON-ready dict;
:func:`from_record` walks the same fields to rebuild the object. Adding a field to a dataclass
adds it to the format; nothing else has to be kept in step.

Supported field types: ``torch.Tensor``; ``bool``/``int``/``float``/``str``; ``X | None``;
nested dataclasses; ``tuple[X, ...]`` / ``list[X]``; ``dict[str, X]`` (JSON-ready values, tensors
or dataclasses); ``Any`` (stored as it is, must be JSON-ready). Dict keys may contain dots: the
keys of a dict are recorded in the metadata, so tensor names are built, never parsed.

How a field is stored is declared in its ``dataclasses.field(metadata=stored(...))``:

* ``dtype``: the tensor is cast to it on save (and checked on load), so a loaded plan holds
  exactly the dtype a fresh one does. Applies to every tensor leaf of the field (each value of a
  ``dict[str, Tensor]``).
* ``shape``: the tensor is reshaped to it on save (``()`` for a scalar).
* ``flag``: a metadata key that records whether the (optional) tensor is present
  (``has_bias``), for readers of ``plan.json`` who do not open the tensors; checked on load.
* ``count``: the metadata records ``len(tensor)`` (or ``None``) under the field's name.
* ``fields``: per-field specs for a nested dataclass defined elsewhere (``ChannelStats``),
  overriding whatever that class declares itself.

This module knows nothing of the plan; it imports only torch.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SCHEMA", "FieldSpec", "SchemaError", "from_record", "stored", "to_record"]

SCHEMA = "aqexport.schema"  # the key of a FieldSpec in ``dataclasses.field(metadata=...)``

_JSON_SCALARS = (bool, int, float, str, type(None))


class SchemaError(ValueError):
    """A record does not match the dataclass it is read into (a missing tensor, a wrong dtype)."""


@dataclass(frozen=True)
class FieldSpec:
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None
    flag: str | None = None
    count: bool = False
    fields: Mapping[str, FieldSpec] = field(default_factory=dict)


_DEFAULT = FieldSpec()


def stored(
    dtype: torch.dtype | None = None,
    *,
    shape: tuple[int, ...] | None = None,
    flag: str | None = None,
    count: bool = False,
    fields: Mapping[str, FieldSpec] | None = None,
) -> dict[str, FieldSpec]:
    """Field metadata: ``dataclasses.field(default=None, metadata=stored(torch.float64))``."""
    return {SCHEMA: FieldSpec(dtype, shape, flag, count, dict(fields or {}))}


def to_record(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of dataclass ``obj``: tensors named ``{prefix}{field path}``, meta JSON-ready."""
    tensors: dict[str, torch.Tensor] = {}
    meta = _encode_dataclass(obj, prefix, {}, tensors)
    return tensors, meta


def from_record(cls: type, prefix: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    """The ``cls`` instance that :func:`to_record` turned into ``(tensors, meta)``."""
    return _decode_dataclass(cls, prefix, meta, tensors, {})


@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def _spec(f: dataclasses.Field, overrides: Mapping[str, FieldSpec]) -> FieldSpec:
    return overrides.get(f.name) or f.metadata.get(SCHEMA, _DEFAULT)


def _optional(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, ``(hint, False)`` otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(hint)):
            return args[0], True
    return hint, False


def _is_tensor(hint: Any) -> bool:
    return hint is torch.Tensor


def _encode_dataclass(
    obj: Any, prefix: str, overrides: Mapping[str, FieldSpec], tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for f, hint in _fields(type(obj)):
        spec = _spec(f, overrides)
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        inner, optional = _optional(hint)
        if _is_tensor(inner):
            if value is None and not optional:
                raise SchemaError(f"{name}: a tensor is required, got None")
            if value is not None:
                _put(tensors, name, value, spec)
            if spec.flag is not None:
                meta[spec.flag] = value is not None
            if spec.count:
                meta[f.name] = None if value is None else len(value)
            continue
        meta[f.name] = _encode(value, hint, spec, name, tensors)
    return meta


def _put(tensors: dict[str, torch.Tensor], name: str, value: Any, spec: FieldSpec) -> None:
    if not isinstance(value, torch.Tensor):
        raise SchemaError(f"{name}: expected a tensor, got {type(value).__name__}")
    if name in tensors:
        raise SchemaError(f"{name}: two fields map to the same tensor name")
    value = value.detach()
    if spec.dtype is not None:
        value = value.to(spec.dtype)
    if spec.shape is not None:
        value = value.reshape(spec.shape)
    tensors[name] = value.contiguous()


def _encode(value: Any, hint: Any, spec: FieldSpec, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    inner, optional = _optional(hint)
    if optional:
        return None if value is None else _encode(value, inner, spec, name, tensors)
    if _is_tensor(hint):
        _put(tensors, name, value, spec)
        return None
    if dataclasses.is_dataclass(hint):
        return _encode_dataclass(value, f"{name}.", spec.fields, tensors)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        value_hint = args[1] if args else Any
        if _is_tensor(value_hint):
            for key, item in value.items():
                _put(tensors, f"{name}.{_key(key, name)}", item, spec)
            return list(value)
        return {_key(k, name): _encode(v, value_hint, spec, f"{name}.{k}", tensors) for k, v in value.items()}
    if origin in (tuple, list):
        return [_encode(v, h, spec, f"{name}.{i}", tensors) for i, (v, h) in enumerate(zip(value, _items(args, value)))]
    if isinstance(value, _JSON_SCALARS) or hint is Any:
        return value
    raise SchemaError(f"{name}: cannot store {type(value).__name__} (declared {hint!r})")


def _key(key: Any, name: str) -> str:
    if not isinstance(key, str):
        raise SchemaError(f"{name}: dict keys must be str, got {key!r}")
    return key


def _items(args: tuple, value: Any) -> list[Any]:
    """The hint of each item of a tuple / list declared with ``args``."""
    if not args:
        return [Any] * len(value)
    if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
        return [args[0]] * len(value)
    if len(args) != len(value):
        raise SchemaError(f"expected {len(args)} items, got {len(value)}")
    return list(args)


def _decode_dataclass(
    cls: type,
    prefix: str,
    meta: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    overrides: Mapping[str, FieldSpec],
) -> Any:
    if not isinstance(meta, Mapping):
        raise SchemaError(f"{prefix or cls.__name__}: expected an object for {cls.__name__}, got {meta!r}")
    kwargs: dict[str, Any] = {}
    for f, hint in _fields(cls):
        spec = _spec(f, overrides)
        name = f"{prefix}{f.name}"
        inner, optional = _optional(hint)
        if _is_tensor(inner):
            present = name in tensors
            if spec.flag is not None and meta.get(spec.flag) != present:
                where = "there" if present else "missing"
                raise SchemaError(f"{name}: {spec.flag} is {meta.get(spec.flag)!r} but the tensor is {where}")
            if not present and not optional:
                raise SchemaError(f"{name}: missing tensor")
            kwargs[f.name] = _get(tensors, name, spec) if present else None
            continue
        if f.name not in meta:
            raise SchemaError(f"{name}: missing from the metadata")
        kwargs[f.name] = _decode(hint, spec, name, meta[f.name], tensors)
    return cls(**kwargs)


def _get(tensors: Mapping[str, torch.Tensor], name: str, spec: FieldSpec) -> torch.Tensor:
    if name not in tensors:
        raise SchemaError(f"{name}: missing tensor")
    value = tensors[name]
    if spec.dtype is not None and value.dtype != spec.dtype:
        raise SchemaError(f"{name}: stored as {value.dtype}, declared {spec.dtype}")
    return value


def _decode(hint: Any, spec: FieldSpec, name: str, value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    inner, optional = _optional(hint)
    if optional:
        return None if value is None else _decode(inner, spec, name, value, tensors)
    if _is_tensor(hint):
        return _get(tensors, name, spec)
    if dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, f"{name}.", value, tensors, spec.fields)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        value_hint = args[1] if args else Any
        if _is_tensor(value_hint):
            return {key: _get(tensors, f"{name}.{key}", spec) for key in value}
        return {k: _decode(value_hint, spec, f"{name}.{k}", v, tensors) for k, v in value.items()}
    if origin in (tuple, list):
        items = [
            _decode(h, spec, f"{name}.{i}", v, tensors) for i, (v, h) in enumerate(zip(value, _items(args, value)))
        ]
        return tuple(items) if origin is tuple else items
    return value
