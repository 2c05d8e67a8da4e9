"""Catch what each decoder block receives, so blocks can be calibrated one at a time.

The hidden states entering block 0 are caught for every calibration window (the forward stops
there). The keyword arguments (masks, rotary embeddings) are caught for *every* block from one
full forward, because they can differ per block: Gemma 3 gives sliding-window layers their own
mask and rotary base. They depend only on positions, so one window's are valid for all windows
of the same length, batch 1.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BlockInputs", "catch_block_inputs"]


class _Stop(Exception):
    pass


class BlockInputs:
    def __init__(self, hidden: torch.Tensor, kwargs: list[dict]) -> None:
        self.hidden = hidden  # [N, L, H]: input of block 0 for each window
        self.kwargs = kwargs  # per block


@torch.no_grad()
def catch_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor) -> BlockInputs:
    per_block: list[dict] = [{} for _ in blocks]

    def keep_kwargs(index):
        def hook(module, args, kwargs):
            per_block[index] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}

        return hook

    handles = [block.register_forward_pre_hook(keep_kwargs(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        model(input_ids=windows[:1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    hidden = []

    def stop(module, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(input_ids=window[None], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return BlockInputs(torch.cat(hidden), per_block)
