"""ActivationQuantPass: the ONNX quantizers compute the PyTorch fake quantizer, per rule."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from aqexport.calibrate.quantizer import QuantScheme, fake_quantize, fake_quantize_with, quantize_params
from aqexport.passes.activation_quant import ActivationQuantPass
from tests.passes._plans import float_input, initializer, linear_plan, model_of, one_block_plan, run

W = np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32)


def _graph() -> ir.Model:
    x = float_input("x", [1, 5, 16])
    nodes, inits, outs = [], [], []
    for name in ("a", "b"):  # two linears on one input, like q and k
        w = initializer(f"layers.0.{name}.weight", W.T)
        inits.append(w)
        nodes.append(ir.node("MatMul", [x, w], name=f"/layers.0/{name}/MatMul"))
        outs.append(nodes[-1].outputs[0])
    nodes.append(ir.node("Add", outs))
    nodes[-1].outputs[0].name = "y"
    return model_of(nodes, [x], [nodes[-1].outputs[0]], inits)


def _plan(activation: QuantScheme, static_range=None):
    extra = {} if static_range is None else {"act_scale": static_range[0], "act_zero": static_range[1]}
    entry = linear_plan(torch.from_numpy(W), QuantScheme(8, None), activation=activation, **extra)
    return one_block_plan({"a": entry, "b": entry})


X = (np.random.default_rng(4).standard_normal((1, 5, 16)) * np.linspace(0.1, 8, 16)).astype(np.float32)


@pytest.mark.parametrize("scheme", [QuantScheme(4, None), QuantScheme(8, None), QuantScheme(4, None, symmetric=True)])
def test_rule_1_dynamic_per_token_matches_the_fake_quantizer(scheme):
    model = _graph()
    result = ActivationQuantPass(_plan(scheme))(model)
    assert result.stats == {"quantizers": 1, "linears": 2}  # rule 4: a and b share x
    quantized = fake_quantize(torch.from_numpy(X), scheme).numpy()
    np.testing.assert_allclose(run(model, x=X), 2 * quantized @ W.T, rtol=1e-5, atol=1e-4)
    assert sum(node.op_type == "ReduceMax" for node in model.graph) == 1  # rule 3: one shared quantizer


@pytest.mark.parametrize("bits, qdq", [(8, True), (4, True), (3, False)])
def test_rule_2_static_per_tensor_uses_qdq_for_8_and_4_bits(bits, qdq):
    scheme = QuantScheme(bits, None)
    scale, zero = quantize_params(torch.tensor([[X.min() * 0.8, X.max() * 0.8]]), scheme)  # clipping exercised
    scale, zero = scale.reshape(()), zero.reshape(())
    model = _graph()
    ActivationQuantPass(_plan(scheme, (scale, zero)))(model)
    ops = {node.op_type for node in model.graph}
    assert ("QuantizeLinear" in ops) == qdq and "ReduceMax" not in ops
    quantized = fake_quantize_with(torch.from_numpy(X), scheme, scale, zero).numpy()
    np.testing.assert_allclose(run(model, x=X), 2 * quantized @ W.T, rtol=1e-5, atol=1e-4)
