"""Preallocated KV buffers behind the ``past`` a decoder hands back: the host side of the two
in-place cache contracts (the shared-buffer GroupQueryAttention graph and the static npu step
graph).

A caller sees the cache as it always did, a list of ``[B, H, T, D]`` arrays holding exactly the
``T`` filled positions, so generation, perplexity and the parity checks run unchanged. Behind
them sit buffers with room for more positions, which the session writes into in place. When the
past that comes back is the one this decoder last returned (a decode loop), its buffers are used
again and nothing is copied per token; any other past (an earlier one reused, or one built by
hand) is copied into fresh buffers first, so it is never overwritten behind the caller's back.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KvSlots"]


class KvSlots:
    """``capacity``: fixed slot count (the static graph), or ``None`` to grow (doubling) as needed."""

    def __init__(self, capacity: int | None = None, minimum: int = 256) -> None:
        self.capacity = capacity
        self.minimum = minimum
        self._buffers: list[np.ndarray] = []
        self._returned_length = -1

    def buffers_for(self, past: list[np.ndarray], needed: int) -> list[np.ndarray]:
        """Buffers that hold ``past`` in their first positions and have room for ``needed`` in all."""
        if (
            self._buffers
            and len(past) == len(self._buffers)
            and past[0].shape[2] == self._returned_length
            and needed <= self._buffers[0].shape[2]
            and all(array.base is buffer for array, buffer in zip(past, self._buffers))
        ):
            return self._buffers
        size = self.capacity if self.capacity is not None else max(self.minimum, 2 * needed)
        buffers = []
        for filled in past:
            buffer = np.zeros((*filled.shape[:2], size, filled.shape[3]), filled.dtype)
            buffer[:, :, : filled.shape[2]] = filled
            buffers.append(buffer)
        return buffers

    def hand_back(self, buffers: list[np.ndarray], length: int) -> list[np.ndarray]:
        """The caller's view of ``buffers`` after ``length`` positions were filled."""
        self._buffers, self._returned_length = buffers, length
        return [buffer[:, :, :length] for buffer in buffers]
