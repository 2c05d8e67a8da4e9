"""LLM.int8() (Dettmers et al., 2022): int8 matmuls with the outlier input channels kept in float.

``y = Q(x_¬O) · Ŵ_¬O + x_O · W_O``: the input channels ``O`` whose magnitude reaches τ (6.0) stay
in float; every other channel is quantized per token, symmetric int8 ("vector-wise"), against a
per-output-channel symmetric int8 weight. Two ways to choose ``O``:

* **dynamic** (bitsandbytes' semantics): at run time, per matmul call, ``O = {j : max |x_j| ≥ τ}``
  over every token of the call. bitsandbytes keeps only the int8 weight, so the float part uses the
  *dequantized* weight rows: ``W_O = Ŵ_O``. The weight's range covers all its input channels.
* **static**: ``O`` is fixed from calibration statistics (channels that reached τ on any
  calibration token), so shapes are fixed and an NPU graph needs no data-dependent ops; the float
  part keeps the *original* weight columns ``W_O``, and the int8 weight's ranges cover only the
  other channels (their codes are zero on ``O``).

Both are the same computation written once: ``x̂ = where(m, x, Q(where(m, 0, x)))`` (the outlier
channels pass through, the rest are quantized with their own per-token range) times an effective
weight whose columns on ``O`` are ``W_O``. The PyTorch fake-quant model and the ONNX lowering both
follow this form, which is what lets the artifact be verified against the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

import torch

from aqexport.calibrate.quantizer import QuantScheme, fake_quantize
from aqexport.calibrate.statistics import ChannelStats

__all__ = ["OUTLIER_MODES", "OutlierSplit", "outlier_mode", "quantize_with_outliers", "split_outlier_columns"]

OUTLIER_MODES = ("dynamic", "static")


@dataclass
class OutlierSplit:
    """How one linear's input is split: a fixed channel set, or a threshold applied at run time."""

    mode: str  # dynamic | static
    threshold: float
    channels: torch.Tensor | None = None  # static: int64 input-channel indices

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean [in]: which input channels of this call stay in float."""
        if self.mode == "static":
            mask = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
            mask[self.channels] = True
            return mask
        return x.detach().abs().reshape(-1, x.shape[-1]).amax(0) >= self.threshold


def outlier_mode(path: str, default: str, per_layer: dict[str, str]) -> str:
    """The mode for the linear at module ``path``: the first matching glob of ``per_layer``
    (``model.layers.*.mlp.down_proj``), else ``default``."""
    return next((mode for pattern, mode in per_layer.items() if fnmatch(path, pattern)), default)


def split_outlier_columns(
    weight: torch.Tensor, stats: ChannelStats, mode: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(weight to quantize, static outlier channels, their float columns [out, |O|])``.

    Static mode zeroes the outlier columns before quantization, so the int8 ranges are those of
    the channels the int8 path actually sees and the codes there dequantize to exactly zero."""
    if mode != "static":
        return weight, None, None
    channels = stats.outlier_channels()
    inlier = weight.clone()
    inlier[:, channels] = 0
    return inlier, channels, weight[:, channels].clone()


def quantize_with_outliers(x: torch.Tensor, scheme: QuantScheme, split: OutlierSplit) -> torch.Tensor:
    """``where(m, x, Q(where(m, 0, x)))`` with ``Q`` per token (outliers excluded from its range)."""
    mask = split.mask(x)
    inliers = torch.where(mask, torch.zeros_like(x), x)
    return torch.where(mask, x, fake_quantize(inliers, scheme))
