"""The shared uniform quantizer: levels, ragged groups, Δ floor, straight-through gradients."""

from __future__ import annotations

import pytest
import torch

from aqexport.calibrate.quantizer import DELTA_FLOOR, QuantScheme, fake_quantize, quantize_params


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_levels_and_error_bound(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    scheme = QuantScheme(bits, 64, symmetric)
    out = fake_quantize(w, scheme)
    scale, zero = quantize_params(w, scheme)
    levels = (out.reshape(16, 4, 64) / scale + zero).round()
    assert levels.min() >= scheme.qmin and levels.max() <= scheme.qmax
    # Every value is within half a step of its group's grid: the ranges cover min..max.
    err = (out - w).abs().reshape(16, 4, 64)
    assert torch.all(err <= scale / 2 + 1e-6)
    assert len(torch.unique(out[0, :64])) <= 2**bits


def test_ragged_last_group_equals_quantizing_it_alone():
    torch.manual_seed(1)
    w = torch.randn(8, 576)  # SmolLM2 hidden size: 4 full groups of 128 and one of 64
    scheme = QuantScheme(4, 128)
    out = fake_quantize(w, scheme)
    assert out.shape == w.shape
    tail = fake_quantize(w[:, 512:], QuantScheme(4, None))
    torch.testing.assert_close(out[:, 512:], tail)
    head = fake_quantize(w[:, :128], QuantScheme(4, None))
    torch.testing.assert_close(out[:, :128], head)


def test_constant_rows_use_the_delta_floor():
    w = torch.zeros(2, 32)
    scale, _ = quantize_params(w, QuantScheme(4))
    assert torch.all(scale == DELTA_FLOOR)
    assert torch.equal(fake_quantize(w, QuantScheme(4)), w)


def test_lwc_gradients_flow_through_rounding():
    torch.manual_seed(2)
    w = torch.randn(4, 64)
    scheme = QuantScheme(3, 32)
    gamma = torch.full((4, 2, 1), 4.0, requires_grad=True)
    beta = torch.full((4, 2, 1), 4.0, requires_grad=True)
    loss = (fake_quantize(w, scheme, gamma, beta) - w).pow(2).sum()
    loss.backward()
    assert gamma.grad is not None and gamma.grad.abs().sum() > 0
    assert beta.grad is not None and beta.grad.abs().sum() > 0


def test_per_token_activation_ranges():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 10.0, 20.0, 30.0]])
    out = fake_quantize(x, QuantScheme(8))
    torch.testing.assert_close(out, x, atol=30 / 255, rtol=0)
    with pytest.raises(ValueError):
        QuantScheme(1)
