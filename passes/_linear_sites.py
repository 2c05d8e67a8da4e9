"""Find where a Hugging Face linear lives in an exported graph, by its weight's stable name.

After ``StableNamesPass`` the weight of ``model.layers.0.self_attn.q_proj`` is the initializer
``model.layers.0.self_attn.q_proj.weight``; its consumer is a ``MatMul`` (weight ``[in, out]``)
or, for 2-D inputs, a ``Gemm`` (either layout, per ``transB``). The bias, if the exporter kept
one, is the ``Gemm``'s third input or a lone ``Add`` with an initializer after the ``MatMul``.
Initializers may be shared (the exporter deduplicates equal constants), so passes that change
a value always register a new initializer instead of editing one in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed

__all__ = ["LinearSite", "check_tables_unused", "find_linear", "new_initializer", "table_lookups", "take_over"]


@dataclass
class LinearSite:
    node: ir.Node  # MatMul or Gemm
    input: ir.Value
    output: ir.Value  # the linear's output including its bias
    bias_node: ir.Node | None  # Add after MatMul, or the Gemm itself
    bias_index: int | None  # input index of the bias on bias_node


def _single_consumer(value: ir.Value) -> ir.Node | None:
    consumers = list(value.consumers())
    return consumers[0] if len(consumers) == 1 else None


def _plain_gemm(node: ir.Node) -> bool:
    """``x · Wᵀ + C`` as the exporter writes a linear: no transposed input, unit alpha and beta."""

    def attribute(name: str, default):
        attr = node.attributes.get(name)
        return default if attr is None else attr.value

    return attribute("transA", 0) == 0 and attribute("alpha", 1.0) == 1.0 and attribute("beta", 1.0) == 1.0


def find_linear(graph: ir.Graph, weight_name: str) -> LinearSite | None:
    weight = graph.initializers.get(weight_name)
    if weight is None:
        return None
    uses = [(node, index) for node, index in weight.uses() if node.op_type in ("MatMul", "Gemm") and index == 1]
    if len(uses) != 1:
        return None
    node = uses[0][0]
    if node.op_type == "Gemm" and not _plain_gemm(node):
        return None
    if node.op_type == "Gemm":
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        return LinearSite(node, node.inputs[0], node.outputs[0], node if has_bias else None, 2 if has_bias else None)
    output = node.outputs[0]
    add = _single_consumer(output)
    if add is not None and add.op_type == "Add":
        other = 1 if add.inputs[0] is output else 0
        if add.inputs[other] is not None and add.inputs[other].is_initializer():
            return LinearSite(node, node.inputs[0], add.outputs[0], add, other)
    return LinearSite(node, node.inputs[0], output, None, None)


def new_initializer(
    graph: ir.Graph, name: str, array: np.ndarray | ir.LazyTensor, dtype: ir.DataType | None = None
) -> ir.Value:
    """Register ``array`` under ``name`` (made unique), never replacing an existing one;
    ``dtype`` for types numpy has no name for (``UINT4``). A ``LazyTensor`` is registered as it
    is: its data is made when the writer reads it."""
    unique, k = name, 1
    while unique in graph.initializers:
        unique, k = f"{name}_{k}", k + 1
    if isinstance(array, ir.LazyTensor):
        array.name = unique
        tensor = array
    else:
        tensor = ir.tensor(np.ascontiguousarray(array), dtype=dtype, name=unique)
    value = ir.Value(name=unique, const_value=tensor)
    graph.register_initializer(value)
    return value


def take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere, graph outputs included, under ``old``'s name, type and
    shape (a graph output must keep both)."""
    name, old.name = old.name, None
    new.name = name
    new.type, new.shape = old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def table_lookups(graph: ir.Graph, path: str) -> list[ir.Node] | None:
    """The ``Gather(W, ids, axis=0)`` nodes reading the embedding table ``<path>.weight``; None
    unless they are all of its uses (a tied LM head would be another)."""
    table = graph.initializers.get(f"{path}.weight")
    uses = [] if table is None else list(table.uses())
    gathers = [node for node, index in uses if node.op_type == "Gather" and index == 0]
    axes = [node.attributes.get("axis") for node in gathers]
    if not gathers or len(gathers) != len(uses) or any(axis is not None and axis.value != 0 for axis in axes):
        return None
    return gathers


def check_tables_unused(model: ir.Model, paths) -> None:
    """Postcondition of the embedding passes: no float table ``<path>.weight`` is read any more."""
    for path in paths:
        table = model.graph.initializers.get(f"{path}.weight")
        if table is not None and len(table.uses()) > 0:
            raise PostconditionFailed(f"the float table '{path}.weight' is still used", BUG_FIX)
