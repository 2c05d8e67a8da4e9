"""The run-time side ``x ↦ x·C`` of a norm-side transform as the cheapest exact ONNX subgraph,
and what it costs per token (``docs/transforms.md``).

``FoldAffinePass`` decides *where* a transform goes; this module writes the nodes for the
structured forms and counts their cost:

* dense ``C [d, d]``: ``MatMul(x, C)``; ``d²`` multiply-adds per token;
* block-diagonal ``C = blockdiag(C_1..C_m)`` (``blocks [m, k, k]``):
  ``Reshape [.., m, 1, k] → MatMul(·, blocks) → Reshape [.., d]``: the MatMul broadcasts its
  batch ``[.., m]`` against the ``m`` blocks, so block ``b`` multiplies only its ``k`` channels;
  ``d·k`` multiply-adds;
* Kronecker ``C = C₁ ⊗ C₂`` (``np.kron`` order): with ``X = reshape(x, [d₁, d₂])`` (row-major,
  channel ``i₁·d₂ + i₂``), ``(x·C)[j₁·d₂ + j₂] = Σ X[i₁, i₂]·C₁[i₁, j₁]·C₂[i₂, j₂]``, i.e.
  ``Y = C₁ᵀ·X·C₂``: ``Reshape [.., d₁, d₂] → MatMul(·, C₂) → MatMul(C₁ᵀ, ·) → Reshape [.., d]``;
  ``d·(d₁ + d₂)`` multiply-adds.

Leading dimensions are copied by ``Reshape``'s ``0`` entries when the input's rank is known, so
the subgraph has static shape constants (mobile EPs want those); otherwise the input is
flattened and restored from its ``Shape``. Matrices are float32 initializers computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from aqexport.passes._linear_sites import new_initializer

__all__ = ["RunTimeCost", "block_diagonal_nodes", "kronecker_nodes"]

FLOAT32_BYTES = 4


@dataclass
class RunTimeCost:
    """Per token: multiply-adds, elementwise ops, float32 weight elements read."""

    macs: int = 0
    elementwise: int = 0
    weights: int = 0

    def __add__(self, other: RunTimeCost) -> RunTimeCost:
        return RunTimeCost(self.macs + other.macs, self.elementwise + other.elementwise, self.weights + other.weights)

    @property
    def flops(self) -> int:
        return 2 * self.macs + self.elementwise

    @property
    def bytes(self) -> int:
        return FLOAT32_BYTES * self.weights

    def as_dict(self) -> dict[str, int]:
        return {"flops_per_token": self.flops, "bytes_per_token": self.bytes}


def _shapes(graph: ir.Graph, x: ir.Value, name: str, inner: list[int], width: int, base: str):
    """(nodes, shape into the structured view, shape back) for ``x [.., width]``."""
    if x.shape is not None:
        lead = [0] * (len(x.shape) - 1)
        into = new_initializer(graph, f"{name}.view_shape", np.asarray(lead + inner, np.int64))
        back = new_initializer(graph, f"{name}.flat_shape", np.asarray(lead + [width], np.int64))
        return [], into, back
    shape = ir.node("Shape", [x], name=f"{base}/Shape")
    into = new_initializer(graph, f"{name}.view_shape", np.asarray([-1, *inner], np.int64))
    return [shape], into, shape.outputs[0]


def block_diagonal_nodes(
    graph: ir.Graph, x: ir.Value, blocks: np.ndarray, name: str, base: str
) -> tuple[list[ir.Node], RunTimeCost]:
    """``x · blockdiag(blocks)`` for ``blocks [m, k, k]`` (float64 in, float32 initializer)."""
    count, size, _ = blocks.shape
    nodes, into, back = _shapes(graph, x, name, [count, 1, size], count * size, base)
    matrix = new_initializer(graph, f"{name}.inverse_blocks", blocks.astype(np.float32))
    view = ir.node("Reshape", [x, into], name=f"{base}/Reshape")
    product = ir.node("MatMul", [view.outputs[0], matrix], name=f"{base}/MatMul")
    flat = ir.node("Reshape", [product.outputs[0], back], name=f"{base}/Reshape_1")
    return [*nodes, view, product, flat], RunTimeCost(macs=count * size * size, weights=blocks.size)


def kronecker_nodes(
    graph: ir.Graph, x: ir.Value, left: np.ndarray, right: np.ndarray, name: str, base: str
) -> tuple[list[ir.Node], RunTimeCost]:
    """``x · (left ⊗ right)`` (``np.kron`` order) as ``leftᵀ · X · right`` on ``X [.., d₁, d₂]``."""
    first, second = left.shape[0], right.shape[0]
    width = first * second
    nodes, into, back = _shapes(graph, x, name, [first, second], width, base)
    left_t = new_initializer(graph, f"{name}.inverse_left_t", np.ascontiguousarray(left.T).astype(np.float32))
    right_v = new_initializer(graph, f"{name}.inverse_right", right.astype(np.float32))
    view = ir.node("Reshape", [x, into], name=f"{base}/Reshape")
    by_right = ir.node("MatMul", [view.outputs[0], right_v], name=f"{base}/MatMul")
    by_left = ir.node("MatMul", [left_t, by_right.outputs[0]], name=f"{base}/MatMul_1")
    flat = ir.node("Reshape", [by_left.outputs[0], back], name=f"{base}/Reshape_1")
    cost = RunTimeCost(macs=width * (first + second), weights=left.size + right.size)
    return [*nodes, view, by_right, by_left, flat], cost
