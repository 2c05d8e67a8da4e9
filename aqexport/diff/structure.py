"""The structural section of a diff: nodes, ops, opsets, graph I/O, initializers and sizes.

Read from the graphs alone (plus file sizes), never from weight values except to decide whether
an initializer of the same name changed: that decision reads one tensor per side at a time, or
compares stored digests when a side is a golden description. Everything is listed in graph
order (nodes) or name order (initializers, I/O) so two runs give the same report.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from aqexport.diff.align import Alignment, all_nodes, attribute_text
from aqexport.diff.side import GraphSide

__all__ = ["compare_structure", "describe_value", "bytes_by_dtype"]


def compare_structure(a: GraphSide, b: GraphSide, alignment: Alignment) -> dict[str, Any]:
    sizes_a, sizes_b = sum(a.file_sizes().values()), sum(b.file_sizes().values())
    return {
        "nodes": _nodes(a, b, alignment),
        "ops": _ops(a, b),
        "opsets": {"a": dict(sorted(a.model.opset_imports.items())), "b": dict(sorted(b.model.opset_imports.items()))},
        "io": {
            "inputs": _io(list(a.model.graph.inputs), list(b.model.graph.inputs), alignment.inputs),
            "outputs": _io(list(a.model.graph.outputs), list(b.model.graph.outputs), {}),
        },
        "initializers": _initializers(a, b, alignment),
        "sizes": {"a_bytes": sizes_a, "b_bytes": sizes_b, "ratio": sizes_b / sizes_a if sizes_a else None},
    }


def describe_value(value: ir.Value) -> dict[str, Any]:
    dtype = value.dtype.name.lower() if value.dtype is not None else None
    shape = None if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
    return {"name": value.name, "dtype": dtype, "shape": shape}


def bytes_by_dtype(side: GraphSide) -> dict[str, int]:
    """Initializer bytes per storage type, from shapes alone (nothing read)."""
    totals: collections.Counter[str] = collections.Counter()
    for value in side.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            totals[tensor.dtype.name.lower()] += int(tensor.nbytes)
    return dict(sorted(totals.items()))


def _node_label(node: ir.Node) -> dict[str, str]:
    return {"name": node.name or "", "op": node.op_type, "domain": node.domain or ""}


def _nodes(a: GraphSide, b: GraphSide, alignment: Alignment) -> dict[str, Any]:
    changed, unchanged = [], 0
    for node_a, node_b, rule in alignment.pairs:
        changes = _node_changes(a, node_a, b, node_b, alignment)
        if changes:
            changed.append(
                {"a": node_a.name or "", "b": node_b.name or "", "op": node_a.op_type, "rule": rule, "changes": changes}
            )
        else:
            unchanged += 1
    return {
        "added": [_node_label(n) for n in alignment.only_b],
        "removed": [_node_label(n) for n in alignment.only_a],
        "changed": changed,
        "unchanged": unchanged,
    }


def _node_changes(a: GraphSide, node_a: ir.Node, b: GraphSide, node_b: ir.Node, alignment: Alignment) -> list[str]:
    changes: list[str] = []
    if (node_a.domain, node_a.op_type) != (node_b.domain, node_b.op_type):
        changes.append(f"op {_qualified(node_a)} -> {_qualified(node_b)}")
    attrs_a = {k: attribute_text(a, v) for k, v in node_a.attributes.items()}
    attrs_b = {k: attribute_text(b, v) for k, v in node_b.attributes.items()}
    for key in sorted(set(attrs_a) | set(attrs_b)):
        if attrs_a.get(key) != attrs_b.get(key):
            changes.append(f"attribute {key}: {attrs_a.get(key, '(none)')} -> {attrs_b.get(key, '(none)')}")
    if len(node_a.inputs) != len(node_b.inputs):
        changes.append(f"inputs {len(node_a.inputs)} -> {len(node_b.inputs)}")
    for index, (in_a, in_b) in enumerate(zip(node_a.inputs, node_b.inputs)):
        name_a = None if in_a is None else in_a.name
        name_b = None if in_b is None else in_b.name
        expected = alignment.values.get(name_a or "", name_a)
        if expected != name_b:
            changes.append(f"input {index}: {name_a or '(none)'} -> {name_b or '(none)'}")
    if len(node_a.outputs) != len(node_b.outputs):
        changes.append(f"outputs {len(node_a.outputs)} -> {len(node_b.outputs)}")
    return changes


def _qualified(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain else node.op_type


def _ops(a: GraphSide, b: GraphSide) -> dict[str, Any]:
    count_a = collections.Counter(f"{n.domain}::{n.op_type}" for n in all_nodes(a.model))
    count_b = collections.Counter(f"{n.domain}::{n.op_type}" for n in all_nodes(b.model))
    keys = sorted(set(count_a) | set(count_b))
    delta = {key: count_b.get(key, 0) - count_a.get(key, 0) for key in keys if count_a.get(key) != count_b.get(key)}
    return {"a": dict(sorted(count_a.items())), "b": dict(sorted(count_b.items())), "delta": delta}


def _io(values_a: list[ir.Value], values_b: list[ir.Value], paired: dict[str, tuple[str, str]]) -> dict[str, Any]:
    by_name_b = {v.name: v for v in values_b}
    by_name_a = {v.name: v for v in values_a}
    renamed = {name_a: name_b for name_a, (name_b, rule) in paired.items() if rule == "position"}
    changed, renames = [], []
    for value in values_a:
        partner = by_name_b.get(value.name)
        if partner is None and value.name in renamed:
            partner = by_name_b.get(renamed[value.name])
            renames.append({"a": value.name, "b": partner.name})
        if partner is None:
            continue
        da, db = describe_value(value), describe_value(partner)
        if (da["dtype"], da["shape"]) != (db["dtype"], db["shape"]):
            changed.append({"name": value.name, "a": _type_of(da), "b": _type_of(db)})
    renamed_b = set(renamed.values())
    return {
        "added": [describe_value(v) for v in values_b if v.name not in by_name_a and v.name not in renamed_b],
        "removed": [describe_value(v) for v in values_a if v.name not in by_name_b and v.name not in renamed],
        "renamed": renames,
        "changed": changed,
    }


def _type_of(described: dict[str, Any]) -> dict[str, Any]:
    return {"dtype": described["dtype"], "shape": described["shape"]}


def _initializers(a: GraphSide, b: GraphSide, alignment: Alignment) -> dict[str, Any]:
    inits_a, inits_b = a.initializers, b.initializers
    paired_b = {name_b for name_b, _ in alignment.initializers.values()}
    changed, renamed, unchanged = [], [], 0
    for name_a, (name_b, rule) in sorted(alignment.initializers.items()):
        value_a, value_b = inits_a[name_a], inits_b[name_b]
        if rule in ("content", "role"):
            renamed.append({"a": name_a, "b": name_b, "rule": rule})
        changes = _initializer_changes(a, value_a, b, value_b)
        if changes:
            changed.append({"name": name_a, "changes": changes})
        else:
            unchanged += 1
    return {
        "added": [_init_label(v) for name, v in sorted(inits_b.items()) if name not in paired_b],
        "removed": [_init_label(v) for name, v in sorted(inits_a.items()) if name not in alignment.initializers],
        "renamed": renamed,
        "changed": changed,
        "unchanged": unchanged,
    }


def _init_label(value: ir.Value) -> dict[str, Any]:
    tensor = value.const_value
    dtype = tensor.dtype.name.lower() if tensor is not None else None
    shape = list(tensor.shape) if tensor is not None else None
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _initializer_changes(a: GraphSide, value_a: ir.Value, b: GraphSide, value_b: ir.Value) -> list[str]:
    label_a, label_b = _init_label(value_a), _init_label(value_b)
    changes = []
    if label_a["dtype"] != label_b["dtype"]:
        changes.append(f"dtype {label_a['dtype']} -> {label_b['dtype']}")
    if label_a["shape"] != label_b["shape"]:
        changes.append(f"shape {label_a['shape']} -> {label_b['shape']}")
    if changes:
        return changes
    if a.is_description or b.is_description:
        return [] if a.digest(value_a) == b.digest(value_b) else ["content (hash differs)"]
    differ, max_delta, max_a, size = _chunked_delta(a.chunks(value_a), b.chunks(value_b))
    if differ == 0:
        return []
    if value_a.const_value.dtype.is_floating_point():
        return [f"values: max abs {max_delta:.6g} (max |a| {max_a:.6g}), {differ} of {size} differ"]
    return [f"values: {differ} of {size} stored elements differ"]


def _chunked_delta(chunks_a: Iterator[np.ndarray], chunks_b: Iterator[np.ndarray]) -> tuple[int, float, float, int]:
    """(elements that differ, max |a − b|, max |a|, elements) streaming both sides' chunks, so
    no tensor is held whole whatever its size."""
    differ, max_delta, max_a, size = 0, 0.0, 0.0, 0
    for chunk_a, chunk_b in zip(chunks_a, chunks_b, strict=True):
        size += chunk_a.size
        if chunk_a.dtype.kind not in "fiu":
            differ += int((chunk_a != chunk_b).sum())
            continue
        delta = np.abs(chunk_a.astype(np.float64) - chunk_b.astype(np.float64))
        differ += int(np.count_nonzero(delta))
        max_delta = max(max_delta, float(delta.max(initial=0.0)))
        max_a = max(max_a, float(np.abs(chunk_a.astype(np.float64)).max(initial=0.0)))
    return differ, max_delta, max_a, size
