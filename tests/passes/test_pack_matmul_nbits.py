"""PackMatMulNBitsPass: MatMulNBits nodes on one input with equal attributes become one node and a
Split, computing the same outputs on ONNX Runtime; anything else is left alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from aqexport.calibrate.quantizer import QuantScheme
from aqexport.errors import AqexportError
from aqexport.passes import PackMatMulNBitsPass, QuantizeWeightsPass
from aqexport.target import Target
from tests.passes._plans import float_input, initializer, linear_plan, model_of, one_block_plan, run_all

K = 64
#: q/k/v and wide share ``x``; wide has 8-bit codes (other ``bits``); o reads another input.
SCHEMES = {"q": QuantScheme(4, 32), "k": QuantScheme(4, 32), "v": QuantScheme(4, 32), "wide": QuantScheme(8, 32)}


def _quantized_graph() -> ir.Model:
    torch.manual_seed(0)
    x, other = float_input("x", ["batch", "seq", K]), float_input("other", ["batch", "seq", K])
    nodes, inits, outputs, linears = [], [], [], {}
    for name, source in [("q", x), ("k", x), ("v", x), ("wide", x), ("o", other)]:
        weight = torch.randn(16 if name != "k" else 8, K)
        linears[name] = linear_plan(weight, SCHEMES.get(name, QuantScheme(4, 32)))
        w = initializer(f"layers.0.{name}.weight", weight.T.numpy())
        nodes.append(ir.node("MatMul", [source, w], name=f"/layers.0/{name}/MatMul"))
        nodes[-1].outputs[0].name = f"y_{name}"
        inits.append(w)
        outputs.append(nodes[-1].outputs[0])
    model = model_of(nodes, [x, other], outputs, inits)
    QuantizeWeightsPass(one_block_plan(linears).linears(), Target(accuracy_level=0))(model)
    return model


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((2, 3, K)).astype(np.float32) for name in ("x", "other")}


def test_shared_input_nodes_are_packed_and_compute_the_same():
    model = _quantized_graph()
    expected = run_all(model, **_feeds())
    result = PackMatMulNBitsPass()(model)
    assert result.modified
    assert result.stats == {"groups": 1, "nodes_merged": 3}
    names = [f"/layers.0/{name}/MatMulNBits" for name in ("q", "k", "v")]
    assert result.manifest == {"fusions": {"packed_matmul_nbits": [names]}}
    matmuls = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert len(matmuls) == 3  # packed q/k/v, wide (8-bit), o (other input)
    packed = next(node for node in matmuls if node.name.endswith("/packed/MatMulNBits"))
    assert packed.attributes.get_int("N") == 16 + 8 + 16
    assert isinstance(packed.inputs[1].const_value, ir.LazyTensor)  # concatenated when written
    assert [output.name for output in model.graph.outputs] == ["y_q", "y_k", "y_v", "y_wide", "y_o"]
    for ours, reference in zip(run_all(model, **_feeds()), expected):
        np.testing.assert_array_equal(ours, reference)  # each column is the same dot product


def test_nothing_to_pack_reports_nothing():
    model = _quantized_graph()
    PackMatMulNBitsPass()(model)
    result = PackMatMulNBitsPass()(model)  # packed already: the same instance type finds no group
    assert not result.modified and result.stats == {"groups": 0, "nodes_merged": 0}
    assert result.manifest == {"fusions": {"packed_matmul_nbits": []}}


def test_ensures_finds_an_unpacked_pair():
    with pytest.raises(ir.passes.PostconditionError, match="not packed") as error:
        PackMatMulNBitsPass().ensures(_quantized_graph())
    assert isinstance(error.value, AqexportError)
