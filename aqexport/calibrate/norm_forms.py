"""Norm-side transform forms: the learned ``S`` of ``A = (S ∘ M)·diag(s₀)`` as dense, diagonal,
block-diagonal or Kronecker (``docs/transforms.md``).

A dense ``A⁻¹`` cannot fold into an RMSNorm (its weight is diagonal), so the graph carries it at
run time: ``d²`` multiply-adds per token and norm. Constraining ``S`` keeps the same engine,
gradual mask and Levy–Desplanques guard, applied per *factor*:

* ``dense``: one ``[d, d]`` factor (the AffineQuant of the paper);
* ``diagonal``: the same factor under a width-1 mask for good, so ``A`` is diagonal and folds
  into the norm's weight (zero run-time ops, as omniquant's does);
* ``block_diagonal``: factor ``[d/k, k, k]``, ``S = blockdiag(S_1..S_m)``; the band widens
  inside each block and each block is kept strictly dominant (a block-diagonal matrix is
  invertible iff every block is);
* ``kronecker``: factors ``[d₁, d₁]`` and ``[d₂, d₂]``, ``S = S₁ ⊗ S₂`` (FlatQuant), each under
  its own mask and guard; ``(S₁ ⊗ S₂)⁻¹ = S₁⁻¹ ⊗ S₂⁻¹``, so dominance of both suffices.

Training and the frozen plan use the dense ``A`` this composes (``fold.py`` and the input hooks
need nothing new); the plan also records the form, ``s₀`` and the masked factors in float64
(``NormStructure``), from which the lowering writes the structured inverse and the frozen
``A`` is composed, so both sides hold bit-identical values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from aqexport.calibrate.plan_schema import stored
from aqexport.calibrate.transforms import band_width, enforce_dominance_, gradual_mask
from aqexport.errors import ConfigError

__all__ = [
    "NormStructure",
    "NormTransform",
    "compose",
    "default_block",
    "factor_shapes",
    "kronecker_factors",
]

DEFAULT_BLOCK = 64  # the largest block size the default picks (a divisor of d at most this)


@dataclass
class NormStructure:
    """How a plan's norm-side ``A`` is built: ``A = S · diag(scales)``, ``S`` from ``factors``
    (``block_diagonal``: ``[blocks [m, k, k]]``; ``kronecker``: ``[S₁, S₂]``; ``dense`` and
    ``diagonal``: none, ``A`` itself is the plan's ``norm_transforms`` entry, the diagonal as
    its vector)."""

    form: str
    scales: torch.Tensor = field(metadata=stored(torch.float64))  # s₀ [d]
    factors: list[torch.Tensor] = field(default_factory=list, metadata=stored(torch.float64))

    def matrix(self) -> torch.Tensor:
        """The dense float64 ``A`` (structured forms only): what the frozen plan stores."""
        return compose(self.form, self.factors) * self.scales[None, :]


def compose(form: str, factors: list[torch.Tensor]) -> torch.Tensor:
    """Dense ``S`` from its factors, differentiably (``torch.kron`` is ``np.kron``'s order)."""
    if form == "block_diagonal":
        return torch.block_diag(*factors[0].unbind(0))
    if form == "kronecker":
        return torch.kron(factors[0], factors[1])
    return factors[0]


def default_block(width: int) -> int:
    """The largest divisor of ``width`` not above 64 (576 → 64, 64 → 64, 900 → 60)."""
    return max(k for k in range(1, min(width, DEFAULT_BLOCK) + 1) if width % k == 0)


def kronecker_factors(width: int) -> tuple[int, int]:
    """``(d₁, d / d₁)`` with ``d₁`` the divisor of ``d`` closest to ``√d`` (the smaller on a tie):
    the split that minimises ``d₁ + d₂``, the run-time cost per channel."""
    root = math.sqrt(width)
    first = min((k for k in range(1, width + 1) if width % k == 0), key=lambda k: (abs(k - root), k))
    return first, width // first


def factor_shapes(
    form: str, width: int, block: int | None, factors: tuple[int, int] | None, where: str
) -> list[tuple[int, ...]]:
    """The learned factors' shapes for a ``width``-channel norm group; a block size or factor
    pair that does not fit ``width`` is one ``ConfigError`` naming the key and the group."""
    if form == "block_diagonal":
        size = default_block(width) if block is None else block
        if width % size:
            raise ConfigError(
                f"quantization.transform_block {size} does not divide the {width} channels of '{where}'",
                f"use a divisor of {width} (or leave transform_block out for {default_block(width)})",
            )
        return [(width // size, size, size)]
    if form == "kronecker":
        first, second = kronecker_factors(width) if factors is None else factors
        if first * second != width:
            raise ConfigError(
                f"quantization.transform_factors {first}×{second} is not the {width} channels of '{where}'",
                f"use two factors whose product is {width} (or leave transform_factors out)",
            )
        return [(first, first), (second, second)]
    return [(width, width)]


def _identity(shape: tuple[int, ...]) -> torch.Tensor:
    size = shape[-1]
    return torch.eye(size).expand(*shape).clone()


class NormTransform(nn.Module):
    """The learned factors of one norm group's ``S``, each starting at the identity."""

    def __init__(self, form: str, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.form = form
        self.factors = nn.ParameterList([nn.Parameter(_identity(shape)) for shape in shapes])

    def masks(self, epoch: int, epochs: int, stability_factor: float) -> list[torch.Tensor]:
        """``M_e`` per factor (broadcast over a block batch): width 1 for good when diagonal."""
        masks = []
        for factor in self.factors:
            size = factor.shape[-1]
            width = 1 if self.form == "diagonal" else band_width(epoch, epochs, size)
            masks.append(gradual_mask(size, width, stability_factor))
        return masks

    def learned(self, masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """``S_i ∘ M_i``: the factors the guard keeps strictly diagonally dominant."""
        return [factor * mask for factor, mask in zip(self.factors, masks)]

    def matrix(self, masks: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        """``A = S · diag(s₀)`` (dense, differentiable)."""
        return compose(self.form, self.learned(masks)) * base[None, :]

    def operand(self, masks: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        """``A`` as the weights and inputs use it (differentiable): the diagonal form as its
        diagonal, a vector that ``fold`` and ``input_hooks`` multiply elementwise, other forms
        dense. The same entries as ``matrix``, product for product. As a d × d matrix the
        diagonal form cost a d³ product per norm-fed linear and a d³ inverse per norm at every
        training step, and again in the float64 freeze: a 7B-shaped block (d = 4096, one
        256-token window, two epochs) calibrated in 143 s, and in 46 s with the vector."""
        if self.form == "diagonal":
            return torch.diagonal(self.factors[0]) * torch.diagonal(masks[0]) * base
        return self.matrix(masks, base)

    @torch.no_grad()
    def guard_(self, masks: list[torch.Tensor], margin: float) -> int:
        """Levy–Desplanques per factor (per block of a block batch); rows shrunk."""
        return sum(
            enforce_dominance_(factor.data, mask.to(factor.dtype), margin) for factor, mask in zip(self.factors, masks)
        )

    @torch.no_grad()
    def structure(self, masks: list[torch.Tensor], base: torch.Tensor) -> NormStructure:
        """The float64 record of this transform for the plan (factors only where structured)."""
        scales = base.detach().to(torch.float64)
        if self.form not in ("block_diagonal", "kronecker"):
            return NormStructure(self.form, scales)
        factors = [(f.detach().double() * m.double()) for f, m in zip(self.factors, masks)]
        return NormStructure(self.form, scales, factors)
