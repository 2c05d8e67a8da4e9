"""The affine-transform algebra the ONNX lowering needs, in numpy.

Graph passes read a plan's transforms to fold them into norms or to write their inverses as
initializers. Doing that with torch inside an ONNX pass tied the graph side to PyTorch for a few
lines of linear algebra; these functions take anything ``np.asarray`` accepts (a CPU tensor,
an array) and compute in float64, so folding is as exact as the plan that was saved.

Structured norm-side transforms (``docs/transforms.md``) are ``A = S · diag(s₀)`` with ``S``
block-diagonal (``blocks [m, k, k]``) or a Kronecker product ``S₁ ⊗ S₂``. The engine keeps every
learned block / factor strictly diagonally dominant; ``require_dominant`` is the same
Levy–Desplanques test, repeated where a factor is about to be inverted into a graph, so a plan
edited by hand or made by other code cannot put a singular (or unguaranteed) inverse there.

A diagonal ``A`` may be given as its diagonal, a vector (how plan format 6 stores the diagonal
form: d floats instead of d², 32 KiB instead of 128 MiB per norm at hidden 4096); every function
here reads that vector as the diagonal matrix it stands for.
"""

from __future__ import annotations

import numpy as np

from aqexport.errors import AqexportError

__all__ = [
    "NORM_FORMS",
    "as_float64",
    "block_diagonal",
    "compose",
    "diagonal",
    "dominance_margins",
    "inverse",
    "is_diagonal",
    "require_dominant",
]

#: The norm-side transform forms a plan can record (``BlockPlan.norm_structures``).
NORM_FORMS = ("dense", "diagonal", "block_diagonal", "kronecker")


def as_float64(matrix) -> np.ndarray:
    return np.asarray(matrix, dtype=np.float64)


def is_diagonal(matrix) -> bool:
    """Exactly diagonal: a diagonal transform folds into a norm, a dense one cannot."""
    array = as_float64(matrix)
    if array.ndim == 1:
        return True
    return bool(np.count_nonzero(array - np.diag(np.diagonal(array))) == 0)


def diagonal(matrix) -> np.ndarray:
    array = as_float64(matrix)
    return array.copy() if array.ndim == 1 else np.diagonal(array).copy()


def inverse(matrix) -> np.ndarray:
    """``A⁻¹`` in float64 (batched over leading axes); the plan's guard keeps every inverted
    matrix strictly diagonally dominant, so it exists."""
    return np.linalg.inv(as_float64(matrix))


def block_diagonal(blocks) -> np.ndarray:
    """``blockdiag(B_1, …, B_m)`` of ``blocks [m, k, k]``: the dense ``[m·k, m·k]`` matrix."""
    blocks = as_float64(blocks)
    count, size, _ = blocks.shape
    dense = np.zeros((count * size, count * size))
    for index, block in enumerate(blocks):
        dense[index * size : (index + 1) * size, index * size : (index + 1) * size] = block
    return dense


def compose(form: str, scales, factors) -> np.ndarray:
    """The dense ``A = S · diag(s₀)`` a structured plan entry describes (``np.kron`` order for
    Kronecker factors: ``(S₁ ⊗ S₂)[i₁·d₂ + i₂, j₁·d₂ + j₂] = S₁[i₁, j₁] · S₂[i₂, j₂]``)."""
    if form == "block_diagonal":
        (blocks,) = factors
        learned = block_diagonal(blocks)
    elif form == "kronecker":
        left, right = factors
        learned = np.kron(as_float64(left), as_float64(right))
    else:
        raise ValueError(f"'{form}' has no factors to compose")
    return learned * as_float64(scales)[None, :]


def dominance_margins(matrix) -> np.ndarray:
    """Per row ``(|a_ii| − Σ_{j≠i}|a_ij|) / |a_ii|`` (batched ``[..., n, n]``): positive means
    strictly dominant; a zero diagonal gives a margin ≤ 0 whatever the rest of its row. A vector
    is a diagonal matrix: margin 1 where its entry is non-zero."""
    magnitudes = np.abs(as_float64(matrix))
    if magnitudes.ndim == 1:
        return np.where(magnitudes > 0, 1.0, -np.inf)
    diagonal_part = np.diagonal(magnitudes, axis1=-2, axis2=-1)
    off = magnitudes.sum(-1) - diagonal_part
    with np.errstate(divide="ignore", invalid="ignore"):
        margins = (diagonal_part - off) / diagonal_part
    return np.where(diagonal_part > 0, margins, -np.inf)


def require_dominant(matrix, what: str) -> None:
    """Refuse ``matrix`` (or each ``[n, n]`` of a batch) unless every row is strictly diagonally
    dominant: Levy–Desplanques is what guarantees the inverse the graph is about to carry."""
    margins = dominance_margins(matrix)
    if bool((margins > 0).all()):
        return
    worst = np.unravel_index(int(np.argmin(margins)), margins.shape)
    where = f"block {worst[0]}, row {worst[1]}" if len(worst) == 2 else f"row {worst[-1]}"
    raise AqexportError(
        f"{what} is not strictly diagonally dominant ({where}: margin {float(margins[worst]):.3g}), so its "
        "inverse is not guaranteed to exist",
        "recalibrate the plan: the calibration engine keeps every learned block and factor strictly dominant",
    )
