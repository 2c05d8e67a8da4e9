"""Run graph passes one by one and record what each did.

``onnx_ir.passes.PassManager`` runs a list of passes but reports only their combined result; a
compiler report wants, per pass, whether it changed the graph, the node counts before and after
and its time, so this loop calls each pass (with its pre/postcondition checks) itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from aqexport.calibrate.plan import LinearPlan, QuantPlan
from aqexport.passes import (
    ActivationQuantPass,
    FoldAffinePass,
    GroupQueryAttentionPass,
    OrtFusionsPass,
    PackMatMulNBitsPass,
    QuantizeEmbeddingPass,
    QuantizeWeightsPass,
    RemoveNoOpReshapesPass,
    StableNamesPass,
)
from aqexport.passes.float16 import Float16Pass
from aqexport.passes.mobile_ops import MobileOpsPass

__all__ = ["cleanup_passes", "fp_passes", "fusion_passes", "profile_passes", "quantized_passes", "run_passes"]

logger = logging.getLogger(__name__)

_NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear"})


def cleanup_passes() -> list[ir.passes.PassBase]:
    """Run last on every artifact: fold what is constant, drop what is unused, store equal
    initializers once, infer shapes, order the nodes.

    * Constant folding never touches ``QuantizeLinear`` / ``DequantizeLinear``: a weight's
      ``DequantizeLinear`` has only constant inputs, and folding it would store the float weight
      again.
    * Deduplication runs *after* quantization (run earlier, it would tie the untied LM head back
      to the embedding before either is quantized) and only on small initializers: it merges
      the many equal scalars the lowering passes create. The hashing variant that would also
      merge a float head with its float embedding fails on the exporter's non-contiguous
      tensors (onnx_ir 1.1: ``ndarray is not C-contiguous``).
    * Shape inference is not strict: contrib ops have no ONNX shape functions.
    * ``onnx.checker`` with ``full_check`` runs on the written file (``pipeline.write_stage``),
      where it can stream external data, or, when fusions follow, in ``fusion_passes``.
    """
    return [
        FoldConstantsPass(
            shape_inference=False,
            input_size_limit=8192,
            output_size_limit=8192,
            should_fold=lambda node: False if node.op_type in _NEVER_FOLD else None,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.ShapeInferencePass(strict_mode=False),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.TopologicalSortPass(),
    ]


def fusion_passes(max_positions: int | None = None) -> list[ir.passes.PassBase]:
    """ORT contrib-op fusions, after ``onnx.checker`` (full check) has seen the graph: fused
    graphs hold ``SimplifiedLayerNormalization``, which ONNX Runtime registers in the ONNX
    domain but the ONNX checker does not know. ONNX Runtime's own session creation (verify
    stage) checks the fused graph. onnxscript's rules first (norms, attention as
    ``MultiHeadAttention``), then ours: ``GroupQueryAttention`` with the KV cache and, given the
    context length ``max_positions`` for its tables, a fused ``RotaryEmbedding``; last, the
    ``MatMulNBits`` of q/k/v and of gate/up merged into one each."""
    return [
        common_passes.CheckerPass(full_check=True),
        OrtFusionsPass(),
        GroupQueryAttentionPass(max_positions),
        RemoveNoOpReshapesPass(),
        PackMatMulNBitsPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
    ]


def fp_passes(fuse: bool = True, max_positions: int | None = None) -> list[ir.passes.PassBase]:
    """Passes for an unquantized artifact: stable names, the common cleanup, fusions."""
    return [StableNamesPass(), *cleanup_passes(), *(fusion_passes(max_positions) if fuse else [])]


def quantized_passes(
    plan: QuantPlan,
    lm_head: Mapping[str, LinearPlan] | None = None,
    embedding: Mapping[str, LinearPlan] | None = None,
    accuracy_level: int | None = None,
    weight_format: str = "matmul_nbits",
    fuse: bool = True,
    max_positions: int | None = None,
) -> list[ir.passes.PassBase]:
    """Passes that lower a QuantPlan: names first (the plan is keyed by module path), then the
    input side of every transform, activation quantizers, and the weights last (the first two
    find linears by their float weights), then ORT fusions of the float remainder.
    ``lm_head`` / ``embedding``: the model's ends, quantized outside the plan
    (``aqexport.calibrate.edges``)."""
    return [
        StableNamesPass(),
        FoldAffinePass(plan),
        ActivationQuantPass(plan),
        QuantizeWeightsPass({**plan.linears(), **(lm_head or {})}, accuracy_level, weight_format),
        QuantizeEmbeddingPass(embedding or {}),
        *cleanup_passes(),
        *(fusion_passes(max_positions) if fuse else []),
    ]


def profile_passes(profile: str) -> list[ir.passes.PassBase]:
    """What a target profile adds at the very end: ``cuda`` converts to float16 (activations,
    weights' scales, KV cache); ``mobile`` rewrites the ops mobile EPs lack (on the static
    graph, whose shapes are all known after inference); ``cpu`` keeps float32."""
    if profile == "cuda":
        return [Float16Pass()]
    if profile == "mobile":
        return [
            common_passes.ShapeInferencePass(strict_mode=False),
            MobileOpsPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.TopologicalSortPass(),
        ]
    return []


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> tuple[ir.Model, list[dict[str, Any]]]:
    """The final model (functional passes return a new one) and per-pass statistics."""
    stats = []
    for graph_pass in passes:
        before = sum(1 for _ in model.graph.all_nodes())
        start = time.perf_counter()
        result = graph_pass(model)
        model = result.model
        stats.append(
            {
                "pass": type(graph_pass).__name__,
                "modified": bool(result.modified),
                "nodes_before": before,
                "nodes_after": sum(1 for _ in model.graph.all_nodes()),
                "seconds": round(time.perf_counter() - start, 4),
            }
        )
        logger.info("%s: %s", stats[-1]["pass"], stats[-1])
    return model, stats
