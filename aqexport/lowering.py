"""The pass lists of a build, and the loop that runs them and records what each did.

``onnx_ir.passes.PassManager`` runs a list of passes but reports only their combined result; a
compiler report wants, per pass, whether it changed the graph, the node counts before and after,
its time and its own statistics, so ``run_passes`` calls each pass (with its pre/postcondition
checks) itself. What passes contribute to the manifest (``StatsPassResult.manifest``) is merged
here by section, so the pipeline writes it without knowing which pass produced what: adding a
pass is its module, its test and one line in a list below.
"""

from __future__ import annotations

import logging
import time
from collections import ChainMap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

# onnxscript 0.7.2 exposes constant folding publicly only as functions (``fold_constants``,
# ``fold_constants_ir``), not as a pass; its own optimizer imports the pass class from here too.
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from aqexport import faults
from aqexport.errors import PassContractError
from aqexport.passes import (
    ActivationQuantPass,
    DequantizeConstantWeightsPass,
    Float16Pass,
    FoldAffinePass,
    GroupQueryAttentionPass,
    MobileOpsPass,
    OrtFusionsPass,
    PackedQkvAttentionPass,
    PackMatMulNBitsPass,
    QuantizeEmbeddingPass,
    QuantizeWeightsPass,
    RemoveNoOpReshapesPass,
    SharedKvBufferPass,
    StableNamesPass,
    StatsPassResult,
    TiedEmbeddingPass,
    Uint16ActivationsPass,
)
from aqexport.target import Target

if TYPE_CHECKING:
    from aqexport.calibrate.activation_ranges import ActivationRange
    from aqexport.calibrate.plan import LinearPlan, QuantPlan

__all__ = [
    "LoweringResult",
    "cleanup_passes",
    "fp_passes",
    "fusion_passes",
    "profile_passes",
    "quantized_passes",
    "run_passes",
]

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


def fusion_passes(target: Target, max_positions: int | None = None) -> list[ir.passes.PassBase]:
    """ORT contrib-op fusions, after ``onnx.checker`` (full check) has seen the graph: fused
    graphs hold ``SimplifiedLayerNormalization``, which ONNX Runtime registers in the ONNX
    domain but the ONNX checker does not know. ONNX Runtime's own session creation (verify
    stage) checks the fused graph. onnxscript's rules first (norms, attention as
    ``MultiHeadAttention``), then ours: ``GroupQueryAttention`` with the KV cache and, given the
    context length ``max_positions`` for its tables, a fused ``RotaryEmbedding``; the shared KV
    buffer contract unless ``target.kv_cache`` is ``growing``; last, the ``MatMulNBits`` of q/k/v
    and of gate/up merged into one each, and (cuda profile) the packed q/k/v fed to the attention
    as one tensor that it splits and rotates itself."""
    shared = [] if target.kv_cache == "growing" else [SharedKvBufferPass(required=target.kv_cache == "shared_buffer")]
    return [
        common_passes.CheckerPass(full_check=True),
        OrtFusionsPass(),
        GroupQueryAttentionPass(max_positions),
        *shared,
        RemoveNoOpReshapesPass(),
        PackMatMulNBitsPass(),
        common_passes.RemoveUnusedNodesPass(),  # PackedQkvAttentionPass wants each split output read once
        *(
            [PackedQkvAttentionPass(), common_passes.RemoveUnusedNodesPass()]
            if target.attention_takes_packed_qkv
            else []
        ),
        common_passes.TopologicalSortPass(),
    ]


def fp_passes(target: Target, max_positions: int | None = None) -> list[ir.passes.PassBase]:
    """Passes for an unquantized artifact: stable names, the common cleanup, fusions
    (``target.fuse``, off for the npu profile)."""
    return [StableNamesPass(), *cleanup_passes(), *(fusion_passes(target, max_positions) if target.fuse else [])]


def quantized_passes(
    plan: QuantPlan,
    lm_head: Mapping[str, LinearPlan] | None,
    embedding: Mapping[str, LinearPlan] | None,
    target: Target,
    max_positions: int | None = None,
    tied_embedding: Mapping[str, str] | None = None,
) -> list[ir.passes.PassBase]:
    """Passes that lower a QuantPlan: names first (the plan is keyed by module path), then the
    input side of every transform, activation quantizers, and the weights last (the first two
    find linears by their float weights; format and accuracy level from ``target``), then ORT
    fusions of the float remainder. ``lm_head`` / ``embedding``: the model's ends, quantized
    outside the plan (``aqexport.calibrate.edges``); ``tied_embedding``: embeddings that read a
    head's table instead (``{embedding path: head path}``)."""
    return [
        StableNamesPass(),
        FoldAffinePass(plan),
        ActivationQuantPass(plan),
        QuantizeWeightsPass(ChainMap(dict(lm_head or {}), plan.linears()), target),
        QuantizeEmbeddingPass(embedding or {}),
        TiedEmbeddingPass(tied_embedding or {}),
        *cleanup_passes(),
        *(fusion_passes(target, max_positions) if target.fuse else []),
    ]


def profile_passes(
    target: Target, activation_ranges: Mapping[str, ActivationRange] | None = None
) -> list[ir.passes.PassBase]:
    """What a target profile adds at the very end: ``cuda`` converts to float16 (activations,
    weights' scales, KV cache); ``npu`` rewrites the ops mobile NPU EPs lack (on the static
    graph, whose shapes are all known after inference), and for CoreML first stores the QDQ
    weights as the float16 values they dequantize to (``DequantizeConstantWeightsPass``: its
    EP has no ``DequantizeLinear``), for QNN puts uint16 QDQ around each QDQ linear
    (``Uint16ActivationsPass``, given the calibrated ``activation_ranges``); ``cpu`` and ``mobile`` keep float32
    (the mobile profile differs from cpu in its sizes and accuracy level, not in passes)."""
    if target.profile == "cuda":
        return [Float16Pass()]
    if target.profile == "npu":
        return [
            *([DequantizeConstantWeightsPass()] if target.dequantized_weights else []),
            *([Uint16ActivationsPass(activation_ranges)] if target.uint16_activations and activation_ranges else []),
            common_passes.ShapeInferencePass(strict_mode=False),
            MobileOpsPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.TopologicalSortPass(),
        ]
    return []


@dataclass
class LoweringResult:
    """``model``: the final model (functional passes return a new one). ``records``: per pass, in
    order, ``pass`` / ``modified`` / ``nodes_before`` / ``nodes_after`` / ``seconds``, and
    ``stats`` where the pass returned any. ``sections``: the passes' manifest contributions by
    section (``{"fusions": {...}, "quantization": {...}}``), for ``manifest.json`` as they are; a
    key given by two passes keeps the later pass's value."""

    model: ir.Model
    records: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)


def _contract_error(graph_pass: ir.passes.PassBase, error: ir.passes.InvariantError) -> PassContractError:
    """One user-facing error for a failed pre/postcondition, naming the pass. Our passes raise
    ``PassContractError``s with a cause and a fix; onnx_ir's passes (and onnx_ir's wrapping of
    another exception raised in ``requires`` / ``ensures``) give a message and maybe a cause."""
    name = type(graph_pass).__name__
    kind = "precondition" if isinstance(error, ir.passes.PreconditionError) else "postcondition"
    if isinstance(error, PassContractError):
        return PassContractError(f"{name}: {error.cause}", error.fix, name)
    detail = f"{error}" + (f": {error.__cause__}" if error.__cause__ is not None else "")
    fix = (
        "the passes before it did not leave the graph it needs: lower a plan made for this model, or report "
        "this with the config"
        if kind == "precondition"
        else "this is a bug in the pass: report it with the model and config"
    )
    return PassContractError(f"{name}: {kind} failed: {detail}", fix, name)


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> LoweringResult:
    """Run ``passes`` in order on ``model``; a failed pre/postcondition raises
    ``PassContractError`` naming the pass."""
    lowering = LoweringResult(model)
    for graph_pass in passes:
        before = sum(1 for _ in lowering.model.graph.all_nodes())
        start = time.perf_counter()
        try:
            result = graph_pass(lowering.model)
        except (ir.passes.PreconditionError, ir.passes.PostconditionError) as error:
            raise _contract_error(graph_pass, error) from error
        lowering.model = result.model
        record: dict[str, Any] = {
            "pass": type(graph_pass).__name__,
            "modified": bool(result.modified),
            "nodes_before": before,
            "nodes_after": sum(1 for _ in lowering.model.graph.all_nodes()),
            "seconds": round(time.perf_counter() - start, 4),
        }
        if isinstance(result, StatsPassResult):
            if result.stats:
                record["stats"] = result.stats
            for section, contribution in result.manifest.items():
                lowering.sections.setdefault(section, {}).update(contribution)
        lowering.records.append(record)
        logger.info("%s: %s", record["pass"], record)
        faults.point("lower.pass")  # a test hook, off unless AQEXPORT_FAULT names it
    return lowering
