"""Store the weights that ``DequantizeLinear`` reads as the float values it computes: the CoreML form.

ONNX Runtime's CoreML execution provider has no ``DequantizeLinear`` op builder (neither of its
published support tables, ``coreml_supported_mlprogram_ops.md`` / ``…neuralnetwork_ops.md``,
lists it), so a QDQ weight leaves every ``DequantizeLinear`` on the CPU: on SmolLM2's static
step graph CoreML would take 90.4 % of the nodes, and the CPU would dequantize every weight on
every token to feed it. Core ML compresses weights itself, after conversion (coremltools'
palettization and blockwise linear quantization), not through ONNX operators. So for
``target.npu: coreml`` the weights are the plan's *quantized values* in float: the numbers the
QDQ graph multiplies by, computed once here, so the artifact computes what the fake-quant model
does and Core ML's own 4-bit compression can recover the grid exactly (every group's values are
``scale · (q − zero)``). This is a change of storage, not a relabelling of ops: the graph has no
``DequantizeLinear`` left, and nothing claims to be quantized that is not.

Rewrite rule: a ``DequantizeLinear`` whose inputs are all initializers (codes, scale, zero
point; per tensor, per axis or blocked, opset 21) becomes an initializer of its output values
stored as ``storage`` (default float16: half of float32's bytes, and what Core ML computes in
by default), followed by ``Cast`` to the ``DequantizeLinear``'s output type when the two differ.
float16 rounds each value to 11 significant bits (relative error ≤ 2⁻¹¹ per weight; the report's
verification measures its effect on the logits); ``storage=FLOAT`` keeps the values exact.
The new initializer is named after the codes (``<codes>_<storage>``), so the step and prefill
graphs of one plan name it alike and share it in one weights file.

The codes, scales and zero points left unused are dropped by the ``RemoveUnusedNodesPass`` that
follows (``aqexport.lowering.profile_passes``).

Postcondition (``ensures``): same function; no ``DequantizeLinear`` with constant inputs is left;
every graph output is still computed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, outputs_computed
from aqexport.passes._linear_sites import new_initializer
from aqexport.passes._result import StatsPassResult

__all__ = ["DequantizeConstantWeightsPass", "dequantize"]

logger = logging.getLogger(__name__)


def _along(parameter: np.ndarray, codes_shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A scale or zero point broadcast to the codes' shape: per tensor (scalar), per ``axis``
    (1-D), or blocked along ``axis`` (same rank as the codes, ``block_size`` codes per entry; a
    ragged last block allowed)."""
    if parameter.ndim == 0:
        return parameter
    if block_size:
        repeated = np.repeat(parameter, block_size, axis=axis)
        return np.take(repeated, np.arange(codes_shape[axis]), axis=axis)
    shape = [1] * len(codes_shape)
    shape[axis] = parameter.shape[0]
    return parameter.reshape(shape)


def dequantize(node: ir.Node) -> np.ndarray:
    """The float32 values of a ``DequantizeLinear`` with constant inputs, by ONNX's definition:
    ``(codes − zero_point) · scale`` with the scale and zero point taken per tensor, per axis or
    per block."""
    codes = node.inputs[0].const_value.numpy()
    scale = node.inputs[1].const_value.numpy().astype(np.float32)
    zero_value = node.inputs[2] if len(node.inputs) > 2 else None
    zero = zero_value.const_value.numpy() if zero_value is not None else np.zeros((), np.float32)
    axis = node.attributes.get_int("axis", 1) % max(codes.ndim, 1)
    block_size = node.attributes.get_int("block_size", 0)
    scale = _along(scale, codes.shape, axis, block_size)
    zero = _along(zero.astype(np.float32), codes.shape, axis, block_size)
    return (codes.astype(np.float32) - zero) * scale


def _constant_dequantizes(graph: ir.Graph) -> list[ir.Node]:
    return [
        node
        for node in graph
        if node.op_type == "DequantizeLinear"
        and node.domain == ""
        and all(value is None or value.const_value is not None for value in node.inputs)
    ]


class DequantizeConstantWeightsPass(ir.passes.InPlacePass):
    """``storage``: the float type the values are stored in (``FLOAT16`` or ``FLOAT``)."""

    def __init__(self, storage: ir.DataType = ir.DataType.FLOAT16) -> None:
        super().__init__()
        if storage not in (ir.DataType.FLOAT16, ir.DataType.FLOAT):
            raise ValueError(f"storage must be FLOAT16 or FLOAT, got {storage}")
        self.storage = storage

    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        replaced = 0
        for node in _constant_dequantizes(graph):
            output = node.outputs[0]
            output_type = output.dtype or node.inputs[1].dtype
            suffix = "float16" if self.storage == ir.DataType.FLOAT16 else "float"
            values = dequantize(node).astype(self.storage.numpy())
            stored = new_initializer(graph, f"{node.inputs[0].name}_{suffix}", values)
            if self.storage != output_type:
                cast = ir.node("Cast", [stored], {"to": output_type}, name=f"{node.name}_cast")
                graph.insert_before(node, cast)
                stored = cast.outputs[0]
            output.replace_all_uses_with(stored, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            replaced += 1
        logger.info("dequantize_constant_weights: %d as %s", replaced, self.storage.name)
        return StatsPassResult(
            model,
            modified=replaced > 0,
            stats={"replaced": replaced, "storage": self.storage.name},
            manifest={"quantization": {"weight_storage": f"dequantized, {self.storage.name.lower()}"}}
            if replaced
            else {},
        )

    def ensures(self, model: ir.Model) -> None:
        outputs_computed(model.graph, type(self).__name__)
        left = _constant_dequantizes(model.graph)
        if left:
            raise PostconditionFailed(
                f"{len(left)} DequantizeLinear with constant inputs left, e.g. '{left[0].name}'", BUG_FIX
            )
