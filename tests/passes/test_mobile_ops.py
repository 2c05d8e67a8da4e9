"""MobileOpsPass: each op mobile EPs lack is rewritten on a static graph, the rewritten ops are
gone, and ONNX Runtime computes the same outputs; ops no rule applies to stay."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes import common as common_passes

from aqexport.errors import AqexportError
from aqexport.passes import MobileOpsPass
from tests.passes._plans import float_input, initializer, model_of, run_all

REWRITTEN = {"Reciprocal", "Neg", "Unsqueeze", "ReduceMean", "Expand"}


def _ints(name: str, values) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(np.asarray(values, np.int64), name=name))


def _graph(shape) -> ir.Model:
    """One node per rule on ``x`` [1, 4, 8], plus an ``Expand`` over two axes (no rule)."""
    x = float_input("x", shape)
    one = initializer("one", np.asarray(1.0))
    axes, last = _ints("axes", [1]), _ints("last", [-1])
    one_axis, two_axes = _ints("one_axis", [1, 3, 4, 8]), _ints("two_axes", [2, 3, 4, 8])
    positive = ir.node("Add", [ir.node("Abs", [x], name="abs").outputs[0], one], name="positive")
    nodes = [positive.inputs[0].producer(), positive]
    nodes.append(ir.node("Reciprocal", [positive.outputs[0]], name="reciprocal"))
    nodes.append(ir.node("Neg", [x], name="neg"))
    nodes.append(ir.node("Unsqueeze", [x, axes], name="unsqueeze"))
    nodes.append(ir.node("ReduceMean", [x, last], {"keepdims": 1}, name="mean"))
    nodes.append(ir.node("Expand", [nodes[4].outputs[0], one_axis], name="expand"))
    nodes.append(ir.node("Expand", [nodes[4].outputs[0], two_axes], name="expand_two_axes"))
    outputs = [node.outputs[0] for node in nodes[2:]]
    for index, value in enumerate(outputs):
        value.name = f"y{index}"
    model = model_of(nodes, [x], outputs, [one, axes, last, one_axis, two_axes])
    common_passes.ShapeInferencePass(strict_mode=False)(model)  # as profile_passes runs it
    return model


def test_rewritten_ops_are_gone_and_outputs_equal():
    model = _graph([1, 4, 8])
    x = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    expected = run_all(model, x=x)
    result = MobileOpsPass()(model)
    assert result.modified
    assert result.stats == {"rewritten": {"Expand": 1, "Neg": 1, "Reciprocal": 1, "ReduceMean": 1, "Unsqueeze": 1}}
    left = [node.name for node in model.graph if node.op_type in REWRITTEN]
    assert left == ["expand_two_axes"]  # grows two axes: no single-axis Concat for it
    ours = run_all(model, x=x)
    assert [o.shape for o in ours] == [e.shape for e in expected]
    for value, reference in zip(ours, expected):
        np.testing.assert_allclose(value, reference, rtol=1e-6, atol=1e-7)  # ReduceMean as MatMul: another sum order


def test_a_reused_pass_reports_each_call_alone():
    rewrite = MobileOpsPass()
    assert rewrite(_graph([1, 4, 8])).stats == rewrite(_graph([1, 4, 8])).stats


def test_dynamic_graph_is_a_precondition_error():
    with pytest.raises(ir.passes.PreconditionError, match="static-shape") as error:
        MobileOpsPass()(_graph(["batch", 4, 8]))
    assert isinstance(error.value, AqexportError)
