"""Give planned linears new *float* weights and biases: the "folded fp" rung of the parity ladder.

After ``FoldAffinePass`` the input of a norm group is ``(x − δ) A⁻¹``; with the transformed but
unquantized weights ``W' = W Aᵀ`` (and the out / q·k transforms, and the biases they move) the
graph must compute exactly what the float model does. Running that graph isolates folding
errors from quantization errors, which is what the ladder is for. This pass is never part of
an artifact's lowering.

Rewrite rules, per linear (weight found by its stable name):

1. ``MatMul(x, W)``: ``W`` becomes a new initializer ``W'ᵀ`` (ONNX layout ``[in, out]``);
   ``Gemm`` takes ``W'`` in the layout its ``transB`` says.
2. A changed bias replaces the graph's bias input (a new initializer: biases may be shared);
   a linear without one gets an ``Add``.

Precondition (``requires``): ``StableNamesPass`` ran: every given linear is a ``MatMul``/``Gemm``
on its module-path weight. Postcondition (``ensures``): no ``MatMul``/``Gemm`` reads a given
linear's original weight any more (each multiplies by ``W'``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import PreconditionFailed, float_weights_replaced
from aqexport.passes._linear_sites import find_linear, new_initializer
from aqexport.passes._result import StatsPassResult

__all__ = ["FloatWeightsPass"]


class FloatWeightsPass(ir.passes.InPlacePass):
    """``weights`` / ``biases``: the transformed float tensors by module path, anything
    ``np.asarray`` reads (the plan side holds CPU torch tensors), stored as float32. A weight may
    also be a function of no arguments that returns one: its initializer is then an
    ``ir.LazyTensor`` called when the graph is written, so the caller computes the weights in the
    order the writer reads them and never holds them all (``fold.FoldedWeights``)."""

    def __init__(self, weights: Mapping[str, Any], biases: Mapping[str, Any]) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.biases = dict(biases)

    def requires(self, model: ir.Model) -> None:
        for path in self.weights:
            if find_linear(model.graph, f"{path}.weight") is None:
                raise PreconditionFailed(f"no MatMul/Gemm on '{path}.weight' in the graph", "run StableNamesPass first")

    def ensures(self, model: ir.Model) -> None:
        float_weights_replaced(model.graph, self.weights)

    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        biases = 0
        for path, weight in self.weights.items():
            site = find_linear(graph, f"{path}.weight")
            transposed = site.node.op_type == "MatMul" or not _transb(site.node)
            if callable(weight):  # W' has W's shape, and the graph's layout of it is the original's
                read = _layout(weight, transposed)
                array = ir.LazyTensor(read, dtype=ir.DataType.FLOAT, shape=site.node.inputs[1].const_value.shape)
            else:
                array = _float32(weight, transposed)
            folded = new_initializer(graph, f"{path}.weight_folded", array)
            site.node.replace_input_with(1, folded)
            if path in self.biases:
                bias = new_initializer(graph, f"{path}.bias_folded", np.asarray(self.biases[path], dtype=np.float32))
                if site.bias_node is not None:
                    site.bias_node.replace_input_with(site.bias_index, bias)
                else:
                    _add_after(graph, site.node, bias)
                biases += 1
        stats = {"linears": len(self.weights), "biases": biases}
        return StatsPassResult(model, modified=bool(self.weights), stats=stats)


def _float32(weight: Any, transposed: bool) -> np.ndarray:
    array = np.asarray(weight, dtype=np.float32)
    return array.T if transposed else array


def _layout(weight: Callable[[], Any], transposed: bool) -> Callable[[], ir.TensorProtocol]:
    def read() -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(_float32(weight(), transposed)))

    return read


def _transb(node: ir.Node) -> bool:
    attribute = node.attributes.get("transB")
    return bool(attribute is not None and attribute.value)


def _add_after(graph: ir.Graph, node: ir.Node, bias: ir.Value) -> None:
    output = node.outputs[0]
    uses = list(output.uses())
    add = ir.node("Add", [output, bias], name=f"{node.name}/bias_folded")
    graph.insert_after(node, [add])
    for consumer, index in uses:
        consumer.replace_input_with(index, add.outputs[0])
    if output in graph.outputs:
        name, output.name = output.name, None
        add.outputs[0].name = name
        add.outputs[0].type, add.outputs[0].shape = output.type, output.shape
        graph.outputs[graph.outputs.index(output)] = add.outputs[0]
