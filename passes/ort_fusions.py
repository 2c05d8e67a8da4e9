"""Fuse the float parts of the graph into ONNX Runtime contrib ops (CPU / CUDA profiles).

The rules are onnxscript's (``onnxscript.rewriter.ort_fusions.optimize_for_ort``), not ours:
``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` for RMSNorm and its
residual add, ``RotaryEmbedding``, and scaled-dot-product attention as ``MultiHeadAttention``.
On SmolLM2 (fp32, 2 threads) that is 2244 → 1608 nodes, prefill +7–18 % and decode +10 %,
with logits within 3e-6 relative of the unfused graph (``benchmarks/execution.py`` has the
end-to-end figures). A rule only fires on a complete match, so graphs it does not recognise
(another attention form, the activation-quantization subgraphs) are left as they are.

Attention then goes further in ``GroupQueryAttentionPass`` (``passes/group_query_attention.py``),
which replaces ``MultiHeadAttention`` and the exported KV plumbing; onnxscript's own GQA rule does
not match our exports (it expects a causal-mask subgraph of an older ``transformers``).

Precondition (``requires``): default-domain opset ≥ 18 (onnxscript's rules are written for it).
Postcondition (``ensures``): every graph output is still computed, and every op domain in the
graph is imported (``com.microsoft`` once a rule fired), or ONNX Runtime would refuse the model.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, PreconditionFailed, outputs_computed
from aqexport.passes._result import StatsPassResult

__all__ = ["OrtFusionsPass"]

logger = logging.getLogger(__name__)

MIN_OPSET = 18


class OrtFusionsPass(ir.passes.InPlacePass):
    def requires(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 0)
        if opset < MIN_OPSET:
            raise PreconditionFailed(
                f"ORT fusions need opset ≥ {MIN_OPSET}; the graph is opset {opset}",
                f"export with target.opset ≥ {MIN_OPSET}, or set target.fuse: false",
            )

    def ensures(self, model: ir.Model) -> None:
        outputs_computed(model.graph, type(self).__name__)
        missing = {node.domain for node in model.graph} - {"ai.onnx"} - set(model.opset_imports)
        if missing:
            raise PostconditionFailed(f"ops of undeclared domains {sorted(missing)} in the graph", BUG_FIX)

    def call(self, model: ir.Model) -> StatsPassResult:
        _, counts = optimize_for_ort(model)
        fusions = {name: count for name, count in counts.items() if count}
        logger.info("ort_fusions: %s", fusions)
        return StatsPassResult(
            model, modified=bool(fusions), stats=dict(fusions), manifest={"fusions": {"onnxscript": fusions}}
        )
