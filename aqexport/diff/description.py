"""Golden graph descriptions: what CI commits instead of a model.

A description is the structure of an artifact's graph (nodes with their op, inputs, outputs and
canonical attribute text; graph I/O; opsets), every initializer's dtype, shape and content hash,
and the artifact's file sizes — no weights, so it is small enough to review in a pull request
(a tiny test model's is a few hundred KiB of JSON). ``aqexport diff --describe ARTIFACT -o
golden.json`` writes one; ``aqexport diff golden.json ARTIFACT`` diffs against it like against
any other side: structure exactly, weights by hash (a changed hash is reported, not measured).

Why hashes rather than tolerances: a description cannot say *how far* weights moved, only
*whether*; the policy used with goldens therefore gates structure (ops, I/O, node set) and
leaves weight changes to a report line, because floating-point calibration may differ in the
last bit between CPU types while the graph must not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from aqexport.diff.align import OPAQUE_PREFIX, all_nodes, attribute_text
from aqexport.diff.side import DESCRIPTION_FORMAT, GraphSide
from aqexport.diff.structure import describe_value
from aqexport.errors import AqexportError

__all__ = ["DESCRIPTION_VERSION", "describe", "load_description"]

DESCRIPTION_VERSION = 1


def describe(side: GraphSide) -> dict[str, Any]:
    model = side.model
    return {
        "format": DESCRIPTION_FORMAT,
        "version": DESCRIPTION_VERSION,
        "opsets": dict(sorted(model.opset_imports.items())),
        "inputs": [describe_value(v) for v in model.graph.inputs],
        "outputs": [describe_value(v) for v in model.graph.outputs],
        "nodes": [
            {
                "name": node.name or "",
                "op": node.op_type,
                "domain": node.domain or "",
                "inputs": [None if v is None else v.name for v in node.inputs],
                "outputs": [v.name for v in node.outputs],
                "attributes": {k: _attribute(side, a) for k, a in sorted(node.attributes.items())},
            }
            for node in all_nodes(model)
            if not _in_subgraph(node, model)
        ],
        "initializers": {name: _initializer(side, value) for name, value in sorted(side.initializers.items())},
        "files": side.file_sizes(),
        "records": _records(side),
    }


def _records(side: GraphSide) -> dict[str, Any]:
    """The build records a linear's name and scheme are read from (packed groups, per-linear
    plan, the transform form), without paths, versions or timings that differ between machines."""
    manifest, report = side.manifest or {}, side.report or {}
    quantization_config = (manifest.get("config") or {}).get("quantization")
    return {
        "manifest": {
            "fusions": manifest.get("fusions"),
            "quantization": manifest.get("quantization"),
            "config": {"quantization": quantization_config} if quantization_config else None,
        },
        "report": {
            "transforms": report.get("transforms"),
            "calibration": {"recipe": (report.get("calibration") or {}).get("recipe")},
        },
    }


SMALL_VALUES = 64  # elements: split sizes, axes, shapes — what reading a graph's layout needs


def _initializer(side: GraphSide, value: ir.Value) -> dict[str, Any]:
    tensor = value.const_value
    described: dict[str, Any] = {
        "dtype": tensor.dtype.name.lower(),
        "shape": list(tensor.shape),
        "sha256": side.digest(value),
    }
    if tensor.size <= SMALL_VALUES and tensor.dtype.is_integer():
        described["values"] = side.read(value).ravel().tolist()
    return described


_PLAIN = {
    ir.AttributeType.INT,
    ir.AttributeType.FLOAT,
    ir.AttributeType.STRING,
    ir.AttributeType.INTS,
    ir.AttributeType.FLOATS,
    ir.AttributeType.STRINGS,
}


def _attribute(side: GraphSide, attr: ir.Attr) -> dict[str, Any]:
    """Plain values as they are (a linear's ``bits`` stays an int a reader can use); tensors
    and subgraphs as their canonical text, which is all a structural comparison needs."""
    if attr.type in _PLAIN:
        value = attr.value
        return {"type": attr.type.name, "value": list(value) if isinstance(value, (list, tuple)) else value}
    return {"type": "TEXT", "value": attribute_text(side, attr)}


def _restore_attribute(name: str, stored: dict[str, Any]) -> ir.Attr:
    if stored["type"] == "TEXT":
        return ir.AttrString(name, OPAQUE_PREFIX + stored["value"])
    return ir.Attr(name, ir.AttributeType[stored["type"]], stored["value"])


def _in_subgraph(node: ir.Node, model: ir.Model) -> bool:
    return node.graph is not None and node.graph is not model.graph and not isinstance(node.graph, ir.Function)


def load_description(path: Path, label: str) -> GraphSide:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AqexportError(f"'{label}' is not a readable graph description ({exc})", _REWRITE) from None
    if not isinstance(payload, dict) or payload.get("format") != DESCRIPTION_FORMAT:
        raise AqexportError(f"'{label}' is a .json file but not an aqexport graph description", _REWRITE)
    if payload.get("version") != DESCRIPTION_VERSION:
        raise AqexportError(
            f"'{label}' is graph description version {payload.get('version')}; "
            f"this aqexport reads {DESCRIPTION_VERSION}",
            _REWRITE,
        )
    try:
        model, digests = _model_of(payload)
    except (KeyError, TypeError, ValueError) as exc:
        raise AqexportError(
            f"'{label}' is a malformed graph description ({type(exc).__name__}: {exc})", _REWRITE
        ) from None
    records = payload.get("records") or {}
    side = GraphSide(
        label=label,
        model=model,
        directory=None,
        onnx_path=None,
        manifest=records.get("manifest"),
        report=records.get("report"),
        description=payload,
    )
    side.remember_digests(digests)
    return side


_REWRITE = "write it again with 'aqexport diff --describe ARTIFACT -o FILE'"


def _model_of(payload: dict[str, Any]) -> tuple[ir.Model, dict[str, str]]:
    values: dict[str, ir.Value] = {}

    def value(name: str | None, dtype: str | None = None, shape: list | None = None) -> ir.Value | None:
        if name is None:
            return None
        if name not in values:
            values[name] = ir.Value(
                name=name,
                type=None if dtype is None else ir.TensorType(ir.DataType[dtype.upper()]),
                shape=None if shape is None else ir.Shape(shape),
            )
        return values[name]

    digests = {}
    initializers = []
    for name, info in payload["initializers"].items():
        dtype = ir.DataType[info["dtype"].upper()]
        tensor: ir.TensorProtocol = ir.ExternalTensor(
            location="<description>",
            offset=0,
            length=math.ceil(math.prod(info["shape"]) * dtype.itemsize),
            dtype=dtype,
            shape=ir.Shape(info["shape"]),
            name=name,
            base_dir="",
        )
        if "values" in info:
            array = np.array(info["values"], dtype=dtype.numpy()).reshape(info["shape"])
            tensor = ir.tensor(array, dtype=dtype, name=name)
        initializer = value(name, info["dtype"], info["shape"])
        initializer.const_value = tensor
        initializers.append(initializer)
        digests[name] = info["sha256"]
    inputs = [value(v["name"], v["dtype"], v["shape"]) for v in payload["inputs"]]
    nodes = []
    for entry in payload["nodes"]:
        attributes = [_restore_attribute(k, v) for k, v in entry["attributes"].items()]
        node = ir.Node(
            entry["domain"],
            entry["op"],
            [value(name) for name in entry["inputs"]],
            attributes,
            num_outputs=len(entry["outputs"]),
            name=entry["name"],
        )
        for output, name in zip(node.outputs, entry["outputs"]):
            output.name = name
            values[name] = output
        nodes.append(node)
    outputs = []
    for described in payload["outputs"]:
        output = values.get(described["name"]) or value(described["name"])
        if described["dtype"] is not None:
            output.type = ir.TensorType(ir.DataType[described["dtype"].upper()])
        output.shape = None if described["shape"] is None else ir.Shape(described["shape"])
        outputs.append(output)
    graph = ir.Graph(
        inputs, outputs, nodes=nodes, initializers=initializers, opset_imports=payload["opsets"], name="golden"
    )
    return ir.Model(graph, ir_version=10), digests
