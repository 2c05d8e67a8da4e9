"""Quantize each QDQ linear's input and output to 16 bits: the form QNN's NPU runs in integers.

A QDQ weight with float activations is not a QDQ unit, so QNN's HTP backend leaves the weight's
``DequantizeLinear`` on the CPU (the phone would dequantize every weight on every token). Around
each linear whose weight is a ``DequantizeLinear`` of constants, this pass puts the
``QuantizeLinear → DequantizeLinear`` pair QNN needs on the ``MatMul``'s input and on its output
(uint16, per tensor, asymmetric): w4a16 in Qualcomm's terms. What lies between the linears
(norms, rotary, attention's softmax) stays float, which HTP runs in float16.

Rewrite rules, per ``MatMul(x, DequantizeLinear(<path>.weight_Q…))`` whose ``path`` has a range
(``aqexport.calibrate.activation_ranges``):

1. ``x`` → ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)`` with ``s = (hi − lo) / 65535`` and
   ``z = round(−lo / s)`` from the input range; linears reading the same ``x`` with the same range
   (q/k/v, gate/up) share one pair.
2. The ``MatMul``'s output ``y`` is read through its own pair from the output range (before any
   bias ``Add``: the range is of ``x Wᵀ``); a graph output keeps its name on the pair's output.

The rounding is at most half a step per value (range / 131070); verification measures what it
does to the logits.

Precondition (``requires``): every range names a linear whose weight is such a
``DequantizeLinear`` (``QuantizeWeightsPass`` ran with a QDQ format). Postcondition
(``ensures``): every such ``MatMul`` reads a ``DequantizeLinear`` of a uint16 ``QuantizeLinear``
and is read only through one; every graph output is still computed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, PreconditionFailed, outputs_computed
from aqexport.passes._linear_sites import new_initializer
from aqexport.passes._result import StatsPassResult

if TYPE_CHECKING:
    from aqexport.calibrate.activation_ranges import ActivationRange

__all__ = ["Uint16ActivationsPass", "uint16_parameters"]

logger = logging.getLogger(__name__)

_CODES = re.compile(r"^(?P<path>.+)\.weight_Q\d+$")
_LEVELS = 65535


def uint16_parameters(lo: float, hi: float) -> tuple[np.float32, np.uint16]:
    """Scale and zero point of an asymmetric uint16 grid over ``[lo, hi]`` (``lo ≤ 0 ≤ hi``)."""
    scale = np.float32(max(hi - lo, 1e-8) / _LEVELS)
    zero = np.uint16(np.clip(np.round(-lo / scale), 0, _LEVELS))
    return scale, zero


def _sites(graph: ir.Graph) -> Iterator[tuple[str, ir.Node]]:
    """``(path, MatMul)`` for each MatMul whose weight is a DequantizeLinear of ``<path>.weight_Q…``."""
    for node in graph:
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        weight = node.inputs[1].producer()
        if weight is None or weight.op_type != "DequantizeLinear" or weight.inputs[0].const_value is None:
            continue
        match = _CODES.match(weight.inputs[0].name or "")
        if match:
            yield match["path"], node


class Uint16ActivationsPass(ir.passes.InPlacePass):
    """``ranges``: observed input/output ranges by linear path (``ActivationRange``)."""

    def __init__(self, ranges: Mapping[str, ActivationRange]) -> None:
        super().__init__()
        self.ranges = dict(ranges)

    def requires(self, model: ir.Model) -> None:
        found = {path for path, _ in _sites(model.graph)}
        missing = sorted(set(self.ranges) - found)
        if missing:
            raise PreconditionFailed(
                f"no MatMul on a DequantizeLinear weight for the ranged linear '{missing[0]}'",
                "run QuantizeWeightsPass with a QDQ weight format (the npu profile's) first",
            )

    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        inputs: dict[tuple, ir.Value] = {}
        outputs = 0
        sites = [(path, node) for path, node in _sites(graph) if path in self.ranges]
        for path, node in sites:
            span = self.ranges[path]
            x = node.inputs[0]
            key = (id(x), span.input_lo, span.input_hi)
            if key not in inputs:
                inputs[key] = self._input_pair(graph, node, x, span.input_lo, span.input_hi, f"{path}.input")
            node.replace_input_with(0, inputs[key])
            self._quantize_output(graph, node, span.output_lo, span.output_hi, f"{path}.output")
            outputs += 1
        logger.info("uint16_activations: %d linears, %d input pairs", outputs, len(inputs))
        return StatsPassResult(
            model,
            modified=outputs > 0,
            stats={"linears": outputs, "input_pairs": len(inputs)},
            manifest={
                "quantization": {
                    "activations": "uint16 per-tensor QDQ on each quantized linear's input and output "
                    "(QNN HTP's w4a16; ranges observed on calibration windows)"
                }
            }
            if outputs
            else {},
        )

    @staticmethod
    def _pair(graph: ir.Graph, x: ir.Value, lo: float, hi: float, name: str) -> list[ir.Node]:
        scale, zero = uint16_parameters(lo, hi)
        scale_value = new_initializer(graph, f"{name}_scale", np.asarray(scale, np.float32))
        zero_value = new_initializer(graph, f"{name}_zero_point", np.asarray(zero, np.uint16))
        quantize = ir.node("QuantizeLinear", [x, scale_value, zero_value], name=f"{name}/QuantizeLinear")
        dequantize = ir.node(
            "DequantizeLinear", [quantize.outputs[0], scale_value, zero_value], name=f"{name}/DequantizeLinear"
        )
        return [quantize, dequantize]

    def _input_pair(self, graph: ir.Graph, node: ir.Node, x: ir.Value, lo: float, hi: float, name: str) -> ir.Value:
        pair = self._pair(graph, x, lo, hi, name)
        graph.insert_before(node, pair)
        return pair[-1].outputs[0]

    def _quantize_output(self, graph: ir.Graph, node: ir.Node, lo: float, hi: float, name: str) -> None:
        y = node.outputs[0]
        uses = list(y.uses())
        output_index = next((i for i, value in enumerate(graph.outputs) if value is y), None)
        pair = self._pair(graph, y, lo, hi, name)
        graph.insert_after(node, pair)
        read = pair[-1].outputs[0]
        for user, index in uses:
            user.replace_input_with(index, read)
        if output_index is not None:  # the pair's output becomes the graph output, under its name
            graph_name, y.name = y.name, f"{y.name}_float"
            read.name, read.type, read.shape = graph_name, y.type, y.shape
            graph.outputs[output_index] = read

    def ensures(self, model: ir.Model) -> None:
        outputs_computed(model.graph, type(self).__name__)
        for path, node in _sites(model.graph):
            if path not in self.ranges:
                continue
            source = node.inputs[0].producer()
            quantize = (
                source.inputs[0].producer() if source is not None and source.op_type == "DequantizeLinear" else None
            )
            readers = [use.node.op_type for use in node.outputs[0].uses()]
            if quantize is None or quantize.op_type != "QuantizeLinear" or readers != ["QuantizeLinear"]:
                raise PostconditionFailed(f"the linear '{path}' is not a uint16 QDQ unit", BUG_FIX)
