"""Give the C heap's freed memory back to the system, so resident memory follows what a build
holds rather than what it once held.

glibc's malloc keeps freed memory for reuse: it raises the size above which an allocation is
its own ``mmap`` (dynamically, up to 32 MiB) after the first large free, and it keeps freed
heap pages until the top of the heap is free. A build frees large things on purpose (a block's
weights after its forward, ONNX Runtime's session of the float graph after the parity ladder's
rung, the exporter's tracing state) and would otherwise carry them to its peak: the packaged
SmolLM2's build held 250 MiB more after the exported rung's session than before it. Other C
libraries: nothing to do.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["map_large_allocations", "trim"]

#: glibc's ``mallopt`` parameter for the size from which an allocation is its own ``mmap``
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc's, or not glibc
    except (OSError, AttributeError):
        return None
    return libc


#: the fixed mapping threshold: glibc's ceiling for its dynamic one on 64-bit
MMAP_THRESHOLD = 32 << 20


def map_large_allocations() -> None:
    """Allocations from ``MMAP_THRESHOLD`` up get their own mapping, returned to the system when
    freed, and the threshold stops rising: reloading each block of a streamed model for every
    forward otherwise left its RSS 350 MiB above what the model holds (the 1.17B model: 1487
    against 1136 MiB after six forwards). Not lower: at 1 MiB every activation of a block's
    training was a fresh mapping, its pages faulted in and zeroed each step (the streamed
    SmolLM2 AffineQuant build: 826 munmap calls in 8 s, a third of the CPU time in the kernel,
    blocks calibrated 2-4x slower than in the build that loads the model whole)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    """Return the free pages of every malloc arena (``malloc_trim(0)``): cheap, and called after
    each build stage and each of the parity ladder's sessions."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
