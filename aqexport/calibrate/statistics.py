"""Per-input-channel activation statistics of every linear, gathered in the pass that already runs.

The engine runs each block over the fp calibration activations once to get its targets; forward
pre-hooks on the block's linears collect, in that same pass (ALGORITHMS.md §5):

* ``absmax[j] = max |x_j|`` over all calibration tokens: the SmoothQuant scale and the
  initialisation of learned transforms;
* ``shift[j]``: running mean over windows of ``(max_j + min_j) / 2``, OmniQuant's shift init;
* ``outliers[j]``: how many tokens reached ``|x_j| ≥ τ`` (LLM.int8's τ = 6.0), so a static outlier
  split can be fixed at lowering time from calibration data;
* ``tokens``: how many tokens were seen, to turn counts into rates.

Statistics are taken on the *fp* inputs (``x_fp``), as the reference does: they describe the
model, not the errors of blocks already quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LLM_INT8_THRESHOLD", "ChannelStats", "StatisticsCollector"]

LLM_INT8_THRESHOLD = 6.0


@dataclass
class ChannelStats:
    absmax: torch.Tensor  # [in] float32
    shift: torch.Tensor  # [in] float32
    outliers: torch.Tensor  # [in] int64: tokens with |x_j| ≥ threshold
    tokens: int
    threshold: float = LLM_INT8_THRESHOLD

    def outlier_channels(self) -> torch.Tensor:
        """Input channels that reached τ on calibration data: the static LLM.int8 outlier set."""
        return torch.nonzero(self.outliers > 0).flatten()


class StatisticsCollector:
    """Context manager: hooks every linear of ``block`` and accumulates ``ChannelStats``."""

    def __init__(self, block: nn.Module, threshold: float = LLM_INT8_THRESHOLD) -> None:
        self.block = block
        self.threshold = threshold
        self.stats: dict[str, ChannelStats] = {}
        self._calls: dict[str, int] = {}
        self._handles: list = []

    def _observe(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        absmax = flat.abs().amax(0)
        center = (flat.amax(0) + flat.amin(0)) / 2
        outliers = (flat.abs() >= self.threshold).sum(0)
        seen = self.stats.get(name)
        calls = self._calls.get(name, 0)
        if seen is None:
            self.stats[name] = ChannelStats(absmax, center, outliers, flat.shape[0], self.threshold)
        else:
            seen.absmax = torch.maximum(seen.absmax, absmax)
            seen.shift = seen.shift + (center - seen.shift) / (calls + 1)
            seen.outliers = seen.outliers + outliers
            seen.tokens += flat.shape[0]
        self._calls[name] = calls + 1

    def __enter__(self) -> StatisticsCollector:
        for name, module in self.block.named_modules():
            if isinstance(module, nn.Linear):
                hook = module.register_forward_pre_hook(lambda m, a, name=name: self._observe(name, a[0]))
                self._handles.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
