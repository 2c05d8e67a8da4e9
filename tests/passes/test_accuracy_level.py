"""AccuracyLevelPass on two real 4-bit MatMulNBits: sets the level of the low-bit nodes only,
reports how many changed, and ONNX Runtime runs the result (level 0 reproduces the float-activation
products exactly, level 4 within int8 rounding)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from aqexport.passes import AccuracyLevelPass, QuantizeWeightsPass
from aqexport.target import Target
from tests.passes._plans import run_all
from tests.passes.test_lowering import _two_linears


def _levels(model: ir.Model) -> list[int]:
    return [n.attributes.get_int("accuracy_level", 0) for n in model.graph if n.op_type == "MatMulNBits"]


def test_sets_the_low_bit_nodes_and_reports_the_change():
    model, linears = _two_linears()
    QuantizeWeightsPass(linears, Target(accuracy_level=0))(model)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    exact = run_all(model, x=x)
    result = AccuracyLevelPass(4)(model)
    assert result.modified and result.stats == {"nodes": 2, "level": 4} and _levels(model) == [4, 4]
    fast = run_all(model, x=x)
    for ours, reference in zip(fast, exact):
        np.testing.assert_allclose(ours, reference, rtol=0.05, atol=0.05 * np.abs(reference).max())
    assert not AccuracyLevelPass(4)(model).modified  # already there
    back = AccuracyLevelPass(0)(model)
    assert back.stats["nodes"] == 2 and _levels(model) == [0, 0]
    for ours, reference in zip(run_all(model, x=x), exact):
        np.testing.assert_array_equal(ours, reference)


def test_leaves_wider_weights_alone():
    model, linears = _two_linears()
    QuantizeWeightsPass(linears, Target(accuracy_level=0))(model)
    assert not AccuracyLevelPass(4, max_bits=2)(model).modified and _levels(model) == [0, 0]
