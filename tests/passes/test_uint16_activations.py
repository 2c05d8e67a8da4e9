"""Uint16ActivationsPass: each QDQ linear's input and output go through a uint16 QDQ pair from its
range (one pair for linears sharing an input), a graph output keeps its name, ONNX Runtime's
outputs stay within the 16-bit steps, and a range for a linear the graph lacks is refused."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from aqexport.calibrate.activation_ranges import ActivationRange
from aqexport.calibrate.quantizer import QuantScheme
from aqexport.errors import AqexportError
from aqexport.passes import QuantizeWeightsPass, Uint16ActivationsPass
from aqexport.passes.uint16_activations import uint16_parameters
from aqexport.target import Target
from tests.passes._plans import float_input, initializer, linear_plan, model_of, one_block_plan, run_all

QDQ = Target(weight_format="qdq8", accuracy_level=0)


def _graph():
    """``x`` [1, 3, 32] → q and k (both read ``x``), then ``o`` on q's output; ``o`` is the graph output."""
    torch.manual_seed(0)
    weights = {name: torch.randn(32, 32) * 0.2 for name in ("q", "k", "o")}
    x = float_input("x", [1, 3, 32])
    inits = {name: initializer(f"layers.0.{name}.weight", w.numpy().T) for name, w in weights.items()}
    q = ir.node("MatMul", [x, inits["q"]], name="/layers.0/q/MatMul")
    k = ir.node("MatMul", [x, inits["k"]], name="/layers.0/k/MatMul")
    o = ir.node("MatMul", [q.outputs[0], inits["o"]], name="/layers.0/o/MatMul")
    k.outputs[0].name, o.outputs[0].name = "k_out", "y"
    model = model_of([q, k, o], [x], [o.outputs[0], k.outputs[0]], list(inits.values()))
    plan = one_block_plan({name: linear_plan(w, QuantScheme(4, 16)) for name, w in weights.items()})
    QuantizeWeightsPass(plan.linears(), QDQ)(model)
    return model


RANGES = {
    "layers.0.q": ActivationRange(-6.0, 6.0, -8.0, 8.0),
    "layers.0.k": ActivationRange(-6.0, 6.0, -8.0, 8.0),
    "layers.0.o": ActivationRange(-8.0, 8.0, -10.0, 10.0),
}


def test_linears_become_uint16_qdq_units_within_a_step():
    model = _graph()
    x = np.random.default_rng(0).standard_normal((1, 3, 32)).astype(np.float32)
    expected = run_all(model, x=x)
    result = Uint16ActivationsPass(RANGES)(model)
    assert result.stats == {"linears": 3, "input_pairs": 2}  # q and k share x's pair; o reads q's output pair
    assert result.manifest["quantization"]["activations"].startswith("uint16 per-tensor QDQ")
    quantizers = [node for node in model.graph if node.op_type == "QuantizeLinear"]
    assert len(quantizers) == 5 and {q.inputs[2].const_value.dtype for q in quantizers} == {ir.DataType.UINT16}
    assert [value.name for value in model.graph.outputs] == ["y", "k_out"]  # names kept on the pairs' outputs
    assert all(value.producer().op_type == "DequantizeLinear" for value in model.graph.outputs)
    ours = run_all(model, x=x)
    # each pair rounds by at most half a step; o also sees q's rounded output: a few steps in all
    step = uint16_parameters(-10.0, 10.0)[0]
    for value, reference in zip(ours, expected):
        assert np.abs(value - reference).max() <= 40 * step


def test_a_range_for_a_linear_the_graph_lacks_is_refused():
    model = _graph()
    with pytest.raises(AqexportError, match="layers.0.v"):
        Uint16ActivationsPass({**RANGES, "layers.0.v": ActivationRange(-1.0, 1.0, -1.0, 1.0)})(model)


def test_uint16_parameters_hold_zero_and_the_range():
    scale, zero = uint16_parameters(-2.0, 6.0)
    assert zero.dtype == np.uint16 and int(zero) == round(2.0 / float(scale))
    assert abs((0 - int(zero)) * float(scale) + 2.0) <= float(scale) and abs(
        (65535 - int(zero)) * float(scale) - 6.0
    ) <= float(scale)


def test_observed_ranges_are_of_the_input_and_of_the_output_without_bias():
    from torch import nn

    from aqexport.calibrate.activation_ranges import MARGIN, linear_activation_ranges

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.proj = nn.Embedding(16, 4), nn.Linear(4, 3)
            nn.init.constant_(self.proj.bias, 100.0)  # far outside the product's range: it must not count

        def forward(self, ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
            return self.proj(self.embed(ids))

    torch.manual_seed(0)
    model = Tiny()
    windows = torch.randint(0, 16, (3, 5))
    ((path, span),) = linear_activation_ranges(model, ["proj"], windows).items()
    with torch.no_grad():
        x = model.embed(windows)
        y = x @ model.proj.weight.T
    for lo, hi, values in ((span.input_lo, span.input_hi, x), (span.output_lo, span.output_hi, y)):
        low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
        width = high - low
        # float32 output − bias (100) rounds at ~1e-5
        assert path == "proj" and lo == pytest.approx(low - MARGIN * width, abs=1e-4)
        assert hi == pytest.approx(high + MARGIN * width, abs=1e-4)
