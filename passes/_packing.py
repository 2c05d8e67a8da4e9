"""Two 4-bit codes per byte, as ONNX Runtime's blocked contrib ops read them: element ``2i`` in
the low nibble, ``2i + 1`` in the high one, an odd tail padded with a zero nibble."""

from __future__ import annotations

import numpy as np

__all__ = ["pack_nibbles"]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """``codes`` [..., n] with values 0..15 → uint8 [..., ceil(n / 2)], packed along the last axis."""
    codes = codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
