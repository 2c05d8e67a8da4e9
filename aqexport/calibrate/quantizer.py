"""The uniform affine quantizer every method shares (ALGORITHMS.md §1–2).

One function serves weights (ranges per output channel or per group of input channels) and
activations (ranges per token): both are "quantize along the last axis in groups". Three
details matter and are easy to get wrong:

* **Ragged last group.** SmolLM2's hidden size 576 is 4.5 groups of 128. The last group is
  simply shorter: the tensor is padded by repeating its own last column, which cannot change
  that group's min or max, and the padding is cut off again. ONNX Runtime's RTN quantizer
  crashes on exactly this shape; MatMulNBits accepts a short last block.
* **The Δ floor is applied.** The public reference clamps Δ to 1e-5 and then uses the
  unclamped value; here the clamped value is the one used.
* **Straight-through rounding** (gradient of round = 1) so LWC parameters (γ, β, one pair per
  row-group, σ(4) ≈ 0.982 at init) and transforms can be trained through the quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DELTA_FLOOR",
    "QuantScheme",
    "dequantize_codes",
    "fake_quantize",
    "fake_quantize_with",
    "quantize_codes",
    "quantize_params",
    "round_ste",
]

DELTA_FLOOR = 1e-5


@dataclass(frozen=True)
class QuantScheme:
    bits: int
    group_size: int | None = None  # None: one range per row (per output channel / per token)
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def num_groups(self, columns: int) -> int:
        return 1 if self.group_size is None else -(-columns // self.group_size)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _grouped(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, int]:
    """View ``x`` [..., C] as [..., G, g]; pad a ragged last group by repeating its last column."""
    columns = x.shape[-1]
    size = columns if scheme.group_size is None else scheme.group_size
    pad = scheme.num_groups(columns) * size - columns
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, size), pad


def quantize_params(
    x: torch.Tensor,
    scheme: QuantScheme,
    lwc_gamma: torch.Tensor | None = None,
    lwc_beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale Δ and zero point z per group, shaped [..., G, 1]; LWC logits shaped the same."""
    groups, _ = _grouped(x, scheme)
    xmax = groups.amax(dim=-1, keepdim=True)
    xmin = groups.amin(dim=-1, keepdim=True)
    if lwc_gamma is not None:
        xmax = torch.sigmoid(lwc_gamma) * xmax
    if lwc_beta is not None:
        xmin = torch.sigmoid(lwc_beta) * xmin
    if scheme.symmetric:
        scale = torch.maximum(xmax.abs(), xmin.abs()) / scheme.qmax
        return scale.clamp(min=DELTA_FLOOR), torch.zeros_like(scale)
    scale = ((xmax - xmin) / scheme.qmax).clamp(min=DELTA_FLOOR)
    zero = round_ste(-xmin / scale).clamp(scheme.qmin, scheme.qmax)
    return scale, zero


def fake_quantize(
    x: torch.Tensor,
    scheme: QuantScheme,
    lwc_gamma: torch.Tensor | None = None,
    lwc_beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize along the last axis: ``(clamp(round(x/Δ) + z) − z)·Δ``."""
    scale, zero = quantize_params(x, scheme, lwc_gamma, lwc_beta)
    groups, pad = _grouped(x, scheme)
    q = (round_ste(groups / scale) + zero).clamp(scheme.qmin, scheme.qmax)
    out = ((q - zero) * scale).reshape(*x.shape[:-1], -1)
    return out[..., : x.shape[-1]] if pad else out


def fake_quantize_with(x: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize with a given (static) scale and zero point, broadcast against ``x``."""
    q = (round_ste(x / scale) + zero).clamp(scheme.qmin, scheme.qmax)
    return (q - zero) * scale


def quantize_codes(x: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integer codes [..., C] (uint8, or int8 when symmetric) for given per-group scale/zero [..., G, 1]."""
    groups, pad = _grouped(x, scheme)
    q = (torch.round(groups / scale) + zero).clamp(scheme.qmin, scheme.qmax).reshape(*x.shape[:-1], -1)
    q = q[..., : x.shape[-1]] if pad else q
    return q.to(torch.int8 if scheme.symmetric else torch.uint8)


def dequantize_codes(codes: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q − z)·Δ`` with Δ, z per group [..., G] (float32 result)."""
    columns = codes.shape[-1]
    groups, pad = _grouped(codes.float(), scheme)
    out = ((groups - zero.float()[..., None]) * scale.float()[..., None]).reshape(*codes.shape[:-1], -1)
    return out[..., :columns] if pad else out
