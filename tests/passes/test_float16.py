"""Float16Pass: a new model whose graph I/O and initializers are float16, with the ops ONNX
Runtime has no float16 kernel for computed in float32 between Casts, and which computes the
float32 graph's values within float16 precision."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes import common as common_passes

from aqexport.errors import AqexportError
from aqexport.passes import Float16Pass
from tests.passes._plans import float_input, initializer, model_of, run_all


def _graph() -> ir.Model:
    """``Max(x·W + b, floor)``: ``Max`` is on ORT's float16 block list."""
    rng = np.random.default_rng(0)
    x = float_input("x", ["batch", 16])
    w, b = initializer("w", rng.standard_normal((16, 8)) / 4), initializer("b", rng.standard_normal(8))
    floor = initializer("floor", np.asarray(-0.5))
    matmul = ir.node("MatMul", [x, w], name="matmul")
    add = ir.node("Add", [matmul.outputs[0], b], name="add")
    clamp = ir.node("Max", [add.outputs[0], floor], name="max")
    clamp.outputs[0].name = "y"
    model = model_of([matmul, add, clamp], [x], [clamp.outputs[0]], [w, b, floor])
    common_passes.ShapeInferencePass()(model)  # the converter places its Casts by value types, as after cleanup
    return model


def test_io_and_weights_become_float16_and_compute_the_same():
    model = _graph()
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    (expected,) = run_all(model, x=x)
    result = Float16Pass()(model)
    assert result.model is not model and result.modified  # functional: the input model is untouched
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT
    graph = result.model.graph
    assert [v.dtype for v in [*graph.inputs, *graph.outputs]] == [ir.DataType.FLOAT16] * 2
    assert {value.dtype for value in graph.initializers.values()} == {ir.DataType.FLOAT16}
    blocked = next(node for node in graph if node.op_type == "Max")
    assert all(value.producer().op_type == "Cast" and value.dtype == ir.DataType.FLOAT for value in blocked.inputs)
    assert result.stats == {"float16_initializers": 3, "float32_initializers_kept": 0}
    (ours,) = run_all(result.model, x=x.astype(np.float16))
    assert ours.dtype == np.float16
    np.testing.assert_allclose(ours.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_ensures_finds_float32_io():
    with pytest.raises(ir.passes.PostconditionError, match="float32") as error:
        Float16Pass().ensures(_graph())
    assert isinstance(error.value, AqexportError)
