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

Precondition: ``StableNamesPass`` ran; runs *before* ``QuantizeWeightsPass`` (it finds the
group's linears by their float weights). Postcondition: with the plan's transformed float
weights the graph computes the same function (checked numerically in tests).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_ir as ir
import torch

from aqexport.calibrate.plan import BlockPlan, QuantPlan
from aqexport.errors import AqexportError
from aqexport.passes._linear_sites import find_linear, new_initializer

__all__ = ["FoldAffinePass"]

logger = logging.getLogger(__name__)


def _is_diagonal(matrix: torch.Tensor) -> bool:
    return bool(torch.count_nonzero(matrix - torch.diag(matrix.diagonal())) == 0)


class FoldAffinePass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan) -> None:
        super().__init__()
        self.plan = plan
        self.placements: Counter[str] = Counter()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for index, block in sorted(self.plan.blocks.items()):
            for norm, matrix in block.norm_transforms.items():
                self._fold(model.graph, index, block, norm, matrix.double())
        logger.info("fold_affine: %s", dict(self.placements))
        return ir.passes.PassResult(model, modified=sum(self.placements.values()) > 0)

    def _fold(self, graph: ir.Graph, index: int, block: BlockPlan, norm: str, matrix: torch.Tensor) -> None:
        prefix = f"{self.plan.blocks_path}.{index}"
        linears = [name for name, e in block.linears.items() if e.input_transform == norm]
        sites = [find_linear(graph, f"{prefix}.{name}.weight") for name in linears]
        if any(site is None for site in sites) or len({id(site.input) for site in sites}) != 1:
            raise AqexportError(
                f"the linears fed by '{prefix}.{norm}' ({', '.join(linears)}) do not share one input in the graph",
                "lower a plan made for this model, after StableNamesPass",
            )
        x = sites[0].input
        group_nodes = {id(site.node) for site in sites}
        shift = block.norm_shifts.get(norm)
        shift = None if shift is None else shift.double().numpy()
        exclusive = all(id(node) in group_nodes for node in x.consumers())
        if _is_diagonal(matrix) and exclusive:
            scales = matrix.diagonal().numpy()
            if self._try_fold_layer_norm(graph, x, scales, shift, f"{prefix}.{norm}"):
                self.placements["layer_norm"] += 1
                return
            if shift is None and self._try_fold_scale_mul(graph, x, scales, f"{prefix}.{norm}"):
                self.placements["norm_weight"] += 1
                return
        self._insert_explicit(graph, x, [site.node for site in sites], matrix, shift, prefix, norm)
        self.placements["explicit_matmul" if not _is_diagonal(matrix) else "explicit_mul"] += 1

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
    def _insert_explicit(graph, x, consumers, matrix: torch.Tensor, shift, prefix: str, norm: str) -> None:
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
        if _is_diagonal(matrix):
            inverse = new_initializer(
                graph, f"{prefix}.{norm}.inverse_scale", (1.0 / matrix.diagonal()).float().numpy()
            )
            nodes.append(ir.node("Mul", [value, inverse], name=f"{base}/Mul"))
        else:
            inverse = new_initializer(graph, f"{prefix}.{norm}.inverse", torch.linalg.inv(matrix).float().numpy())
            nodes.append(ir.node("MatMul", [value, inverse], name=f"{base}/MatMul"))
        first_consumer = min(consumers, key=lambda node: list(graph).index(node))
        graph.insert_before(first_consumer, nodes)
        transformed = nodes[-1].outputs[0]
        for node in consumers:
            node.replace_input_with(0, transformed)
