"""DequantizeConstantWeightsPass: every DequantizeLinear on constants (blocked with a ragged last
block, per axis, per tensor) becomes its float values; ONNX Runtime computes the same outputs
(exactly in float32 storage, within float16's rounding in float16), and a DequantizeLinear
fed at run time stays."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes import common as common_passes

from aqexport.passes import DequantizeConstantWeightsPass
from tests.passes._plans import float_input, model_of, run_all


def _constant(name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))


def _graph() -> ir.Model:
    """``x`` [2, 20] through three DequantizeLinear → MatMul weights [20, 6]: uint4 blocked along
    the input axis (blocks of 8: 8 + 8 + a ragged 4), int8 per output column, uint8 per tensor;
    and one DequantizeLinear of the run-time input ``x``, which the pass must leave."""
    rng = np.random.default_rng(0)
    x = float_input("x", [2, 20])
    nodes, outputs = [], []
    layouts = {
        "blocked": (
            ir.DataType.UINT4,
            rng.integers(0, 16, (20, 6)),
            rng.integers(0, 16, (3, 6)),
            (3, 6),
            {"axis": 0, "block_size": 8},
        ),
        "per_axis": (ir.DataType.INT8, rng.integers(-128, 128, (20, 6)), rng.integers(-5, 5, 6), (6,), {"axis": 1}),
        "per_tensor": (ir.DataType.UINT8, rng.integers(0, 256, (20, 6)), np.asarray(128), (), {}),
    }
    for name, (kind, codes, zero, scale_shape, attributes) in layouts.items():
        storage = np.int8 if kind == ir.DataType.INT8 else np.uint8
        scale = (rng.random(scale_shape) * 0.1 + 0.01).astype(np.float32)
        inputs = [
            _constant(f"{name}.weight_Q", codes.astype(storage), kind),
            _constant(f"{name}.weight_scales", scale),
            _constant(f"{name}.weight_zero_points", np.asarray(zero).astype(storage), kind),
        ]
        dequantize = ir.node("DequantizeLinear", inputs, attributes, name=f"{name}/DequantizeLinear")
        matmul = ir.node("MatMul", [x, dequantize.outputs[0]], name=f"{name}/MatMul")
        matmul.outputs[0].name = f"y_{name}"
        nodes += [dequantize, matmul]
        outputs.append(matmul.outputs[0])
    quantize = ir.node("QuantizeLinear", [x, _constant("x_scale", np.float32(0.05))], name="x/QuantizeLinear")
    runtime = ir.node("DequantizeLinear", [quantize.outputs[0], _constant("x_scale", np.float32(0.05))], name="x/Dq")
    runtime.outputs[0].name = "y_runtime"
    nodes += [quantize, runtime]
    outputs.append(runtime.outputs[0])
    initializers = {value.name: value for node in nodes for value in node.inputs if value.const_value is not None}
    model = model_of(nodes, [x], outputs, list(initializers.values()))
    common_passes.ShapeInferencePass(strict_mode=False)(model)
    return model


@pytest.mark.parametrize("storage", [ir.DataType.FLOAT, ir.DataType.FLOAT16])
def test_constant_dequantizations_become_their_values(storage):
    model = _graph()
    x = np.random.default_rng(1).standard_normal((2, 20)).astype(np.float32)
    expected = run_all(model, x=x)
    result = DequantizeConstantWeightsPass(storage)(model)
    common_passes.RemoveUnusedNodesPass()(model)
    assert result.modified and result.stats == {"replaced": 3, "storage": storage.name}
    assert [node.name for node in model.graph if node.op_type == "DequantizeLinear"] == ["x/Dq"]
    stored = {name: value.const_value.dtype for name, value in model.graph.initializers.items()}
    assert not any(name.endswith(("_Q", "_scales", "_zero_points")) for name in stored)  # codes dropped
    suffix = "float16" if storage == ir.DataType.FLOAT16 else "float"
    assert {stored[f"{name}.weight_Q_{suffix}"] for name in ("blocked", "per_axis", "per_tensor")} == {storage}
    casts = [node for node in model.graph if node.op_type == "Cast"]
    assert len(casts) == (3 if storage == ir.DataType.FLOAT16 else 0)
    ours = run_all(model, x=x)
    tolerance = 0.0 if storage == ir.DataType.FLOAT else 2.0**-10
    for value, reference in zip(ours[:3], expected[:3]):
        # a float16 weight is within 2⁻¹¹ of its value relatively; a dot product of 20 of them
        # within 2⁻¹¹ of Σ|x·w|, bounded here by the largest |output| times a margin
        np.testing.assert_allclose(value, reference, rtol=0, atol=tolerance * np.abs(reference).max() + 1e-6)
    np.testing.assert_array_equal(ours[3], expected[3])


def test_a_graph_without_constant_dequantizations_is_unchanged():
    model = _graph()
    DequantizeConstantWeightsPass()(model)
    again = DequantizeConstantWeightsPass()(model)
    assert not again.modified and again.stats["replaced"] == 0
