"""The errors a pass raises from ``requires`` / ``ensures``: onnx_ir's and aqexport's at once.

onnx_ir's ``PassBase.__call__`` re-raises a ``PreconditionError`` from ``requires`` (or a
``PostconditionError`` from ``ensures``) as it is, and wraps anything else in a bare one, so
a pass must raise onnx_ir's type to keep its message. The user, and the CLI, want an
``AqexportError`` with a cause and a fix. ``PreconditionFailed`` / ``PostconditionFailed`` are
both: onnx_ir's pass infrastructure and ``pytest.raises(AqexportError)`` see the type they
expect, and ``aqexport.lowering.run_passes`` adds the pass's name (``PassContractError``).
"""

from __future__ import annotations

import onnx_ir as ir

from aqexport.errors import PassContractError

__all__ = ["PostconditionFailed", "PreconditionFailed", "float_weights_replaced", "outputs_computed"]


class PreconditionFailed(ir.passes.PreconditionError, PassContractError):
    """``requires`` found the model or the pass's inputs (plan, tables) not as stated."""


class PostconditionFailed(ir.passes.PostconditionError, PassContractError):
    """``ensures`` found the rewritten model not as promised: a bug in the pass."""


BUG_FIX = "this is a bug in the pass: report it with the model and config"


def outputs_computed(graph: ir.Graph, pass_name: str) -> None:
    """Every graph output is still computed: a graph input, an initializer or the output of a
    node in the graph (a rewrite that rewired outputs badly leaves a dangling one)."""
    for value in graph.outputs:
        producer = value.producer()
        if value.is_graph_input() or value.is_initializer():
            continue
        if producer is None or producer.graph is not graph:
            raise PostconditionFailed(f"{pass_name} left graph output '{value.name}' without a producer", BUG_FIX)


def float_weights_replaced(graph: ir.Graph, paths) -> None:
    """No MatMul/Gemm still multiplies by the float ``<path>.weight`` of any of ``paths``: the
    passes that swap a linear's weight (quantized codes, folded float) promise this."""
    for path in paths:
        weight = graph.initializers.get(f"{path}.weight")
        if weight is not None and any(node.op_type in ("MatMul", "Gemm") for node, _ in weight.uses()):
            raise PostconditionFailed(f"the float weight '{path}.weight' is still multiplied by", BUG_FIX)
