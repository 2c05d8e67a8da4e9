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

from aqexport.calibrate.plan import LinearPlan, QuantPlan
from aqexport.passes import (
    ActivationQuantPass,
    FoldAffinePass,
    QuantizeEmbeddingPass,
    QuantizeWeightsPass,
    StableNamesPass,
)

__all__ = ["fp_passes", "quantized_passes", "run_passes"]

logger = logging.getLogger(__name__)


def fp_passes() -> list[ir.passes.PassBase]:
    """Passes for an unquantized artifact.

    Initializer deduplication is left out on purpose: the LM head was untied from the embedding
    so each can be quantized differently, and deduplication would tie them again.
    """
    return [
        StableNamesPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.TopologicalSortPass(),
    ]


def quantized_passes(
    plan: QuantPlan,
    lm_head: Mapping[str, LinearPlan] | None = None,
    embedding: Mapping[str, LinearPlan] | None = None,
    accuracy_level: int = 0,
    weight_format: str = "matmul_nbits",
) -> list[ir.passes.PassBase]:
    """Passes that lower a QuantPlan: names first (the plan is keyed by module path), then the
    input side of every transform, activation quantizers, and the weights last (the first two
    find linears by their float weights). ``lm_head`` / ``embedding``: the model's ends,
    quantized outside the plan (``aqexport.calibrate.edges``)."""
    return [
        StableNamesPass(),
        FoldAffinePass(plan),
        ActivationQuantPass(plan),
        QuantizeWeightsPass({**plan.linears(), **(lm_head or {})}, accuracy_level, weight_format),
        QuantizeEmbeddingPass(embedding or {}),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.TopologicalSortPass(),
    ]


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> list[dict[str, Any]]:
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
    return stats
