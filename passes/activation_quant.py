"""Quantize each planned linear's input the way calibration did, so ORT computes the plan.

Rewrite rules, per linear whose plan entry quantizes activations:

1. **Dynamic per token** (the default): an explicit float subgraph over the last axis,
   ``Δ = max((max − min)/qmax, 1e-5)``, ``z = clip(round(−min/Δ), 0, qmax)``,
   ``x̂ = (clip(round(x/Δ) + z, 0, qmax) − z)·Δ``, op for op the PyTorch fake quantizer
   (``aqexport.calibrate.quantizer``; ONNX ``Round`` and ``torch.round`` both round half to even).
   No ONNX Runtime kernel quantizes activations per token asymmetrically, so this is simulation:
   the report says so. ``MatMulNBits`` with ``accuracy_level=4`` is faster but quantizes
   per block, symmetrically, which is not what the plan was calibrated for.
2. **Static per tensor**, 8- or 4-bit: ``QuantizeLinear → DequantizeLinear`` with the plan's
   calibrated scale and zero point (``uint8`` / ``uint4``): the QDQ form NPU and mobile EPs fuse
   into integer kernels. Other widths use the float subgraph of rule 1 with the constants.
3. Linears sharing one input (q, k, v) share one quantizer.

Precondition: runs after ``FoldAffinePass`` (the input is already ``(x − δ) A⁻¹``) and before
``QuantizeWeightsPass`` (linears are found by their float weights).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from aqexport.calibrate.plan import LinearPlan, QuantPlan
from aqexport.calibrate.quantizer import DELTA_FLOOR
from aqexport.passes._linear_sites import find_linear, new_initializer

__all__ = ["ActivationQuantPass"]

logger = logging.getLogger(__name__)


def _scalar(graph: ir.Graph, name: str, value: float, dtype=np.float32) -> ir.Value:
    return new_initializer(graph, name, np.asarray(value, dtype=dtype))


class ActivationQuantPass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan) -> None:
        super().__init__()
        self.plan = plan
        self.inserted = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        done: dict[int, ir.Value] = {}
        for index, block in sorted(self.plan.blocks.items()):
            for name, entry in block.linears.items():
                if entry.activation is None:
                    continue
                path = f"{self.plan.blocks_path}.{index}.{name}"
                site = find_linear(graph, f"{path}.weight")
                if id(site.input) not in done:
                    done[id(site.input)] = self._quantizer(graph, site.node, site.input, entry, path)
                site.node.replace_input_with(0, done[id(site.input)])
        logger.info("activation_quant: %d quantizers", self.inserted)
        return ir.passes.PassResult(model, modified=self.inserted > 0)

    def _quantizer(self, graph: ir.Graph, before: ir.Node, x: ir.Value, entry: LinearPlan, path: str) -> ir.Value:
        base = before.name.rsplit("/", 1)[0] + "/ActivationQuant"
        scheme = entry.activation
        self.inserted += 1
        if entry.act_scale is not None and scheme.bits in (4, 8) and not scheme.symmetric:
            kind = ir.DataType.UINT8 if scheme.bits == 8 else ir.DataType.UINT4
            scale = _scalar(graph, f"{path}.input_scale", float(entry.act_scale))
            if kind == ir.DataType.UINT8:
                zero = new_initializer(graph, f"{path}.input_zero_point", np.asarray(int(entry.act_zero), np.uint8))
            else:
                zero = new_initializer(
                    graph, f"{path}.input_zero_point", np.asarray(int(entry.act_zero), np.uint8), ir.DataType.UINT4
                )
            quantize = ir.node("QuantizeLinear", [x, scale, zero], name=f"{base}/QuantizeLinear")
            dequantize = ir.node(
                "DequantizeLinear", [quantize.outputs[0], scale, zero], name=f"{base}/DequantizeLinear"
            )
            graph.insert_before(before, [quantize, dequantize])
            return dequantize.outputs[0]
        return self._float_subgraph(graph, before, x, entry, path, base)

    @staticmethod
    def _float_subgraph(graph, before, x, entry: LinearPlan, path: str, base: str) -> ir.Value:
        scheme = entry.activation
        qmin, qmax = float(scheme.qmin), float(scheme.qmax)
        low_c, high_c = _scalar(graph, f"{path}.input_qmin", qmin), _scalar(graph, f"{path}.input_qmax", qmax)
        nodes: list[ir.Node] = []

        def op(op_type, *inputs, **attributes):
            nodes.append(ir.node(op_type, list(inputs), attributes, name=f"{base}/{op_type}_{len(nodes)}"))
            return nodes[-1].outputs[0]

        if entry.act_scale is not None:
            scale = _scalar(graph, f"{path}.input_scale", float(entry.act_scale))
            zero = _scalar(graph, f"{path}.input_zero_point", float(entry.act_zero))
        else:
            axes = new_initializer(graph, f"{path}.input_axes", np.asarray([-1], dtype=np.int64))
            high = op("ReduceMax", x, axes, keepdims=1)
            low = op("ReduceMin", x, axes, keepdims=1)
            floor = _scalar(graph, f"{path}.input_scale_floor", DELTA_FLOOR)
            if scheme.symmetric:
                scale = op("Max", op("Div", op("Max", op("Abs", high), op("Abs", low)), high_c), floor)
                zero = _scalar(graph, f"{path}.input_zero_point", 0.0)
            else:
                scale = op("Max", op("Div", op("Sub", high, low), high_c), floor)
                zero = op("Clip", op("Round", op("Div", op("Neg", low), scale)), low_c, high_c)
        codes = op("Clip", op("Add", op("Round", op("Div", x, scale)), zero), low_c, high_c)
        out = op("Mul", op("Sub", codes, zero), scale)
        graph.insert_before(before, nodes)
        return out
