"""Rewrite the few ops mobile execution providers lack into equivalent ones they have.

A static-shape step graph (``target.profile: mobile``) is almost entirely MatMul / Mul / Add /
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

Precondition: static shapes (inferred). Postcondition: same function, fewer unsupported ops.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx_ir as ir

from aqexport.passes._linear_sites import new_initializer

__all__ = ["MobileOpsPass"]

logger = logging.getLogger(__name__)


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


class MobileOpsPass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.rewritten: Counter[str] = Counter()
        self._graph: ir.Graph | None = None
        self._constants: dict[tuple, ir.Value] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._graph, self._constants, self.rewritten = model.graph, {}, Counter()
        rules = {
            "Reciprocal": self._reciprocal,
            "Neg": self._neg,
            "Unsqueeze": self._unsqueeze,
            "ReduceMean": self._reduce_mean,
            "Expand": self._expand,
        }
        for node in list(model.graph):
            rule = rules.get(node.op_type) if node.domain == "" else None
            replacement = rule(node) if rule is not None else None
            if replacement is None:
                continue
            tape, output = replacement
            ir.convenience.replace_nodes_and_values(model.graph, node, [node], tape.nodes, [node.outputs[0]], [output])
            self.rewritten[node.op_type] += 1
        logger.info("mobile ops rewritten: %s", dict(self.rewritten))
        return ir.passes.PassResult(model, modified=bool(self.rewritten))

    def _constant(self, name: str, array: np.ndarray) -> ir.Value:
        """One initializer per distinct value, shared by every rewritten node that needs it."""
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = new_initializer(self._graph, name, array)
        return self._constants[key]

    def _with_scalar(self, node: ir.Node, op_type: str, scalar: float, scalar_first: bool):
        dtype = _float_dtype(node.inputs[0])
        if dtype is None:
            return None
        tape = ir.tape.Tape()
        constant = self._constant(f"mobile_scalar_{scalar:g}", np.array(scalar, dtype))
        operands = [constant, node.inputs[0]] if scalar_first else [node.inputs[0], constant]
        return tape, tape.op(op_type, operands)

    def _reciprocal(self, node: ir.Node):
        return self._with_scalar(node, "Div", 1.0, scalar_first=True)

    def _neg(self, node: ir.Node):
        return self._with_scalar(node, "Mul", -1.0, scalar_first=False)

    def _unsqueeze(self, node: ir.Node):
        shape = _static(node.outputs[0])
        if shape is None or _static(node.inputs[0]) is None:
            return None
        tape = ir.tape.Tape()
        return tape, tape.op("Reshape", [node.inputs[0], self._constant("mobile_shape", np.array(shape, np.int64))])

    def _reduce_mean(self, node: ir.Node):
        shape, dtype = _static(node.inputs[0]), _float_dtype(node.inputs[0])
        axes = _constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if shape is None or dtype is None or axes is None or len(axes) != 1 or axes[0] % len(shape) != len(shape) - 1:
            return None
        if node.attributes.get_int("keepdims", 1) != 1:
            return None
        tape = ir.tape.Tape()
        mean = self._constant(f"mobile_mean_{shape[-1]}", np.full((shape[-1], 1), 1 / shape[-1], dtype))
        return tape, tape.op("MatMul", [node.inputs[0], mean])

    @staticmethod
    def _expand(node: ir.Node):
        source, target = _static(node.inputs[0]), _static(node.outputs[0])
        if source is None or target is None or len(source) != len(target):
            return None
        grown = [axis for axis, (a, b) in enumerate(zip(source, target)) if a != b]
        if len(grown) != 1 or source[grown[0]] != 1:
            return None
        tape = ir.tape.Tape()
        return tape, tape.op("Concat", [node.inputs[0]] * target[grown[0]], attributes={"axis": grown[0]})
