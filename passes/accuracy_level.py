"""Set the ``accuracy_level`` of the low-bit ``MatMulNBits``: how the build applies the level it
measured (``aqexport.accuracy_level``).

ONNX Runtime's CPU kernels for 2-4-bit ``MatMulNBits`` run with float activations at level 0 and
quantize the activations to int8 per block at level 4, the fast path (SmolLM2 int4 decode:
109 → 161 tok/s in BENCHMARKS.md's execution table). Whether level 4 is accurate enough is a
property of the model and the plan, not of the format, so the build emits the fast level,
measures it, and uses this pass to fall back where the measured perplexity says so. 8-bit
weights keep level 4 either way (the CPU EP has no fast float kernel for them).

Precondition: none (a graph without MatMulNBits is left unchanged). Postcondition: every
``MatMulNBits`` with ``bits <= max_bits`` carries ``level`` (0 is the attribute's absence).
"""

from __future__ import annotations

import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed
from aqexport.passes._result import StatsPassResult

__all__ = ["AccuracyLevelPass", "low_bit_matmuls"]


def low_bit_matmuls(graph: ir.Graph, max_bits: int = 4) -> list[ir.Node]:
    """The ``MatMulNBits`` whose weights have at most ``max_bits`` bits: the ones the level decides."""
    matmuls = [node for node in graph if node.op_type == "MatMulNBits" and node.domain == "com.microsoft"]
    return [node for node in matmuls if node.attributes.get_int("bits", 4) <= max_bits]


class AccuracyLevelPass(ir.passes.InPlacePass):
    def __init__(self, level: int, max_bits: int = 4) -> None:
        super().__init__()
        self.level, self.max_bits = level, max_bits

    def ensures(self, model: ir.Model) -> None:
        for node in low_bit_matmuls(model.graph, self.max_bits):
            if node.attributes.get_int("accuracy_level", 0) != self.level:
                raise PostconditionFailed(f"'{node.name}' is not at accuracy_level {self.level}", BUG_FIX)

    def call(self, model: ir.Model) -> StatsPassResult:
        changed = 0
        for node in low_bit_matmuls(model.graph, self.max_bits):
            if node.attributes.get_int("accuracy_level", 0) == self.level:
                continue
            node.attributes.pop("accuracy_level", None)
            if self.level:
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", self.level)
            changed += 1
        return StatsPassResult(model, modified=bool(changed), stats={"nodes": changed, "level": self.level})
