"""LLM.int8 outlier split: the lowered graph and the fake-quant model both equal
``int8(non-outlier) + fp(outlier)`` computed in numpy with integer matmuls, in both modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx_ir import node

from aqexport.calibrate.outliers import OutlierSplit, quantize_with_outliers, split_outlier_columns
from aqexport.calibrate.recipe import LLM_INT8_SCHEME
from aqexport.calibrate.statistics import ChannelStats
from aqexport.passes import ActivationQuantPass, QuantizeWeightsPass
from aqexport.target import Target
from tests.passes._plans import float_input, initializer, linear_plan, model_of, one_block_plan, run

IN, OUT, TAU = 64, 24, 6.0
CALIBRATION_OUTLIERS = [3, 17, 40]


def _entry(weight: torch.Tensor, mode: str):
    outliers = torch.zeros(IN, dtype=torch.long)
    outliers[CALIBRATION_OUTLIERS] = 5
    stats = ChannelStats(torch.ones(IN), torch.zeros(IN), outliers, tokens=100)
    quantized, channels, columns = split_outlier_columns(weight, stats, mode)
    return linear_plan(
        quantized,
        LLM_INT8_SCHEME,
        activation=LLM_INT8_SCHEME,
        outlier=OutlierSplit(mode, TAU, channels),
        outlier_weight=columns,
    )


def _graph(weight: torch.Tensor):
    x = float_input("x", ["batch", "seq", IN])
    w = initializer("layers.0.fc.weight", weight.T.numpy())
    matmul = node("MatMul", [x, w], name="/layers.0/fc/MatMul")
    matmul.outputs[0].name = "y"
    return model_of([matmul], [x], [matmul.outputs[0]], [w])


def _numpy_reference(x: np.ndarray, weight: np.ndarray, entry, mode: str) -> np.ndarray:
    """int8 codes × int8 codes accumulated in int64, rescaled, plus the float outlier part."""
    if mode == "static":
        outliers = np.asarray(CALIBRATION_OUTLIERS)
        fp_columns = weight[:, outliers]
    else:
        outliers = np.nonzero(np.abs(x).reshape(-1, IN).max(0) >= TAU)[0]
        fp_columns = (entry.codes.numpy().astype(np.float32) * entry.scale.numpy())[:, outliers]
    inlier = np.setdiff1d(np.arange(IN), outliers)
    xi = x[..., inlier]
    x_scale = np.maximum(np.abs(xi).max(-1, keepdims=True) / np.float32(127), np.float32(1e-5)).astype(np.float32)
    x_codes = np.clip(np.round(xi / x_scale), -128, 127).astype(np.int64)
    w_codes = entry.codes.numpy().astype(np.int64)[:, inlier]
    int8 = (x_codes @ w_codes.T).astype(np.float64) * x_scale * entry.scale.numpy().reshape(1, -1)
    return int8 + x[..., outliers].astype(np.float64) @ fp_columns.T.astype(np.float64)


def _inputs(outlier_columns: list[int]) -> np.ndarray:
    x = np.random.default_rng(3).standard_normal((2, 5, IN)).astype(np.float32)
    x[..., outlier_columns] *= 12.0  # |x| well above τ somewhere in these columns
    return x


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("columns", [[3, 17, 40], [5, 40], []])  # calibration's set, another one, none
def test_lowered_split_equals_int8_plus_fp_in_numpy(mode, columns):
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN)
    entry = _entry(weight, mode)
    plan = one_block_plan({"fc": entry})
    model = _graph(weight)
    ActivationQuantPass(plan)(model)
    QuantizeWeightsPass(plan.linears(), Target(accuracy_level=0))(model)  # float activations in MatMulNBits
    ops = [node.op_type for node in model.graph]
    assert ("GreaterOrEqual" in ops) == (mode == "dynamic") and "MatMulNBits" in ops
    assert ("Gather" in ops) == (mode == "static")
    x = _inputs(columns)
    expected = _numpy_reference(x, weight.numpy(), entry, mode)
    np.testing.assert_allclose(run(model, x=x), expected, rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fake_quant_model_computes_the_same_split(mode):
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN)
    entry = _entry(weight, mode)
    x = _inputs([5, 40])
    ours = quantize_with_outliers(torch.from_numpy(x), LLM_INT8_SCHEME, entry.outlier) @ entry.effective_weight().T
    np.testing.assert_allclose(ours.numpy(), _numpy_reference(x, weight.numpy(), entry, mode), rtol=2e-5, atol=2e-4)
