"""Pair the nodes, values and initializers of two graphs, and say by which rule each pair matched.

Why three rules, in this order: a diff is only as good as its pairing. Pair too little and a
one-line recipe change shows up as hundreds of "removed + added" nodes; pair too eagerly and a
real change hides inside a wrong match. So the rules go from the most to the least certain:

1. **name** — equal node names. ``StableNamesPass`` names nodes after the module path and role
   that produced them (``/model/layers.3/mlp/down_proj/MatMulNBits``), which only changes when
   the model does; the exporter's counters (``node_Shape_7589``) are paired by name too when they
   happen to agree, and left to rule 2 when they do not.
2. **structure** — for a node left unpaired, the B node of the same domain, op type and
   attributes that reads the *paired* inputs (graph inputs by name, initializers by name or by
   content hash, outputs of already-paired nodes). Swept in A's topological order, so a
   renamed chain pairs from its inputs down. A pair whose names differ is reported as a rename.
3. **position** — what is still unpaired, per (domain, op type), when both sides have the same
   count of it: paired in topological order. This is the rule that lets a rewired or re-parametrised
   node show as *changed* instead of removed + added; it is reported separately so a reader can
   discount it.

Subgraphs (``If``/``Loop`` bodies) and model-local functions are walked as part of their parent:
their nodes are listed after the parent graph's, with the owner in their path.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import onnx_ir as ir

from aqexport.diff.side import GraphSide

__all__ = ["OPAQUE_PREFIX", "Alignment", "align", "all_nodes", "attribute_text"]

# A golden description keeps tensor and graph attributes as their canonical text only; the
# prefix marks such a text so it compares equal to the same attribute computed from a model.
OPAQUE_PREFIX = "\x00aqexport-attribute:"


@dataclass
class Alignment:
    """Node pairs (A node, B node, rule), what stayed unpaired, and the value map they imply."""

    pairs: list[tuple[ir.Node, ir.Node, str]] = field(default_factory=list)
    only_a: list[ir.Node] = field(default_factory=list)
    only_b: list[ir.Node] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)  # A value name -> B value name
    initializers: dict[str, tuple[str, str]] = field(default_factory=dict)  # A name -> (B name, rule)
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)  # graph inputs: A -> (B, rule)

    def value_pairs(self) -> list[tuple[str, str]]:
        """Intermediate tensors to compare when both models run, in A's topological order."""
        seen: set[str] = set()
        ordered: list[tuple[str, str]] = []
        for node_a, node_b, _ in self.pairs:
            for out_a, out_b in zip(node_a.outputs, node_b.outputs):
                if out_a.name and out_b.name and out_a.name not in seen:
                    seen.add(out_a.name)
                    ordered.append((out_a.name, out_b.name))
        return ordered

    def summary(self) -> dict:
        by_rule = collections.Counter(rule for _, _, rule in self.pairs)
        renamed = [
            {"a": a.name, "b": b.name, "op": a.op_type, "rule": rule}
            for a, b, rule in self.pairs
            if (a.name or "") != (b.name or "")
        ]
        return {
            "by_rule": {rule: by_rule.get(rule, 0) for rule in ("name", "structure", "position")},
            "renamed": renamed,
            "unmatched": {
                "a": [n.name or n.op_type for n in self.only_a],
                "b": [n.name or n.op_type for n in self.only_b],
            },
        }


def all_nodes(model: ir.Model) -> list[ir.Node]:
    """The main graph's nodes in topological order, then every subgraph's and function's."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(function)
    return nodes


def attribute_text(side: GraphSide, attr: ir.Attr) -> str:
    """A canonical text of one attribute, equal on both sides exactly when the values are
    equal; a golden description stores this text instead of the value."""
    value = attr.value
    if isinstance(value, str) and value.startswith(OPAQUE_PREFIX):  # a description's stored text
        return value[len(OPAQUE_PREFIX) :]
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return f"<{attr.type.name.lower()}>"  # walked as nodes of their own
    if attr.type == ir.AttributeType.TENSOR:
        tensor = value
        return f"tensor {tensor.dtype.name}{list(tensor.shape)} {_tensor_hash(tensor)}"
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, (list, tuple)):
        return repr([float(v) if isinstance(v, float) else v for v in value])
    return repr(value)


def _tensor_hash(tensor: ir.TensorProtocol) -> str:
    from aqexport.diff.side import tensor_digest

    array = tensor.numpy()
    return tensor_digest(array, tensor.dtype.name, tuple(array.shape))


def _signature(side: GraphSide, node: ir.Node) -> tuple:
    attrs = tuple(sorted((name, attribute_text(side, attr)) for name, attr in node.attributes.items()))
    return (node.domain, node.op_type, attrs)


def align(a: GraphSide, b: GraphSide) -> Alignment:
    nodes_a, nodes_b = all_nodes(a.model), all_nodes(b.model)
    result = Alignment()
    _pair_graph_inputs(a, b, result)
    _pair_initializers(a, b, result)
    paired_b: set[int] = set()
    by_name_b = {node.name: node for node in nodes_b if node.name}
    unpaired_a: list[ir.Node] = []
    for node in nodes_a:
        partner = by_name_b.get(node.name) if node.name else None
        if partner is not None and id(partner) not in paired_b and partner.op_type == node.op_type:
            _pair(result, node, partner, "name", paired_b)
        else:
            unpaired_a.append(node)
    unpaired_a = _pair_by_structure(a, b, unpaired_a, nodes_b, paired_b, result)
    unpaired_a = _pair_by_name_ignoring_op(unpaired_a, by_name_b, paired_b, result)
    unpaired_a = _pair_by_position(unpaired_a, nodes_b, paired_b, result)
    result.only_a = unpaired_a
    result.only_b = [node for node in nodes_b if id(node) not in paired_b]
    _pair_initializers_by_role(a, b, result)
    order = {id(node): index for index, node in enumerate(nodes_a)}
    result.pairs.sort(key=lambda pair: order[id(pair[0])])
    return result


def _pair(result: Alignment, node_a: ir.Node, node_b: ir.Node, rule: str, paired_b: set[int]) -> None:
    result.pairs.append((node_a, node_b, rule))
    paired_b.add(id(node_b))
    for out_a, out_b in zip(node_a.outputs, node_b.outputs):
        if out_a.name and out_b.name:
            result.values[out_a.name] = out_b.name


def _pair_graph_inputs(a: GraphSide, b: GraphSide, result: Alignment) -> None:
    """By name; the rest by position when dtype and rank agree (a renamed input)."""
    names_b = {v.name for v in b.model.graph.inputs}
    left_a = []
    for value in a.model.graph.inputs:
        if value.name in names_b:
            result.inputs[value.name] = (value.name, "name")
        else:
            left_a.append(value)
    taken = {partner for partner, _ in result.inputs.values()}
    left_b = [v for v in b.model.graph.inputs if v.name not in taken]
    for value_a, value_b in zip(left_a, left_b):
        same_rank = (value_a.shape is None) == (value_b.shape is None) and (
            value_a.shape is None or len(value_a.shape) == len(value_b.shape)
        )
        if value_a.dtype == value_b.dtype and same_rank:
            result.inputs[value_a.name] = (value_b.name, "position")
    for name_a, (name_b, _) in result.inputs.items():
        result.values[name_a] = name_b


def _pair_initializers(a: GraphSide, b: GraphSide, result: Alignment) -> None:
    """By name; the rest by content hash (a renamed constant), read only for the unpaired."""
    inits_a, inits_b = a.initializers, b.initializers
    for name in inits_a:
        if name in inits_b:
            result.initializers[name] = (name, "name")
    left_b = {name: value for name, value in inits_b.items() if name not in inits_a}
    left_a = {name: value for name, value in inits_a.items() if name not in inits_b}
    if left_a and left_b:
        by_digest: dict[str, list[str]] = collections.defaultdict(list)
        for name, value in left_b.items():
            by_digest[_safe_digest(b, value)].append(name)
        for name, value in left_a.items():
            candidates = by_digest.get(_safe_digest(a, value))
            if candidates:
                result.initializers[name] = (candidates.pop(0), "content")
    for name_a, (name_b, _) in result.initializers.items():
        result.values.setdefault(name_a, name_b)


def _pair_initializers_by_role(a: GraphSide, b: GraphSide, result: Alignment) -> None:
    """An initializer left unpaired that fills the same input of a paired node as one left
    unpaired on the other side is the same role under a new name (a norm weight that absorbed
    a transform becomes ``…weight_folded``): pair them, so the report says "renamed, values
    changed" instead of one removed and one added tensor and a rewired node."""
    paired_b = {name_b for name_b, _ in result.initializers.values()}
    for node_a, node_b, _ in result.pairs:
        for in_a, in_b in zip(node_a.inputs, node_b.inputs):
            if in_a is None or in_b is None or in_a.name in result.initializers or in_b.name in paired_b:
                continue
            if in_a.name in a.initializers and in_b.name in b.initializers:
                result.initializers[in_a.name] = (in_b.name, "role")
                result.values[in_a.name] = in_b.name
                paired_b.add(in_b.name)


def _safe_digest(side: GraphSide, value: ir.Value) -> str:
    try:
        return side.digest(value)
    except Exception:  # a value without data (a description missing it) never pairs by content
        return f"<no data {id(value)}>"


def _pair_by_structure(
    a: GraphSide,
    b: GraphSide,
    unpaired_a: list[ir.Node],
    nodes_b: list[ir.Node],
    paired_b: set[int],
    result: Alignment,
) -> list[ir.Node]:
    consumers_b: dict[str, list[ir.Node]] = collections.defaultdict(list)
    no_input_b: list[ir.Node] = []
    for node in nodes_b:
        names = [v.name for v in node.inputs if v is not None and v.name]
        if not names:
            no_input_b.append(node)
        for name in names:
            consumers_b[name].append(node)
    signature_b = {id(node): _signature(b, node) for node in nodes_b}
    still: list[ir.Node] = []
    for node in unpaired_a:
        inputs = [None if v is None else result.values.get(v.name or "") for v in node.inputs]
        if any(v is not None and name is None for v, name in zip(node.inputs, inputs)):
            still.append(node)  # an input with no partner: structure cannot decide
            continue
        pool = consumers_b.get(next((n for n in inputs if n), ""), no_input_b)
        signature = _signature(a, node)
        matches = [
            candidate
            for candidate in pool
            if id(candidate) not in paired_b
            and signature_b[id(candidate)] == signature
            and [None if v is None else v.name for v in candidate.inputs] == inputs
        ]
        if len(matches) == 1:
            _pair(result, node, matches[0], "structure", paired_b)
        else:
            still.append(node)
    return still


def _pair_by_name_ignoring_op(
    unpaired_a: list[ir.Node], by_name_b: dict[str, ir.Node], paired_b: set[int], result: Alignment
) -> list[ir.Node]:
    """A node whose op type changed under a stable module-path name (``…/Add`` became a Mul
    is named ``…/Mul``; the exporter's name kept, the op swapped) is the same site, changed."""
    still = []
    for node in unpaired_a:
        partner = by_name_b.get(node.name) if node.name else None
        if partner is not None and id(partner) not in paired_b:
            _pair(result, node, partner, "name", paired_b)
        else:
            still.append(node)
    return still


def _pair_by_position(
    unpaired_a: list[ir.Node], nodes_b: list[ir.Node], paired_b: set[int], result: Alignment
) -> list[ir.Node]:
    groups_a: dict[tuple[str, str], list[ir.Node]] = collections.defaultdict(list)
    groups_b: dict[tuple[str, str], list[ir.Node]] = collections.defaultdict(list)
    for node in unpaired_a:
        groups_a[(node.domain, node.op_type)].append(node)
    for node in nodes_b:
        if id(node) not in paired_b:
            groups_b[(node.domain, node.op_type)].append(node)
    still = []
    for key, group in groups_a.items():
        partners = groups_b.get(key, [])
        if len(partners) == len(group):
            for node_a, node_b in zip(group, partners):
                _pair(result, node_a, node_b, "position", paired_b)
        else:
            still.extend(group)
    order = {id(node): index for index, node in enumerate(unpaired_a)}
    return sorted(still, key=lambda node: order[id(node)])
