"""GPTQ for the LM head: lower output error than RTN on correlated inputs, RTN itself when the
inputs are uncorrelated, and codes that lower like any other plan's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from aqexport.calibrate import gptq
from aqexport.calibrate.edges import head_input_hessian, quantize_lm_head
from aqexport.calibrate.gptq import gptq_codes, gptq_quantize, input_hessian
from aqexport.calibrate.quantizer import QuantScheme, fake_quantize, quantize_params
from tests.tiny_models import CONFIGS


def _correlated_inputs(rows: int, columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    scales = torch.logspace(-1, 1, columns)  # a few channels dominate, as in a decoder's hidden state
    return (torch.randn(rows, columns, generator=generator) * scales) @ mixing + 0.3


def _output_error(inputs: torch.Tensor, weight: torch.Tensor, approximation: torch.Tensor) -> float:
    return (inputs @ (weight - approximation).T).pow(2).mean().item()


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, symmetric=True), QuantScheme(4, 16), QuantScheme(3, 24)])
def test_gptq_beats_rtn_on_the_output_error(scheme):
    torch.manual_seed(1)
    weight = torch.randn(96, 80)
    inputs = _correlated_inputs(2048, 80)
    entry = gptq_quantize(weight, input_hessian(inputs), scheme)
    assert entry.codes.shape == weight.shape and entry.scale.shape == (96, scheme.num_groups(80))
    assert int(entry.codes.min()) >= scheme.qmin and int(entry.codes.max()) <= scheme.qmax
    gptq_error = _output_error(inputs, weight, entry.dequantize())
    rtn_error = _output_error(inputs, weight, fake_quantize(weight, scheme))
    assert gptq_error < 0.7 * rtn_error


def test_the_heads_gptq_in_row_chunks_gives_the_same_bits(monkeypatch):
    """The head is quantized ``ROW_CHUNK`` rows at a time (the whole of SmolLM2's took 0.5 GB);
    rows are independent, so chunks of 7 (the last one short) give what one chunk gives."""
    torch.manual_seed(2)
    weight = torch.randn(100, 64)
    hessian = input_hessian(_correlated_inputs(512, 64))
    for scheme in (QuantScheme(8, 32), QuantScheme(4, 16, symmetric=True)):
        whole = gptq_quantize(weight, hessian, scheme)
        monkeypatch.setattr(gptq, "ROW_CHUNK", 7)
        chunked = gptq_quantize(weight, hessian, scheme)
        monkeypatch.undo()
        for name in ("codes", "scale", "zero"):
            assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
        assert chunked.codes.dtype == whole.codes.dtype


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With a diagonal H no error can be moved to another column, so GPTQ must reduce to RTN."""
    torch.manual_seed(2)
    weight = torch.randn(32, 64)
    scheme = QuantScheme(4, 16)
    entry = gptq_quantize(weight, torch.diag(torch.rand(64, dtype=torch.float64) + 0.5), scheme)
    torch.testing.assert_close(entry.dequantize(), fake_quantize(weight, scheme), rtol=0, atol=1e-6)


def test_fixed_grid_gptq_beats_nearest_and_act_order_stays_on_the_grid():
    """On a fixed per-group grid (a block's learned clipping), GPTQ in natural and in act order
    (columns by decreasing input energy) keeps every code in range on the original groups and
    lowers the output error below nearest rounding; act order lowers it further here, where a few
    channels dominate (_correlated_inputs), as on SmolLM2."""
    torch.manual_seed(3)
    scheme = QuantScheme(4, 16)
    weight = torch.randn(64, 80)
    inputs = _correlated_inputs(4096, 80)[:, torch.randperm(80)]  # energetic columns scattered
    grouped = weight.reshape(64, 5, 16)
    scale, zero = quantize_params(grouped, QuantScheme(4, None))
    scale, zero = scale.reshape(64, 5), zero.reshape(64, 5)

    def dequantized(codes: torch.Tensor) -> torch.Tensor:
        return ((codes.double().reshape(64, 5, 16) - zero[..., None]) * scale[..., None]).reshape(64, 80).float()

    nearest = (torch.round(grouped / scale[..., None]) + zero[..., None]).clamp(scheme.qmin, scheme.qmax)
    errors = {"nearest": _output_error(inputs, weight, dequantized(nearest.reshape(64, 80)))}
    for act_order in (False, True):
        codes = gptq_codes(weight, input_hessian(inputs), scheme, scale, zero, act_order=act_order)
        assert int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax
        errors[act_order] = _output_error(inputs, weight, dequantized(codes))
    assert errors[True] < errors[False] < 0.8 * errors["nearest"], errors


def test_lm_head_gptq_uses_the_head_inputs():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["qwen2"]()).eval()  # untied head
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    captured = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    handle.remove()
    inputs = torch.cat(captured, dim=1)[0]
    hessian = head_input_hessian(model, windows)
    torch.testing.assert_close(hessian, input_hessian(inputs))
    weight = model.lm_head.weight.detach().clone()
    (entry,) = quantize_lm_head(model, "int4", "gptq", hessian).values()
    assert entry.scheme == QuantScheme(4, 32, symmetric=True)
    torch.testing.assert_close(model.lm_head.weight.detach(), entry.dequantize())  # the fake-quant reference
    assert _output_error(inputs, weight, entry.dequantize()) < _output_error(
        inputs, weight, fake_quantize(weight, entry.scheme)
    )
    with pytest.raises(ValueError, match="Hessian"):
        quantize_lm_head(model, "int4", "gptq", None)
