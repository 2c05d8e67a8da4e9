"""Which of a model's decoder blocks hold their weights, for a model streamed block by block
(``aqexport.streamed_model``): accelerate's offload hook gives a block its parameters for one
forward only, and calibrating a block reads and rewrites them between forwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from accelerate.hooks import AlignDevicesHook
from torch import nn

__all__ = ["resident", "stream_from_plan"]


@contextmanager
def resident(block: nn.Module) -> Iterator[None]:
    """Hold a streamed block's parameters for a while (calibrating it reads and rewrites its
    weights outside any forward): set from the weights map on entry, released on exit. A block
    without an offload hook (a loaded model's) is left alone."""
    hook = getattr(block, "_hf_hook", None)
    if not isinstance(hook, AlignDevicesHook) or not hook.offload:
        yield
        return
    hook.pre_forward(block)
    hook.offload = False  # forwards inside neither reload nor release
    try:
        yield
    finally:
        hook.offload = True
        hook.post_forward(block, None)


def stream_from_plan(model: nn.Module, plan) -> None:
    """Point a streamed model's weights at ``plan``: a block it holds reloads as fake-quant
    (``streamed_model.CheckpointMap``). No-op for a loaded model."""
    weights = getattr(model, "streamed_weights", None)
    if weights is not None:
        weights.plan = plan
