"""ONNX-IR passes, one per module, each an ``onnx_ir.passes`` pass with stated pre/postconditions."""

from aqexport.passes.activation_quant import ActivationQuantPass
from aqexport.passes.fold_affine import FoldAffinePass
from aqexport.passes.group_query_attention import GroupQueryAttentionPass
from aqexport.passes.ort_fusions import OrtFusionsPass
from aqexport.passes.pack_matmul_nbits import PackMatMulNBitsPass
from aqexport.passes.quantize_embedding import QuantizeEmbeddingPass
from aqexport.passes.quantize_weights import QuantizeWeightsPass
from aqexport.passes.remove_noop_reshapes import RemoveNoOpReshapesPass
from aqexport.passes.stable_names import StableNamesPass

__all__ = [
    "ActivationQuantPass",
    "FoldAffinePass",
    "GroupQueryAttentionPass",
    "OrtFusionsPass",
    "PackMatMulNBitsPass",
    "QuantizeEmbeddingPass",
    "QuantizeWeightsPass",
    "RemoveNoOpReshapesPass",
    "StableNamesPass",
]
