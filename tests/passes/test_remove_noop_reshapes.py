"""RemoveNoOpReshapesPass: a Reshape chain back to its own (symbolic) shape goes, anything else stays."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from aqexport.passes.remove_noop_reshapes import RemoveNoOpReshapesPass
from tests.passes._plans import float_input, initializer, model_of, run


def _int64(name: str, values) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(np.asarray(values, dtype=np.int64), name=name))


def _head_merge_graph(final_shape: list):
    """x [batch, seq, 12] → Reshape [0, 0, 3, -1] → Reshape(Shape-computed) → Add(bias)."""
    x = float_input("x", ["batch", "seq", 12])
    split_shape, bias = _int64("split_shape", [0, 0, 3, -1]), initializer("bias", np.arange(12))
    shape_of = ir.node("Shape", [x], {"end": 2})
    width = _int64("width", [12])
    target = ir.node("Concat", [shape_of.outputs[0], width], {"axis": 0})
    split = ir.node("Reshape", [x, split_shape])
    split.outputs[0].shape = ir.Shape(["batch", "seq", 3, 4])
    merge = ir.node("Reshape", [split.outputs[0], target.outputs[0]])
    merge.outputs[0].shape = ir.Shape(final_shape)
    add = ir.node("Add", [merge.outputs[0], bias])
    add.outputs[0].name = "y"
    return model_of([shape_of, target, split, merge, add], [x], [add.outputs[0]], [split_shape, bias, width])


def _reshapes_feeding_add(model: ir.Model) -> int:
    add = next(node for node in model.graph if node.op_type == "Add")
    return int(add.inputs[0].producer() is not None and add.inputs[0].producer().op_type == "Reshape")


def test_a_chain_back_to_the_same_shape_is_skipped_and_computes_the_same():
    model = _head_merge_graph(["batch", "seq", 12])
    x = np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32)
    expected = run(model, x=x)
    result = RemoveNoOpReshapesPass()(model)
    assert result.modified and _reshapes_feeding_add(model) == 0 and result.stats == {"removed": 1}
    np.testing.assert_array_equal(run(model, x=x), expected)


def test_other_symbols_and_unknown_dims_are_left_alone():
    for final_shape in (["batch", "other", 12], ["batch", None, 12]):
        model = _head_merge_graph(final_shape)
        assert not RemoveNoOpReshapesPass()(model).modified and _reshapes_feeding_add(model) == 1
