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

Precondition: the lowering and fusion passes ran. Postcondition: no float32 graph input, output
or initializer remains outside the blocked ops' ``Cast`` islands.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

__all__ = ["Float16Pass"]

#: Besides ORT's defaults: reductions of the per-token activation quantizer stay in float32,
#: where the plan's ranges were computed.
KEEP_FLOAT32 = [*DEFAULT_OP_BLOCK_LIST, "ReduceMax", "ReduceMin"]


class Float16Pass(ir.passes.FunctionalPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        proto = ir.serde.serialize_model(model)
        converted = convert_float_to_float16(
            proto, keep_io_types=False, disable_shape_infer=True, op_block_list=KEEP_FLOAT32
        )
        return ir.passes.PassResult(ir.serde.deserialize_model(converted), modified=True)
