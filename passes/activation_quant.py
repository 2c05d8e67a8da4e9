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
3. **LLM.int8 outlier split** (``aqexport.calibrate.outliers``): a boolean channel mask ``m``,
   a constant for a static split, ``ReduceMax(|x|) ≥ τ`` over every token of the call for a
   dynamic one; then ``x̂ = Where(m, x, Q(Where(m, 0, x)))`` with ``Q`` the per-token subgraph of
   rule 1 (symmetric int8). A static split's float columns are added by ``QuantizeWeightsPass``.
4. Linears sharing one input (q, k, v) and one quantizer configuration share one quantizer.

Precondition (``requires``): runs after ``FoldAffinePass`` (the input is already
``(x − δ) A⁻¹``) and before ``QuantizeWeightsPass``: every linear whose plan quantizes its input
is found by its float weight's module-path name. Postcondition (``ensures``): each of those
linears reads the output of an inserted quantizer (``…/ActivationQuant/…``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from aqexport.calibrate.quantizer import DELTA_FLOOR
from aqexport.passes._contract import BUG_FIX, PostconditionFailed, PreconditionFailed
from aqexport.passes._linear_sites import find_linear, new_initializer
from aqexport.passes._result import StatsPassResult

if TYPE_CHECKING:
    from aqexport.calibrate.plan import LinearPlan, QuantPlan

__all__ = ["ActivationQuantPass"]

logger = logging.getLogger(__name__)


def _scalar(graph: ir.Graph, name: str, value: float, dtype=np.float32) -> ir.Value:
    return new_initializer(graph, name, np.asarray(value, dtype=dtype))


def _op_builder(base: str, nodes: list[ir.Node]):
    """``op(type, *inputs, **attributes) -> output``: appends a node named ``<base>/<type>_<n>``
    to ``nodes``, which the caller inserts as one subgraph."""

    def op(op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        nodes.append(ir.node(op_type, list(inputs), attributes, name=f"{base}/{op_type}_{len(nodes)}"))
        return nodes[-1].outputs[0]

    return op


class ActivationQuantPass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan) -> None:
        super().__init__()
        self.plan = plan

    def _quantized(self) -> list[str]:
        """Paths of the linears whose input is quantized. Paths, not entries: a plan is read
        block by block (``QuantPlan.linears``), and a dict of its entries would hold every
        block's weights at once (``call`` walks the plan again and lowers each as it is read)."""
        return [path for path, entry in self.plan.linears().items() if entry.activation is not None]

    def requires(self, model: ir.Model) -> None:
        for path in self._quantized():
            if find_linear(model.graph, f"{path}.weight") is None:
                raise PreconditionFailed(
                    f"the planned linear '{path}' is not a MatMul/Gemm on '{path}.weight' in the graph",
                    "run StableNamesPass first and ActivationQuantPass before QuantizeWeightsPass",
                )

    def ensures(self, model: ir.Model) -> None:
        for path in self._quantized():
            site = find_linear(model.graph, f"{path}.weight")
            producer = site.input.producer() if site is not None else None
            if producer is None or "/ActivationQuant/" not in (producer.name or ""):
                raise PostconditionFailed(f"the input of '{path}' is not quantized", BUG_FIX)

    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        done: dict[tuple, ir.Value] = {}
        linears = 0
        for path, entry in self.plan.linears().items():  # block by block, none kept
            if entry.activation is None:
                continue
            linears += 1
            site = find_linear(graph, f"{path}.weight")
            key = (id(site.input), *_quantizer_key(entry))
            if key not in done:
                done[key] = self._quantizer(graph, site.node, site.input, entry, path)
            site.node.replace_input_with(0, done[key])
        logger.info("activation_quant: %d quantizers", len(done))
        stats = {"quantizers": len(done), "linears": linears}
        return StatsPassResult(model, modified=bool(done), stats=stats)

    def _quantizer(self, graph: ir.Graph, before: ir.Node, x: ir.Value, entry: LinearPlan, path: str) -> ir.Value:
        base = before.name.rsplit("/", 1)[0] + "/ActivationQuant"
        scheme = entry.activation
        if entry.outlier is not None:
            return self._outlier_split(graph, before, x, entry, path, base + "/OutlierSplit")
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

    def _outlier_split(self, graph, before, x, entry: LinearPlan, path: str, base: str) -> ir.Value:
        split, width = entry.outlier, entry.codes.shape[1]
        zero = _scalar(graph, f"{path}.input_outlier_zero", 0.0)
        nodes: list[ir.Node] = []
        op = _op_builder(base, nodes)

        if split.mode == "static":
            mask_array = np.zeros(width, dtype=np.bool_)
            mask_array[split.channels.numpy()] = True
            mask = new_initializer(graph, f"{path}.input_outlier_mask", mask_array)
        else:
            rows = new_initializer(graph, f"{path}.input_rows", np.asarray([-1, width], dtype=np.int64))
            axes = new_initializer(graph, f"{path}.input_token_axis", np.asarray([0], dtype=np.int64))
            peak = op("ReduceMax", op("Abs", op("Reshape", x, rows)), axes, keepdims=0)
            mask = op("GreaterOrEqual", peak, _scalar(graph, f"{path}.input_outlier_threshold", split.threshold))
        inliers = op("Where", mask, zero, x)
        graph.insert_before(before, nodes)
        quantized = self._float_subgraph(graph, before, inliers, entry, path, base)
        passthrough = ir.node("Where", [mask, x, quantized], name=f"{base}/Where_outliers")
        graph.insert_before(before, [passthrough])
        return passthrough.outputs[0]

    @staticmethod
    def _float_subgraph(graph, before, x, entry: LinearPlan, path: str, base: str) -> ir.Value:
        scheme = entry.activation
        qmin, qmax = float(scheme.qmin), float(scheme.qmax)
        low_c, high_c = _scalar(graph, f"{path}.input_qmin", qmin), _scalar(graph, f"{path}.input_qmax", qmax)
        nodes: list[ir.Node] = []
        op = _op_builder(base, nodes)

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


def _quantizer_key(entry: LinearPlan) -> tuple:
    """What makes two linears' input quantizers the same computation."""
    static = None if entry.act_scale is None else (float(entry.act_scale), float(entry.act_zero))
    split = entry.outlier
    outliers = None
    if split is not None:
        outliers = (split.mode, split.threshold, None if split.channels is None else tuple(split.channels.tolist()))
    return entry.activation, static, outliers
