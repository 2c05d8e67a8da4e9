"""Merge ``MatMulNBits`` nodes that read the same input into one, split after.

q/k/v read the same normed hidden state, and so do gate/up. At decode (one token) each of those
matmuls is a few hundred microseconds of memory traffic plus a fixed dispatch cost; one matmul
over the concatenated output columns pays the dispatch once and streams the weights in one go.
The onnxruntime-genai builder packs q/k/v the same way.

Rewrite rule, for every set of two or more ``com.microsoft.MatMulNBits`` nodes with the same
input ``A`` and equal ``K`` / ``bits`` / ``block_size`` / ``accuracy_level``, each with exactly
the inputs ``(A, B, scales, zero_points)`` or each with ``(A, B, scales)`` (symmetric codes,
default zero point), and constant weights:

    MatMulNBits(A, concat(B_i), concat(scales_i), concat(zero_points_i), N = Σ N_i)
        → Split(axis = -1, split = [N_1, …])  →  the old outputs, under their names

``B`` [N, blocks, blob], ``scales`` [N, blocks] and ``zero_points`` [N, ·] all lead with the
output axis, so the concatenation is along axis 0 and each column keeps its own codes, scale and
zero point: the function is unchanged bit for bit (each output column is the same dot product).

Precondition: none to check; nodes whose weights are not constants (``QuantizeWeightsPass``
makes them initializers) are left as they are. Postcondition (``ensures``): no two unpacked
``MatMulNBits`` that the rule could merge remain (same input, same attributes, constant
weights); every graph output is still computed. The merged nodes' weights are no longer used
(``RemoveUnusedNodesPass`` drops them).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, outputs_computed
from aqexport.passes._linear_sites import new_initializer, take_over
from aqexport.passes._result import StatsPassResult

__all__ = ["PackMatMulNBitsPass"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"
_SHARED_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")
_PACKED_INPUTS = ((1, "weight"), (2, "scales"), (3, "zero_points"))


def _packable(node: ir.Node) -> bool:
    if node.op_type != "MatMulNBits" or node.domain != _MS or len(node.inputs) not in (3, 4):
        return False
    return all(value is not None and value.const_value is not None for value in node.inputs[1:])


def _key(node: ir.Node) -> tuple:
    shared = (node.attributes.get_int(name, 0) for name in _SHARED_ATTRIBUTES)
    return (id(node.inputs[0]), len(node.inputs), *shared)


def _groups(graph: ir.Graph) -> list[list[ir.Node]]:
    """Packable nodes by shared input and attributes, in graph order."""
    groups: dict[tuple, list[ir.Node]] = defaultdict(list)
    for node in graph:
        if _packable(node):
            groups[_key(node)].append(node)
    return list(groups.values())


class PackMatMulNBitsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        packed = [self._pack(graph, nodes) for nodes in _groups(graph) if len(nodes) > 1]
        logger.info("packed %d MatMulNBits groups", len(packed))
        return StatsPassResult(
            model,
            modified=bool(packed),
            stats={"groups": len(packed), "nodes_merged": sum(len(names) for names in packed)},
            manifest={"fusions": {"packed_matmul_nbits": packed}},
        )

    def ensures(self, model: ir.Model) -> None:
        outputs_computed(model.graph, type(self).__name__)
        for nodes in _groups(model.graph):
            if len(nodes) > 1:
                raise PostconditionFailed(
                    f"{[node.name for node in nodes]} read one input and were not packed", BUG_FIX
                )

    @staticmethod
    def _pack(graph: ir.Graph, nodes: list[ir.Node]) -> list[str]:
        """Merge ``nodes``; returns their names (the manifest lists each packed group)."""
        first = nodes[0]
        widths = [node.attributes.get_int("N") for node in nodes]
        base = first.name.rsplit("/", 2)[0] if first.name else "packed"
        stem = first.inputs[1].name.rsplit(".", 2)[0]

        def concatenated(index: int, suffix: str) -> ir.Value:
            tensors = [node.inputs[index].const_value for node in nodes]
            name = f"{stem}.packed_{suffix}"
            if not any(isinstance(tensor, ir.LazyTensor) for tensor in tensors):
                return new_initializer(graph, name, np.concatenate([tensor.numpy() for tensor in tensors], axis=0))
            # lazy parts (``lazy_packed_codes``) stay lazy: concatenated when the writer reads them
            first_shape = list(tensors[0].shape)
            shape = ir.Shape([sum(tensor.shape[0] for tensor in tensors), *first_shape[1:]])
            lazy = ir.LazyTensor(
                lambda: ir.tensor(np.concatenate([tensor.numpy() for tensor in tensors], axis=0)),
                tensors[0].dtype,
                shape,
            )
            return new_initializer(graph, name, lazy)

        attributes = {name: attr.value for name, attr in first.attributes.items()}
        attributes["N"] = sum(widths)
        tape = ir.tape.Tape()
        merged = tape.op(
            "MatMulNBits",
            [first.inputs[0], *(concatenated(i, suffix) for i, suffix in _PACKED_INPUTS[: len(first.inputs) - 1])],
            attributes=attributes,
            domain=_MS,
        )
        split_sizes = new_initializer(graph, f"{stem}.packed_split", np.asarray(widths, np.int64))
        parts = tape.op_multi_out("Split", [merged, split_sizes], attributes={"axis": -1}, num_outputs=len(nodes))
        tape.nodes[0].name, tape.nodes[1].name = f"{base}/packed/MatMulNBits", f"{base}/packed/Split"
        graph.insert_before(first, tape.nodes)
        for node, part in zip(nodes, parts):
            take_over(node.outputs[0], part)
        for node in nodes:
            graph.remove(node, safe=True)
        return [node.name for node in nodes]
