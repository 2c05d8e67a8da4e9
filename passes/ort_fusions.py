"""Fuse the float parts of the graph into ONNX Runtime contrib ops (CPU / CUDA profiles).

The rules are onnxscript's (``onnxscript.rewriter.ort_fusions.optimize_for_ort``), not ours:
``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` for RMSNorm and its
residual add, ``RotaryEmbedding``, and scaled-dot-product attention as ``MultiHeadAttention``.
On SmolLM2 (fp32, 2 threads) that is 2244 → 1608 nodes, prefill +7–18 % and decode +10 %,
with logits within 3e-6 relative of the unfused graph (``benchmarks/execution.py`` has the
end-to-end figures). A rule only fires on a complete match, so graphs it does not recognise
(another attention form, the activation-quantization subgraphs) are left as they are.

Attention then goes further in ``GroupQueryAttentionPass`` (``passes/group_query_attention.py``),
which replaces ``MultiHeadAttention`` and the exported KV plumbing. onnxscript's own GQA rules
(``fuse_gqa``, ``fuse_qkv_gqa``) are switched off here, because their ``GroupQueryAttention``
breaks the artifact's contract: it drops the model's attention mask (causal only, so left padding
and Gemma 3's sliding window are lost) and moves the rotation into the kernel (``do_rotary``),
which ignores ``position_ids``. They match only some exports: with torch 2.11 / transformers 5.17
they fire on a tiny Llama, and that graph, run on an H100 with onnxruntime-gpu 1.31.1, agreed with
the CPU EP on 1 next token in 12 (it agrees on all with our pass's GQA).

Precondition (``requires``): default-domain opset ≥ 18 (onnxscript's rules are written for it).
Postcondition (``ensures``): every graph output is still computed, and every op domain in the
graph is imported (``com.microsoft`` once a rule fired), or ONNX Runtime would refuse the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import onnx_ir as ir
import onnxscript.rewriter.ort_fusions._core as onnxscript_fusions
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, PreconditionFailed, outputs_computed
from aqexport.passes._result import StatsPassResult

__all__ = ["OrtFusionsPass"]

logger = logging.getLogger(__name__)

MIN_OPSET = 18
#: onnxscript's fusions that ``optimize_for_ort`` must not run here (see the module docstring).
EXCLUDED_FUSIONS = ("fuse_gqa", "fuse_qkv_gqa")


@contextmanager
def _without_fusions(names: tuple[str, ...]) -> Iterator[None]:
    """Run ``optimize_for_ort`` with some of its fusion steps replaced by no-ops.

    ``optimize_for_ort`` has no switch for single rules and its sequence (pre-optimisation,
    fusions in order, ORT pattern rules, constant lifting) is worth keeping as onnxscript evolves
    it, so the excluded steps are swapped out of its module for the call instead of copying it.
    """
    saved = {name: getattr(onnxscript_fusions, name) for name in names if hasattr(onnxscript_fusions, name)}
    try:
        for name in saved:
            setattr(onnxscript_fusions, name, lambda model, debug=False, **kwargs: 0)
        yield
    finally:
        for name, function in saved.items():
            setattr(onnxscript_fusions, name, function)


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
        if any(node.op_type == "GroupQueryAttention" for node in model.graph):
            raise PostconditionFailed("onnxscript fused attention into GroupQueryAttention (mask dropped)", BUG_FIX)
        missing = {node.domain for node in model.graph} - {"ai.onnx"} - set(model.opset_imports)
        if missing:
            raise PostconditionFailed(f"ops of undeclared domains {sorted(missing)} in the graph", BUG_FIX)

    def call(self, model: ir.Model) -> StatsPassResult:
        with _without_fusions(EXCLUDED_FUSIONS):
            _, counts = optimize_for_ort(model)
        fusions = {name: count for name, count in counts.items() if count}
        logger.info("ort_fusions: %s", fusions)
        return StatsPassResult(
            model, modified=bool(fusions), stats=dict(fusions), manifest={"fusions": {"onnxscript": fusions}}
        )
