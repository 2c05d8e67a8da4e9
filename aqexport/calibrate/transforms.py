"""AffineQuant's learnable matrices: gradual mask, diagonal-dominance guard, float64 inverses.

``A = S ∘ M_e`` (ALGORITHMS.md §4). The band of ``M_e`` widens each epoch from the diagonal alone
(epoch 0, OmniQuant-like) to the full matrix (last epoch); off-diagonal entries are damped by
the stability factor ``sf``. The reference never checks invertibility; here every optimizer
step ends with ``enforce_dominance_``, which shrinks the off-diagonal entries of any row whose
Levy–Desplanques margin ``|a_ii| − Σ_{j≠i}|a_ij|`` fell below ``margin·|a_ii|``. A strictly
diagonally dominant matrix is invertible, so every ``A`` used or folded is invertible by
construction, not by luck. Matrices may be batched (``[..., n, n]``: one block per KV head).
"""

from __future__ import annotations

import torch

__all__ = [
    "DIAGONAL_FLOOR",
    "band_width",
    "dominance_margin",
    "enforce_dominance_",
    "enforce_rotary_dominance_",
    "gradual_mask",
    "matrix_report",
]

DIAGONAL_FLOOR = 1e-2  # the reference's fp16 guard: no diagonal entry closer to 0 than this


def band_width(epoch: int, epochs: int, n_max: int) -> int:
    """``n_e = ⌊(n_max − 1)·e/(E − 1)⌋ + 1``: 1 (diagonal only) at epoch 0, ``n_max`` at the end."""
    if epochs < 2:
        return n_max
    return (n_max - 1) * epoch // (epochs - 1) + 1


def gradual_mask(n: int, width: int, stability_factor: float, dtype=torch.float32) -> torch.Tensor:
    distance = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    mask = torch.where(distance < width, torch.tensor(stability_factor, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    mask.fill_diagonal_(1.0)
    return mask


def dominance_margin(matrix: torch.Tensor) -> torch.Tensor:
    """Per row ``(|a_ii| − Σ_{j≠i}|a_ij|) / |a_ii|``: positive means strictly dominant."""
    diagonal = matrix.diagonal(dim1=-2, dim2=-1).abs()
    off = matrix.abs().sum(-1) - diagonal
    return (diagonal - off) / diagonal.clamp(min=1e-30)


@torch.no_grad()
def enforce_dominance_(learned: torch.Tensor, mask: torch.Tensor, margin: float = 1e-2) -> int:
    """Make ``learned ∘ mask`` strictly diagonally dominant with relative ``margin``; in place.

    Returns how many rows had to be shrunk. The diagonal is also kept at least
    ``DIAGONAL_FLOOR`` away from zero, keeping its sign.
    """
    diag = learned.diagonal(dim1=-2, dim2=-1)
    sign = torch.where(diag < 0, -1.0, 1.0).to(diag.dtype)
    diag.copy_(sign * diag.abs().clamp(min=DIAGONAL_FLOOR))
    effective = learned * mask
    diagonal = effective.diagonal(dim1=-2, dim2=-1).abs()
    off = effective.abs().sum(-1) - diagonal
    allowed = diagonal * (1.0 - margin)
    violating = off > allowed
    if not bool(violating.any()):
        return 0
    factor = torch.where(violating, allowed / off.clamp(min=1e-30), torch.ones_like(off))
    eye = torch.eye(learned.shape[-1], dtype=torch.bool)
    scale = torch.where(eye, torch.ones_like(learned), factor[..., :, None].expand_as(learned))
    learned.mul_(scale)
    return int(violating.sum())


@torch.no_grad()
def enforce_rotary_dominance_(coefficients: torch.Tensor, margin: float = 1e-2) -> int:
    """The same guarantee for q·k transforms stored as ``[..., 2, d/2]`` pairs ``(a, b)``.

    Each rotary pair's 2×2 block is ``[[a, b], [−b, a]]``, so row dominance is ``|b| < |a|``:
    ``|a|`` is floored like any diagonal, then ``|b|`` is capped at ``(1 − margin)·|a|``.
    """
    a, b = coefficients.unbind(-2)
    sign = torch.where(a < 0, -1.0, 1.0).to(a.dtype)
    a.copy_(sign * a.abs().clamp(min=DIAGONAL_FLOOR))
    limit = a.abs() * (1.0 - margin)
    violating = b.abs() > limit
    b.copy_(torch.where(violating, b.sign() * limit, b))
    return int(violating.sum())


@torch.no_grad()
def matrix_report(matrix: torch.Tensor, learned: torch.Tensor | list[torch.Tensor] | None = None) -> dict[str, float]:
    """Minimum dominance margin, worst condition number and ``‖A A⁻¹ − I‖_max`` (float64).

    ``learned`` is the guarded factor (or factors: blocks, Kronecker factors) when ``matrix`` is a
    product with a fixed positive diagonal (norm-group transforms): their margin is the one that
    guarantees invertibility. A diagonal ``A`` may come as its diagonal (the default norm-side
    form): its figures are then exact and cost d, where the dense ones cost a float64 d³
    inverse, an SVD and a d³ product per norm of every frozen block.
    """
    a = matrix.double()
    guarded = [a] if learned is None else learned if isinstance(learned, list) else [learned]
    if a.ndim == 1:  # a diagonal A as its diagonal (``fold.BlockTransforms``): no d³ inverse or SVD
        margin = min(float(dominance_margin(g.double()).min()) for g in guarded) if learned is not None else 1.0
        return {
            "min_dominance_margin": margin,
            "condition_number": float(a.abs().max() / a.abs().min()),
            "inverse_error": float((a * a.reciprocal() - 1.0).abs().max()),
        }
    inverse = torch.linalg.inv(a)
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    return {
        "min_dominance_margin": min(float(dominance_margin(g.double()).min()) for g in guarded),
        "condition_number": float(torch.linalg.cond(a).max()),
        "inverse_error": float((a @ inverse - eye).abs().max()),
    }
