"""Convert a finished graph to float16 activations, weights and KV cache (``target.profile: cuda``).

The conversion is ONNX Runtime's own (``onnxruntime.transformers.float16``), the one its
transformer optimizer and the genai model builder rely on: every float tensor, initializer and
graph input/output becomes float16 (``past_key_values.*`` / ``present.*`` / ``logits`` too, so
the KV cache costs half), with ``Cast`` nodes around the ops ONNX Runtime has no float16 kernel
for (its default block list: ``Range``, ``CumSum``, ``Min``, ``Max``, …). Quantized weights stay
integer; ``MatMulNBits`` / ``GatherBlockQuantized`` scales become float16, which is the type
their CUDA kernels take.

It works on the serialized model rather than on ``onnx_ir`` objects, so this pass returns a new
model (a functional pass) and must be the last one that changes values.

Precondition: the lowering and fusion passes ran (not checkable from the graph: the pass list
puts it last). Postcondition (``ensures``): no float32 graph input or output remains, and every
float32 initializer left is read only by the blocked ops (``KEEP_FLOAT32``) or a ``Cast``.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from aqexport.passes._contract import BUG_FIX, PostconditionFailed
from aqexport.passes._result import StatsPassResult

__all__ = ["Float16Pass"]

#: Besides ORT's defaults: reductions of the per-token activation quantizer stay in float32,
#: where the plan's ranges were computed.
KEEP_FLOAT32 = [*DEFAULT_OP_BLOCK_LIST, "ReduceMax", "ReduceMin"]


def _float32_initializers(graph: ir.Graph) -> list[ir.Value]:
    return [value for value in graph.initializers.values() if value.dtype == ir.DataType.FLOAT]


class Float16Pass(ir.passes.FunctionalPass):
    def call(self, model: ir.Model) -> StatsPassResult:
        proto = ir.serde.serialize_model(model)
        converted = convert_float_to_float16(
            proto, keep_io_types=False, disable_shape_infer=True, op_block_list=KEEP_FLOAT32
        )
        result = ir.serde.deserialize_model(converted)
        stats = {
            "float16_initializers": sum(v.dtype == ir.DataType.FLOAT16 for v in result.graph.initializers.values()),
            "float32_initializers_kept": len(_float32_initializers(result.graph)),
        }
        return StatsPassResult(result, modified=True, stats=stats)

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        io = [v.name for v in [*graph.inputs, *graph.outputs] if v.dtype == ir.DataType.FLOAT]
        if io:
            raise PostconditionFailed(f"graph inputs/outputs still float32: {io[:5]}", BUG_FIX)
        allowed = {*KEEP_FLOAT32, "Cast"}
        for value in _float32_initializers(graph):
            readers = {node.op_type for node, _ in value.uses()}
            if not readers <= allowed:
                raise PostconditionFailed(f"float32 initializer '{value.name}' is read by {sorted(readers)}", BUG_FIX)
