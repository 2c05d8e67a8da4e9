"""Perplexity by the protocol of ALGORITHMS.md §7, for any logits function.

The text is tokenized once as a whole, cut into non-overlapping windows of ``seqlen`` tokens
(the tail is dropped), each window scored from an empty cache; PPL is ``exp`` of the mean
cross-entropy over every predicted token. The same function scores PyTorch and ONNX Runtime,
so a difference between the two can only come from the models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PerplexityResult", "onnx_logits_of", "perplexity", "split_windows", "window_nll"]

#: positions scored at once by ``window_nll``
_NLL_ROWS = 64


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int
    seqlen: int

    def as_dict(self) -> dict:
        return asdict(self)


def split_windows(token_ids: Iterable[int], seqlen: int, max_windows: int | None = None) -> np.ndarray:
    ids = np.asarray(list(token_ids) if not isinstance(token_ids, np.ndarray) else token_ids, dtype=np.int64)
    count = ids.size // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"text has {ids.size} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].reshape(count, seqlen)


def window_nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Sum of next-token negative log-likelihoods of one window (float64 accumulation).

    Scored ``_NLL_ROWS`` positions at a time: a 512-token window of a 49k vocabulary is 100 MB
    of logits, and whole-window temporaries (a float32 copy, ``x - max``, ``exp``) held three
    more of them at every perplexity's peak. Each row's value is the same either way, and the
    rows are summed once at the end, so the result is bit for bit the whole-window one."""
    targets = window[1:]
    rows = np.empty(targets.size, dtype=np.float64)
    for start in range(0, targets.size, _NLL_ROWS):
        stop = min(start + _NLL_ROWS, targets.size)
        scores = logits[start:stop].astype(np.float32, copy=False)
        peak = scores.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(scores - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]
        rows[start:stop] = log_norm - scores[np.arange(stop - start), targets[start:stop]]
    return float(np.sum(rows, dtype=np.float64))


def perplexity(
    logits_of: Callable[[np.ndarray], np.ndarray],
    windows: np.ndarray,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> PerplexityResult:
    """``logits_of(window [S]) -> logits [S, V]``, called once per window."""
    total = 0.0
    for window in progress(windows):
        total += window_nll(logits_of(window), window)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    mean = total / predicted
    return PerplexityResult(math.exp(mean), mean, predicted, windows.shape[0], windows.shape[1])


def onnx_logits_of(decoder) -> Callable[[np.ndarray], np.ndarray]:
    """Logits function for ``perplexity`` from an ``OnnxDecoder`` (fresh cache per window)."""

    def run(window: np.ndarray) -> np.ndarray:
        ids = window[None]
        logits, _ = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1), np.arange(ids.shape[1])[None])
        return logits[0]

    return run
