"""QuantizeWeightsPass: MatMulNBits dequantizes to exactly the plan's weights, per numbered rule."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from aqexport.calibrate.quantizer import QuantScheme
from aqexport.errors import AqexportError
from aqexport.passes.quantize_weights import QuantizeWeightsPass, pack_matmul_nbits
from aqexport.target import Target
from tests.passes._plans import float_input, initializer, linear_plan, model_of, one_block_plan, run

#: Float activations everywhere (the auto level would run 8-bit weights at level 4: int8 inputs).
FLOAT_ACTIVATIONS = Target(accuracy_level=0)


def _matmul_graph(weight: torch.Tensor, bias: np.ndarray | None = None, gemm: bool = False):
    out_features, in_features = weight.shape
    x = float_input("x", ["batch", in_features] if gemm else ["batch", "seq", in_features])
    w = initializer("layers.0.fc.weight", weight.numpy() if gemm else weight.T.numpy())
    inits = [w]
    if gemm:
        inputs = [x, w]
        if bias is not None:
            b = initializer("shared.bias", bias)
            inits.append(b)
            inputs.append(b)
        node = ir.node("Gemm", inputs, {"transB": 1}, name="/layers.0/fc/Gemm")
        nodes = [node]
    else:
        node = ir.node("MatMul", [x, w], name="/layers.0/fc/MatMul")
        nodes = [node]
        if bias is not None:
            b = initializer("shared.bias", bias)
            inits.append(b)
            nodes.append(ir.node("Add", [node.outputs[0], b], name="/layers.0/fc/Add"))
    out = nodes[-1].outputs[0]
    out.name = "y"
    return model_of(nodes, [x], [out], inits)


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(4, 32),  # rule 3: K = 80 leaves a ragged last block of 16
        QuantScheme(4, None),  # rule 3: per channel as repeated blocks of 128
        QuantScheme(3, 16),  # rule 2: 3-bit codes in the 4-bit container
        QuantScheme(8, 64),  # rule 2: 8-bit
        QuantScheme(4, 32, symmetric=True),  # rule 2: signed codes offset by 8
    ],
)
@pytest.mark.parametrize("weight_format", ["matmul_nbits", "qdq"])  # rule 6: the portable form
def test_rule_1_to_3_and_6_weights_equal_dequantized_plan(scheme, weight_format):
    torch.manual_seed(0)
    weight = torch.randn(24, 80)
    entry = linear_plan(weight, scheme)
    model = _matmul_graph(weight)
    target = Target(weight_format=weight_format, accuracy_level=0)
    result = QuantizeWeightsPass(one_block_plan({"fc": entry}).linears(), target)(model)
    assert result.modified
    assert result.stats == {"linears": 1, "weight_format": weight_format, "integer_activations": 0}
    ops = [node.op_type for node in model.graph]
    expected_ops = ["MatMulNBits"] if weight_format == "matmul_nbits" else ["DequantizeLinear", "MatMul"]
    assert ops == expected_ops and "layers.0.fc.weight" not in {v.name for n in model.graph for v in n.inputs}
    if weight_format == "matmul_nbits":  # symmetric 4-bit codes use MatMulNBits's default zero point
        assert len(next(iter(model.graph)).inputs) == (3 if scheme.symmetric else 4)
    elif scheme.group_size is not None:  # rule 7: blocks that divide K (K = 80 in groups of 32: blocks of 16)
        block = next(iter(model.graph)).attributes.get_int("block_size")
        assert 80 % block == 0 and scheme.group_size % block == 0
    x = np.random.default_rng(0).standard_normal((2, 3, 80)).astype(np.float32)
    expected = x @ entry.dequantize().numpy().T
    np.testing.assert_allclose(run(model, x=x), expected, rtol=1e-5, atol=1e-5)


def test_packed_codes_are_made_when_the_writer_reads_them_and_equal_the_eager_packing():
    """Lowering holds no packed matrix (a 7B model's would be 3.4 GiB): ``B`` is a LazyTensor
    read from the plan when written; what it makes is ``pack_matmul_nbits``' bytes."""
    torch.manual_seed(0)
    weight = torch.randn(24, 80)
    entry = linear_plan(weight, QuantScheme(4, 32))
    model = _matmul_graph(weight)
    QuantizeWeightsPass(one_block_plan({"fc": entry}).linears(), FLOAT_ACTIVATIONS)(model)
    codes = model.graph.initializers["layers.0.fc.weight_Q4"].const_value
    assert isinstance(codes, ir.LazyTensor)
    assert codes.name == "layers.0.fc.weight_Q4" and list(codes.shape) == [24, 3, 16]
    np.testing.assert_array_equal(codes.numpy(), pack_matmul_nbits(entry, 32)[0])


def test_rule_1_gemm_keeps_its_bias_as_add():
    torch.manual_seed(1)
    weight, bias = torch.randn(8, 32), np.arange(8, dtype=np.float32)
    entry = linear_plan(weight, QuantScheme(4, 16))
    model = _matmul_graph(weight, bias, gemm=True)
    QuantizeWeightsPass(one_block_plan({"fc": entry}).linears(), FLOAT_ACTIVATIONS)(model)
    assert [node.op_type for node in model.graph] == ["MatMulNBits", "Add"]
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_allclose(run(model, x=x), x @ entry.dequantize().numpy().T + bias, rtol=1e-5, atol=1e-5)


def test_rule_4_planned_bias_gets_its_own_initializer():
    torch.manual_seed(2)
    weight, shared = torch.randn(8, 32), np.ones(8, dtype=np.float32)
    planned = torch.arange(8, dtype=torch.float64)
    entry = linear_plan(weight, QuantScheme(4, 16), bias=planned)
    model = _matmul_graph(weight, shared)
    QuantizeWeightsPass(one_block_plan({"fc": entry}).linears(), FLOAT_ACTIVATIONS)(model)
    assert "shared.bias" in model.graph.initializers  # left alone: another linear may share it
    x = np.random.default_rng(2).standard_normal((1, 4, 32)).astype(np.float32)
    expected = x @ entry.dequantize().numpy().T + planned.numpy()
    np.testing.assert_allclose(run(model, x=x), expected, rtol=1e-5, atol=1e-5)


def test_missing_linear_and_bad_group_size_are_one_clear_error():
    weight = torch.randn(8, 48)
    with pytest.raises(AqexportError, match="layers.0.other"):
        QuantizeWeightsPass(one_block_plan({"other": linear_plan(weight, QuantScheme(4, 16))}).linears())(
            _matmul_graph(weight)
        )
    with pytest.raises(AqexportError, match="power of two"):
        QuantizeWeightsPass(one_block_plan({"fc": linear_plan(weight, QuantScheme(4, 24))}).linears())(
            _matmul_graph(weight)
        )


def test_rule_5_auto_accuracy_level_is_the_targets_and_reaches_the_manifest():
    torch.manual_seed(3)
    weight = torch.randn(8, 32)
    linears = one_block_plan({"fc": linear_plan(weight, QuantScheme(8, 16))}).linears()
    result = QuantizeWeightsPass(linears, Target())(_matmul_graph(weight))
    assert next(iter(result.model.graph)).attributes.get_int("accuracy_level") == Target().accuracy_level_for(8) == 4
    assert result.manifest == {"quantization": {"integer_activation_linears": ["layers.0.fc"]}}
    result = QuantizeWeightsPass(linears, FLOAT_ACTIVATIONS)(_matmul_graph(weight))
    assert "accuracy_level" not in next(iter(result.model.graph)).attributes
    assert result.manifest == {"quantization": {"integer_activation_linears": []}}


def test_a_reused_pass_reports_each_call_alone():
    torch.manual_seed(4)
    weight = torch.randn(8, 32)
    quantize = QuantizeWeightsPass(one_block_plan({"fc": linear_plan(weight, QuantScheme(8, 16))}).linears())
    first, second = quantize(_matmul_graph(weight)), quantize(_matmul_graph(weight))
    assert first.stats == second.stats == {"linears": 1, "weight_format": "matmul_nbits", "integer_activations": 1}
    assert first.manifest == second.manifest == {"quantization": {"integer_activation_linears": ["layers.0.fc"]}}
