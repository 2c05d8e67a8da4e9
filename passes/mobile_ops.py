"""Rewrite the few ops mobile execution providers lack into equivalent ones they have.

A static-shape step graph (``target.profile: npu``) is almost entirely MatMul / Mul / Add /
Reshape / Transpose / Softmax, which NNAPI and both CoreML formats run. What ONNX Runtime's
usability checker (``onnxruntime.tools.mobile_helpers``) still reports as unsupported, and
its exact replacement here, all on static shapes:

* ``Reciprocal(x)`` (RMSNorm's ``1 / sqrt``; NNAPI)      → ``Div(1, x)``
* ``Neg(x)`` (rotate-half of rotary; CoreML)              → ``Mul(x, -1)``
* ``Unsqueeze(x, axes)`` (CoreML NeuralNetwork)           → ``Reshape(x, output shape)``
* ``ReduceMean(x, [-1], keepdims)`` (RMSNorm; CoreML NN)  → ``MatMul(x, 1/N · ones[N, 1])``
* ``Expand(x, shape)`` along one axis (KV heads repeated for grouped-query attention; NNAPI and
  CoreML)                                                 → ``Concat(x, …, x, axis)``

Each replacement computes the same values (``ReduceMean`` as a matmul may round its sum in
another order: ~1e-7 relative). Nodes whose shapes are not static, or an ``Expand`` that
broadcasts more than one axis, are left as they are.

Precondition (``requires``): the graph's inputs and outputs have static shapes (the npu step
graph; shapes inside are inferred by the ``ShapeInferencePass`` before this one).
Postcondition (``ensures``): same function; none of the ops above is left where its rule
applies (what remains had no static shape or grows more than one axis); every graph output is
still computed.

Each rule is split into a pure match (``_RULES``: node → builder or None), which ``ensures``
reuses, and the builder, which takes the call's shared-constant table.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, PreconditionFailed, outputs_computed
from aqexport.passes._linear_sites import new_initializer
from aqexport.passes._result import StatsPassResult

__all__ = ["MobileOpsPass"]

logger = logging.getLogger(__name__)

#: ``constant(name, array) -> value``: one initializer per distinct value in a call.
Constant = Callable[[str, np.ndarray], ir.Value]
Builder = Callable[[Constant], tuple[ir.tape.Tape, ir.Value]]


def _static(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def _float_dtype(value: ir.Value) -> np.dtype | None:
    if value.dtype is None or not value.dtype.is_floating_point():
        return None
    return value.dtype.numpy()


def _with_scalar(node: ir.Node, op_type: str, scalar: float, scalar_first: bool) -> Builder | None:
    dtype = _float_dtype(node.inputs[0])
    if dtype is None:
        return None

    def build(constant: Constant):
        tape = ir.tape.Tape()
        value = constant(f"mobile_scalar_{scalar:g}", np.array(scalar, dtype))
        operands = [value, node.inputs[0]] if scalar_first else [node.inputs[0], value]
        return tape, tape.op(op_type, operands)

    return build


def _reciprocal(node: ir.Node) -> Builder | None:
    return _with_scalar(node, "Div", 1.0, scalar_first=True)


def _neg(node: ir.Node) -> Builder | None:
    return _with_scalar(node, "Mul", -1.0, scalar_first=False)


def _unsqueeze(node: ir.Node) -> Builder | None:
    shape = _static(node.outputs[0])
    if shape is None or _static(node.inputs[0]) is None:
        return None

    def build(constant: Constant):
        tape = ir.tape.Tape()
        return tape, tape.op("Reshape", [node.inputs[0], constant("mobile_shape", np.array(shape, np.int64))])

    return build


def _reduce_mean(node: ir.Node) -> Builder | None:
    shape, dtype = _static(node.inputs[0]), _float_dtype(node.inputs[0])
    axes = _constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None or dtype is None or axes is None or len(axes) != 1 or axes[0] % len(shape) != len(shape) - 1:
        return None
    if node.attributes.get_int("keepdims", 1) != 1:
        return None

    def build(constant: Constant):
        tape = ir.tape.Tape()
        mean = constant(f"mobile_mean_{shape[-1]}", np.full((shape[-1], 1), 1 / shape[-1], dtype))
        return tape, tape.op("MatMul", [node.inputs[0], mean])

    return build


def _expand(node: ir.Node) -> Builder | None:
    source, target = _static(node.inputs[0]), _static(node.outputs[0])
    if source is None or target is None or len(source) != len(target):
        return None
    grown = [axis for axis, (a, b) in enumerate(zip(source, target)) if a != b]
    if len(grown) != 1 or source[grown[0]] != 1:
        return None

    def build(constant: Constant):
        tape = ir.tape.Tape()
        return tape, tape.op("Concat", [node.inputs[0]] * target[grown[0]], attributes={"axis": grown[0]})

    return build


_RULES: dict[str, Callable[[ir.Node], Builder | None]] = {
    "Reciprocal": _reciprocal,
    "Neg": _neg,
    "Unsqueeze": _unsqueeze,
    "ReduceMean": _reduce_mean,
    "Expand": _expand,
}


def _match(node: ir.Node) -> Builder | None:
    rule = _RULES.get(node.op_type) if node.domain == "" else None
    return rule(node) if rule is not None else None


class MobileOpsPass(ir.passes.InPlacePass):
    def requires(self, model: ir.Model) -> None:
        dynamic = [v.name for v in [*model.graph.inputs, *model.graph.outputs] if _static(v) is None]
        if dynamic:
            raise PreconditionFailed(
                f"MobileOpsPass rewrites static-shape graphs; {dynamic[:3]} have dynamic shapes",
                "run it on the npu step graph (target.profile: npu)",
            )

    def ensures(self, model: ir.Model) -> None:
        outputs_computed(model.graph, type(self).__name__)
        left = [node.name or node.op_type for node in model.graph if _match(node) is not None]
        if left:
            raise PostconditionFailed(f"rewritable ops are left in the graph: {left[:5]}", BUG_FIX)

    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        constants: dict[tuple, ir.Value] = {}

        def constant(name: str, array: np.ndarray) -> ir.Value:
            """One initializer per distinct value, shared by every rewritten node that needs it."""
            key = (array.dtype.str, array.shape, array.tobytes())
            if key not in constants:
                constants[key] = new_initializer(graph, name, array)
            return constants[key]

        rewritten: Counter[str] = Counter()
        for node in list(graph):
            build = _match(node)
            if build is None:
                continue
            tape, output = build(constant)
            ir.convenience.replace_nodes_and_values(graph, node, [node], tape.nodes, [node.outputs[0]], [output])
            rewritten[node.op_type] += 1
        logger.info("mobile ops rewritten: %s", dict(rewritten))
        return StatsPassResult(model, modified=bool(rewritten), stats={"rewritten": dict(sorted(rewritten.items()))})
