"""Each quantized linear's input and output range in the calibrated model: the static 16-bit
activation scales of the QNN artifact (``passes/uint16_activations.py``).

Qualcomm's NPU (QNN's HTP backend) runs a ``MatMul`` in integers only as a whole QDQ unit: its
weight's ``DequantizeLinear``, its input's and its output's ``QuantizeLinear → DequantizeLinear``.
With float activations the weights' ``DequantizeLinear`` stay on the phone's CPU (measured with
``onnxruntime-qnn``'s offline compile: 91 % of a tiny Llama's nodes on the NPU, 100 % with
16-bit activation QDQ around each linear). The format QNN documents for LLMs is exactly that:
blocked 4/8-bit weights, 16-bit activations (w4a16).

The ranges are observed, not learned: min and max over a few calibration windows through the
calibrated (fake-quant) model, where each linear sees what its ``MatMul`` sees in the graph (the
transform's inverse is applied by the plan's input hooks before the forward hook reads the
input) and its output without its bias (the graph adds the bias after the ``MatMul``). Each
range always holds 0 and is widened by ``MARGIN`` of its width on both sides. Plain min/max
(``MARGIN = 0``, ONNX Runtime's MinMax calibrator does the same) measured best: SmolLM2's
massive activations (the first tokens' ``down_proj`` inputs reach 2900 in two layers, where the
typical value is under 7) already make those tensors' 16-bit steps coarse, and widening makes
them coarser. SmolLM2 AffineQuant w4a16g128, WikiText-2 test 4 × 512 through the prefill graph,
against the fake-quant model's 28.216: margin 0 → 28.219, 0.03 → 28.275, 0.1 → 28.262,
1.0 → 28.429; no value of that text fell outside the ranges. Text that goes beyond them clips
(a tiny random model's verification prompt does: its logits are 1e-2 off, its tokens equal).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MARGIN", "ActivationRange", "linear_activation_ranges"]

#: How far each observed range is widened on each side, as a fraction of its width.
MARGIN = 0.0


@dataclass(frozen=True)
class ActivationRange:
    """Observed ``[lo, hi]`` of a linear's input and of its ``x Wᵀ`` (no bias), widened."""

    input_lo: float
    input_hi: float
    output_lo: float
    output_hi: float


def _widened(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    width = max(hi - lo, 1e-6)
    return lo - MARGIN * width, hi + MARGIN * width


def linear_activation_ranges(
    model: nn.Module, paths: Iterable[str], windows: torch.Tensor
) -> dict[str, ActivationRange]:
    """``{path: range}`` for the ``nn.Linear`` modules at ``paths``, over ``windows`` [N, L] token
    ids (one window per forward)."""
    observed: dict[str, list[float]] = {}
    handles = []

    def observer(path: str):
        def observe(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            y = output.detach() if module.bias is None else output.detach() - module.bias.detach()
            seen = [float(x.min()), float(x.max()), float(y.min()), float(y.max())]
            if path in observed:
                old = observed[path]
                seen = [min(old[0], seen[0]), max(old[1], seen[1]), min(old[2], seen[2]), max(old[3], seen[3])]
            observed[path] = seen

        return observe

    for path in paths:
        handles.append(model.get_submodule(path).register_forward_hook(observer(path)))
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {
        path: ActivationRange(*_widened(lo_in, hi_in), *_widened(lo_out, hi_out))
        for path, (lo_in, hi_in, lo_out, hi_out) in observed.items()
    }
