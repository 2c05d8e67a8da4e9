"""ONNX-IR graph passes, one per module, written the ``onnx_ir.passes`` way.

What a pass module provides (``passes/<name>.py``, helpers in ``_``-prefixed modules):

* a module docstring stating its rewrite rules, its precondition and its postcondition, and
  why the pass exists (what it buys, measured where it matters);
* one ``ir.passes.InPlacePass`` (or ``FunctionalPass``) whose constructor takes configuration
  only (a plan, an ``aqexport.target.Target``, a table size) and keeps no results: ``call``
  returns a ``StatsPassResult`` (``passes/_result.py``) with what it did to *this* model in
  ``stats`` and, where the artifact's manifest reports it, ``manifest`` section contributions,
  so a reused instance never reports an earlier model's work;
* ``requires`` / ``ensures`` that check the stated pre/postconditions cheaply (they run on every
  build) and raise ``PreconditionFailed`` / ``PostconditionFailed`` (``passes/_contract.py``:
  onnx_ir's contract errors that are also ``AqexportError``s with a cause and a fix);
* no torch: plan tensors are read with ``np.asarray`` / ``.numpy()``, transform algebra is
  ``aqexport.transform_algebra``;
* a test in ``tests/passes/`` on the smallest real graph, run on ONNX Runtime where it makes
  sense, that also checks the returned stats.

Adding a pass is its module, its test and one line in a pass list (``aqexport.lowering``):
``run_passes`` records its stats and merges its manifest sections without naming it.
"""

from aqexport.passes._result import StatsPassResult
from aqexport.passes.accuracy_level import AccuracyLevelPass
from aqexport.passes.activation_quant import ActivationQuantPass
from aqexport.passes.dequantize_constant_weights import DequantizeConstantWeightsPass
from aqexport.passes.float16 import Float16Pass
from aqexport.passes.float_weights import FloatWeightsPass
from aqexport.passes.fold_affine import FoldAffinePass
from aqexport.passes.group_query_attention import GroupQueryAttentionPass
from aqexport.passes.mobile_ops import MobileOpsPass
from aqexport.passes.ort_fusions import OrtFusionsPass
from aqexport.passes.pack_matmul_nbits import PackMatMulNBitsPass
from aqexport.passes.packed_qkv_attention import PackedQkvAttentionPass
from aqexport.passes.quantize_embedding import QuantizeEmbeddingPass
from aqexport.passes.quantize_weights import QuantizeWeightsPass
from aqexport.passes.remove_noop_reshapes import RemoveNoOpReshapesPass
from aqexport.passes.shared_kv_buffer import SharedKvBufferPass
from aqexport.passes.stable_names import StableNamesPass
from aqexport.passes.tied_embedding import TiedEmbeddingPass
from aqexport.passes.uint16_activations import Uint16ActivationsPass

__all__ = [
    "AccuracyLevelPass",
    "ActivationQuantPass",
    "DequantizeConstantWeightsPass",
    "Float16Pass",
    "FloatWeightsPass",
    "FoldAffinePass",
    "GroupQueryAttentionPass",
    "MobileOpsPass",
    "OrtFusionsPass",
    "PackMatMulNBitsPass",
    "PackedQkvAttentionPass",
    "QuantizeEmbeddingPass",
    "QuantizeWeightsPass",
    "RemoveNoOpReshapesPass",
    "SharedKvBufferPass",
    "StableNamesPass",
    "StatsPassResult",
    "TiedEmbeddingPass",
    "Uint16ActivationsPass",
]
