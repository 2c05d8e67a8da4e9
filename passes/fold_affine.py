"""Put each planned norm-group transform ``x ↦ (x − δ) A⁻¹`` into the graph, folded where exact.

The quantized weights of the group's linears are ``Q(W Aᵀ)`` (the plan's codes), so their common
input must become ``(x − δ) A⁻¹``. Out and q·k transforms are already inside the codes and the
planned biases (``QuantizeWeightsPass``); only the input side is left to this pass.

Rewrite rules, per (block, norm) transform in the plan:

1. **Diagonal ``A = diag(s)`` into a LayerNormalization** that feeds only the group:
   ``scale ← scale / s``, ``bias ← (bias − δ) / s``.
2. **Diagonal ``A`` into an RMSNorm's final ``Mul`` by a constant** (``x̂ · w``, or ``x̂ · (1 + w)``
   already folded by the exporter on Gemma) that feeds only the group, when there is no shift:
   ``w ← w / s``. Whatever the norm's formula, the constant is what multiplies the output.
3. **Anything else** (a dense ``A``, a norm output shared with other consumers, a norm this pass
   does not recognise): explicit nodes ``Sub(x, δ)`` / ``Mul(x, 1/s)`` / ``MatMul(x, A⁻¹)`` named
   ``/<norm scope>/AffineInverse/<Op>``, consumed by the group's linears only.

Folded values are new initializers (the exporter may share one constant between norms). Inverses
are computed in float64 and stored in float32. Statistics: how many transforms went where.

Precondition (``requires``): ``StableNamesPass`` ran and the pass runs *before*
``QuantizeWeightsPass``: every planned group's linears are found by their float weights'
module-path names, and share one input. Postcondition (``ensures``): every planned group's
linears read one transformed input (a folded norm or the ``AffineInverse`` nodes); with the
plan's transformed float weights the graph computes the same function (checked numerically in
tests). The transform algebra is numpy (``aqexport.transform_algebra``): no torch in the graph
passes.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, PreconditionFailed
from aqexport.passes._linear_sites import LinearSite, find_linear, new_initializer
from aqexport.passes._result import StatsPassResult
from aqexport.transform_algebra import as_float64, diagonal, inverse, is_diagonal

if TYPE_CHECKING:
    from aqexport.calibrate.plan import BlockPlan, QuantPlan

__all__ = ["FoldAffinePass"]

logger = logging.getLogger(__name__)


class FoldAffinePass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan) -> None:
        super().__init__()
        self.plan = plan

    def _groups(self):
        """``(norm path, linear paths)`` of every planned transform, in plan order."""
        for index, block in sorted(self.plan.blocks.items()):
            prefix = f"{self.plan.blocks_path}.{index}"
            for norm in block.norm_transforms:
                linears = [f"{prefix}.{name}" for name, e in block.linears.items() if e.input_transform == norm]
                yield f"{prefix}.{norm}", linears

    def requires(self, model: ir.Model) -> None:
        for norm, linears in self._groups():
            sites = [find_linear(model.graph, f"{path}.weight") for path in linears]
            if any(site is None for site in sites) or len({id(site.input) for site in sites}) != 1:
                raise PreconditionFailed(
                    f"the linears fed by '{norm}' ({', '.join(linears)}) do not share one input in the graph",
                    "lower a plan made for this model, after StableNamesPass and before QuantizeWeightsPass",
                )

    def ensures(self, model: ir.Model) -> None:
        for norm, linears in self._groups():
            sites = [find_linear(model.graph, f"{path}.weight") for path in linears]
            inputs = {id(site.input) for site in sites if site is not None}
            if None in sites or len(inputs) != 1 or not _transformed(sites[0], norm):
                raise PostconditionFailed(f"the linears fed by '{norm}' do not read its transformed input", BUG_FIX)

    def call(self, model: ir.Model) -> StatsPassResult:
        placements: Counter[str] = Counter()
        for index, block in sorted(self.plan.blocks.items()):
            for norm, matrix in block.norm_transforms.items():
                placements[self._fold(model.graph, index, block, norm, as_float64(matrix))] += 1
        logger.info("fold_affine: %s", dict(placements))
        return StatsPassResult(
            model, modified=sum(placements.values()) > 0, stats={"placements": dict(sorted(placements.items()))}
        )

    def _fold(self, graph: ir.Graph, index: int, block: BlockPlan, norm: str, matrix: np.ndarray) -> str:
        """Put one transform into the graph; returns where it went (a ``placements`` key)."""
        prefix = f"{self.plan.blocks_path}.{index}"
        linears = [name for name, e in block.linears.items() if e.input_transform == norm]
        sites = [find_linear(graph, f"{prefix}.{name}.weight") for name in linears]
        x = sites[0].input
        group_nodes = {id(site.node) for site in sites}
        shift = block.norm_shifts.get(norm)
        shift = None if shift is None else as_float64(shift)
        exclusive = all(id(node) in group_nodes for node in x.consumers())
        diagonal_matrix = is_diagonal(matrix)
        if diagonal_matrix and exclusive:
            scales = diagonal(matrix)
            if self._try_fold_layer_norm(graph, x, scales, shift, f"{prefix}.{norm}"):
                return "layer_norm"
            if shift is None and self._try_fold_scale_mul(graph, x, scales, f"{prefix}.{norm}"):
                return "norm_weight"
        self._insert_explicit(graph, x, [site.node for site in sites], matrix, shift, prefix, norm)
        return "explicit_mul" if diagonal_matrix else "explicit_matmul"

    @staticmethod
    def _try_fold_layer_norm(graph, x: ir.Value, scales: np.ndarray, shift, name: str) -> bool:
        producer = x.producer()
        if producer is None or producer.op_type != "LayerNormalization" or x is not producer.outputs[0]:
            return False
        scale = producer.inputs[1]
        bias = producer.inputs[2] if len(producer.inputs) > 2 else None
        if scale is None or scale.const_value is None or (bias is not None and bias.const_value is None):
            return False
        if bias is None and shift is not None:
            return False
        new_scale = scale.const_value.numpy().astype(np.float64) / scales
        producer.replace_input_with(1, new_initializer(graph, f"{name}.weight_folded", new_scale.astype(np.float32)))
        if bias is not None:
            new_bias = bias.const_value.numpy().astype(np.float64) - (0.0 if shift is None else shift)
            producer.replace_input_with(
                2, new_initializer(graph, f"{name}.bias_folded", (new_bias / scales).astype(np.float32))
            )
        return True

    @staticmethod
    def _try_fold_scale_mul(graph, x: ir.Value, scales: np.ndarray, name: str) -> bool:
        producer = x.producer()
        if producer is None or producer.op_type != "Mul":
            return False
        for position, value in enumerate(producer.inputs):
            const = value.const_value if value is not None else None
            if const is None or value.is_graph_input():
                continue
            array = const.numpy()
            if array.ndim != 1 or array.shape[0] != scales.shape[0]:
                continue
            folded = (array.astype(np.float64) / scales).astype(np.float32)
            producer.replace_input_with(position, new_initializer(graph, f"{name}.weight_folded", folded))
            return True
        return False

    @staticmethod
    def _insert_explicit(graph, x, consumers, matrix: np.ndarray, shift, prefix: str, norm: str) -> None:
        producer = x.producer()
        if producer is not None and producer.name and producer.name.count("/") >= 2:
            base = producer.name.rsplit("/", 1)[0]  # the norm's scope: /model/layers.0/input_layernorm
        else:
            base = f"/{prefix}/{norm.replace('.', '/')}"
        base = f"{base}/AffineInverse"
        nodes, value = [], x
        if shift is not None:
            delta = new_initializer(graph, f"{prefix}.{norm}.shift", shift.astype(np.float32))
            nodes.append(ir.node("Sub", [value, delta], name=f"{base}/Sub"))
            value = nodes[-1].outputs[0]
        if is_diagonal(matrix):
            scale = new_initializer(
                graph, f"{prefix}.{norm}.inverse_scale", (1.0 / diagonal(matrix)).astype(np.float32)
            )
            nodes.append(ir.node("Mul", [value, scale], name=f"{base}/Mul"))
        else:
            dense = new_initializer(graph, f"{prefix}.{norm}.inverse", inverse(matrix).astype(np.float32))
            nodes.append(ir.node("MatMul", [value, dense], name=f"{base}/MatMul"))
        first_consumer = min(consumers, key=lambda node: list(graph).index(node))
        graph.insert_before(first_consumer, nodes)
        transformed = nodes[-1].outputs[0]
        for node in consumers:
            node.replace_input_with(0, transformed)


def _transformed(site: LinearSite, norm: str) -> bool:
    """The linear's input comes from the explicit ``AffineInverse`` nodes or from the norm node
    that now multiplies by this norm's folded weight (rules 1 and 2)."""
    producer = site.input.producer()
    if producer is None:
        return False
    if "/AffineInverse/" in (producer.name or ""):
        return True
    return any(
        value is not None and (value.name or "").startswith(f"{norm}.weight_folded") for value in producer.inputs
    )
