"""The affine-transform algebra the ONNX lowering needs, in numpy.

Graph passes read a plan's transforms to fold them into norms or to write their inverses as
initializers. Doing that with torch inside an ONNX pass tied the graph side to PyTorch for four
lines of linear algebra; these functions take anything ``np.asarray`` accepts (a CPU tensor,
an array) and compute in float64, so folding is as exact as the plan that was saved.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_float64", "diagonal", "inverse", "is_diagonal"]


def as_float64(matrix) -> np.ndarray:
    return np.asarray(matrix, dtype=np.float64)


def is_diagonal(matrix) -> bool:
    """Exactly diagonal: a diagonal transform folds into a norm, a dense one cannot."""
    array = as_float64(matrix)
    return bool(np.count_nonzero(array - np.diag(np.diagonal(array))) == 0)


def diagonal(matrix) -> np.ndarray:
    return np.diagonal(as_float64(matrix)).copy()


def inverse(matrix) -> np.ndarray:
    """``A⁻¹`` in float64; the plan's guard keeps ``A`` strictly diagonally dominant, so it exists."""
    return np.linalg.inv(as_float64(matrix))
