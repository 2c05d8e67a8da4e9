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
4. **Structured ``A = S · diag(s₀)``** (the plan's ``norm_structures``: block-diagonal or
   Kronecker ``S``, ``docs/transforms.md``): ``x ↦ ((x − δ) / s₀) · S⁻¹``. The diagonal part
   folds into the norm by rule 1 or 2 where they apply (explicit ``Sub`` / ``Mul`` otherwise,
   nothing when ``s₀ = 1`` and there is no shift), then ``S⁻¹`` is written as the structured
   subgraph of ``_structured_inverse`` (``Reshape → MatMul → Reshape``, blocks or factors
   inverted one by one in float64), under the same ``AffineInverse`` scope.

Before anything is written (``requires``), every recorded block or Kronecker factor must be
strictly diagonally dominant (Levy–Desplanques: the guarantee that its inverse exists) and the
factors must compose to the plan's ``A`` (the matrix the codes were quantized against); a
diagonal form must be a diagonal with no zero. Anything else is refused.

Folded values are new initializers (the exporter may share one constant between norms). Inverses
are computed in float64 and stored in float32. Statistics: how many transforms went where
(``placements``) and, per transform and in total, its form and run-time cost per token
(``flops_per_token``: 2 × multiply-adds + elementwise ops; ``bytes_per_token``: float32 weights
read); a transform folded into its norm costs nothing.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from aqexport.errors import AqexportError
from aqexport.passes._contract import BUG_FIX, PostconditionFailed, PreconditionFailed
from aqexport.passes._linear_sites import LinearSite, find_linear, new_initializer
from aqexport.passes._result import StatsPassResult
from aqexport.passes._structured_inverse import RunTimeCost, block_diagonal_nodes, kronecker_nodes
from aqexport.transform_algebra import (
    NORM_FORMS,
    as_float64,
    compose,
    diagonal,
    inverse,
    is_diagonal,
    require_dominant,
)

if TYPE_CHECKING:
    from aqexport.calibrate.plan import BlockPlan, QuantPlan

__all__ = ["FoldAffinePass"]

logger = logging.getLogger(__name__)

STRUCTURED = ("block_diagonal", "kronecker")
_Core = Callable[[ir.Value, str], tuple[list[ir.Node], RunTimeCost]]


def _form(block: BlockPlan, norm: str, matrix: np.ndarray) -> str:
    """The recorded form; plans written before forms existed hold plain matrices."""
    structure = block.norm_structures.get(norm)
    if structure is not None:
        return structure.form
    return "diagonal" if is_diagonal(matrix) else "dense"


def _check_structure(block: BlockPlan, norm: str, name: str) -> None:
    """Refuse a recorded form the lowering cannot write exactly (``AqexportError``)."""
    structure = block.norm_structures.get(norm)
    if structure is None:
        return
    matrix = as_float64(block.norm_transforms[norm])
    fix = "recalibrate the plan: the calibration engine records forms it can lower"
    if structure.form not in NORM_FORMS:
        raise AqexportError(f"'{name}' records the unknown transform form '{structure.form}'", fix)
    if structure.form != "diagonal" and matrix.ndim != 2:
        raise AqexportError(f"'{name}' records a {structure.form} transform but stores a vector, not a matrix", fix)
    if structure.form == "diagonal":
        if not is_diagonal(matrix):
            raise AqexportError(f"'{name}' records a diagonal transform but its matrix is not diagonal", fix)
        require_dominant(matrix, f"the diagonal transform of '{name}'")
    if structure.form not in STRUCTURED:
        return
    for position, factor in enumerate(structure.factors):
        require_dominant(factor, f"{structure.form} factor {position} of '{name}'")
    composed = compose(structure.form, structure.scales, structure.factors)
    if composed.shape != matrix.shape or not np.allclose(composed, matrix, rtol=1e-12, atol=0.0):
        raise AqexportError(f"the {structure.form} factors of '{name}' do not compose to its transform", fix)


class FoldAffinePass(ir.passes.InPlacePass):
    def __init__(self, plan: QuantPlan) -> None:
        super().__init__()
        self.plan = plan

    def _groups(self):
        """``(norm path, linear paths)`` of every planned transform, in plan order."""
        for index, block in self.plan.blocks.items():
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
        for index, block in self.plan.blocks.items():
            for norm in block.norm_transforms:
                try:
                    _check_structure(block, norm, f"{self.plan.blocks_path}.{index}.{norm}")
                except AqexportError as error:
                    raise PreconditionFailed(error.cause, error.fix) from None

    def ensures(self, model: ir.Model) -> None:
        for norm, linears in self._groups():
            sites = [find_linear(model.graph, f"{path}.weight") for path in linears]
            inputs = {id(site.input) for site in sites if site is not None}
            if None in sites or len(inputs) != 1 or not _transformed(sites[0], norm):
                raise PostconditionFailed(f"the linears fed by '{norm}' do not read its transformed input", BUG_FIX)

    def call(self, model: ir.Model) -> StatsPassResult:
        placements: Counter[str] = Counter()
        transforms: dict[str, dict[str, Any]] = {}
        total = RunTimeCost()
        for index, block in self.plan.blocks.items():
            for norm, matrix in block.norm_transforms.items():
                record, cost = self._fold(model.graph, index, block, norm, as_float64(matrix))
                placements[record["placement"]] += 1
                transforms[f"{self.plan.blocks_path}.{index}.{norm}"] = {**record, **cost.as_dict()}
                total = total + cost
        logger.info("fold_affine: %s, run time per token %s", dict(placements), total.as_dict())
        explicit = sum(1 for record in transforms.values() if record["flops_per_token"])
        stats = {
            "placements": dict(sorted(placements.items())),
            "run_time_cost": {**total.as_dict(), "transforms": explicit},
            "transforms": transforms,
        }
        return StatsPassResult(model, modified=sum(placements.values()) > 0, stats=stats)

    def _fold(
        self, graph: ir.Graph, index: int, block: BlockPlan, norm: str, matrix: np.ndarray
    ) -> tuple[dict[str, Any], RunTimeCost]:
        """Put one transform into the graph; returns its record (form, placement, structure)
        and its run-time cost."""
        prefix = f"{self.plan.blocks_path}.{index}"
        linears = [name for name, e in block.linears.items() if e.input_transform == norm]
        sites = [find_linear(graph, f"{prefix}.{name}.weight") for name in linears]
        x = sites[0].input
        consumers = [site.node for site in sites]
        group_nodes = {id(node) for node in consumers}
        shift = block.norm_shifts.get(norm)
        shift = None if shift is None else as_float64(shift)
        exclusive = all(id(node) in group_nodes for node in x.consumers())
        form = _form(block, norm, matrix)
        name = f"{prefix}.{norm}"
        if form in STRUCTURED:
            return self._fold_structured(graph, x, consumers, block.norm_structures[norm], shift, exclusive, name)
        if form == "diagonal" and exclusive:
            scales = diagonal(matrix)
            if self._try_fold_layer_norm(graph, x, scales, shift, name):
                return {"form": form, "placement": "layer_norm"}, RunTimeCost()
            if shift is None and self._try_fold_scale_mul(graph, x, scales, name):
                return {"form": form, "placement": "norm_weight"}, RunTimeCost()
        if form == "diagonal":
            core, placement = _scale_core(graph, 1.0 / diagonal(matrix), name), "explicit_mul"
        else:
            core, placement = _dense_core(graph, inverse(matrix), name), "explicit_matmul"
        cost = self._insert_explicit(graph, x, consumers, shift, name, core)
        return {"form": form, "placement": placement}, cost

    def _fold_structured(
        self, graph: ir.Graph, x: ir.Value, consumers, structure, shift, exclusive: bool, name: str
    ) -> tuple[dict[str, Any], RunTimeCost]:
        """Rule 4: ``((x − δ) / s₀)`` folded into the norm where rules 1–2 allow, then ``S⁻¹``."""
        scales = as_float64(structure.scales)
        factors = [as_float64(factor) for factor in structure.factors]
        record: dict[str, Any] = {"form": structure.form, "placement": f"explicit_{structure.form}"}
        trivial = bool(np.all(scales == 1.0))
        folded = None
        if shift is None and trivial:
            folded = "none"
        elif exclusive and self._try_fold_layer_norm(graph, x, scales, shift, name):
            folded = "layer_norm"
        elif exclusive and shift is None and self._try_fold_scale_mul(graph, x, scales, name):
            folded = "norm_weight"
        record["diagonal_part"] = folded or "explicit"
        if structure.form == "block_diagonal":
            record["block"] = int(factors[0].shape[-1])
            structured = _block_core(graph, inverse(factors[0]), name)
        else:
            record["factors"] = [int(factors[0].shape[0]), int(factors[1].shape[0])]
            structured = _kronecker_core(graph, inverse(factors[0]), inverse(factors[1]), name)
        core = structured
        if folded is None:
            shift_core, scale_core = shift, None if trivial else _scale_core(graph, 1.0 / scales, name)
            core = _chain(scale_core, structured)
        else:
            shift_core = None
        return record, self._insert_explicit(graph, x, consumers, shift_core, name, core)

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
    def _insert_explicit(graph, x, consumers, shift, name: str, core: _Core) -> RunTimeCost:
        """``Sub(x, δ)`` if shifted, then ``core``'s nodes, before the first consumer; the group's
        linears read the result. Returns the run-time cost of what was inserted."""
        producer = x.producer()
        if producer is not None and producer.name and producer.name.count("/") >= 2:
            base = producer.name.rsplit("/", 1)[0]  # the norm's scope: /model/layers.0/input_layernorm
        else:
            base = "/" + name.replace(".", "/")
        base = f"{base}/AffineInverse"
        nodes, value, cost = [], x, RunTimeCost()
        if shift is not None:
            delta = new_initializer(graph, f"{name}.shift", shift.astype(np.float32))
            nodes.append(ir.node("Sub", [value, delta], name=f"{base}/Sub"))
            value = _same_shape(nodes[-1].outputs[0], value)
            cost = cost + RunTimeCost(elementwise=shift.size, weights=shift.size)
        core_nodes, core_cost = core(value, base)
        nodes += core_nodes
        first_consumer = min(consumers, key=lambda node: list(graph).index(node))
        graph.insert_before(first_consumer, nodes)
        transformed = nodes[-1].outputs[0]
        for node in consumers:
            node.replace_input_with(0, transformed)
        return cost + core_cost


def _same_shape(output: ir.Value, value: ir.Value) -> ir.Value:
    """An elementwise op by a per-channel vector keeps its input's type and shape; recording it
    lets the structured subgraph after it use static ``Reshape`` shapes."""
    output.type, output.shape = value.type, value.shape
    return output


def _scale_core(graph: ir.Graph, inverse_scales: np.ndarray, name: str) -> _Core:
    def core(value: ir.Value, base: str):
        scale = new_initializer(graph, f"{name}.inverse_scale", inverse_scales.astype(np.float32))
        cost = RunTimeCost(elementwise=inverse_scales.size, weights=inverse_scales.size)
        node = ir.node("Mul", [value, scale], name=f"{base}/Mul")
        _same_shape(node.outputs[0], value)
        return [node], cost

    return core


def _dense_core(graph: ir.Graph, matrix_inverse: np.ndarray, name: str) -> _Core:
    def core(value: ir.Value, base: str):
        dense = new_initializer(graph, f"{name}.inverse", matrix_inverse.astype(np.float32))
        cost = RunTimeCost(macs=matrix_inverse.size, weights=matrix_inverse.size)
        return [ir.node("MatMul", [value, dense], name=f"{base}/MatMul")], cost

    return core


def _block_core(graph: ir.Graph, block_inverses: np.ndarray, name: str) -> _Core:
    return lambda value, base: block_diagonal_nodes(graph, value, block_inverses, name, base)


def _kronecker_core(graph: ir.Graph, left: np.ndarray, right: np.ndarray, name: str) -> _Core:
    return lambda value, base: kronecker_nodes(graph, value, left, right, name, base)


def _chain(first: _Core | None, second: _Core) -> _Core:
    """``second`` applied to ``first``'s output (``first`` may be absent)."""
    if first is None:
        return second

    def core(value: ir.Value, base: str):
        nodes, cost = first(value, base)
        more, more_cost = second(nodes[-1].outputs[0], base)
        return nodes + more, cost + more_cost

    return core


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
