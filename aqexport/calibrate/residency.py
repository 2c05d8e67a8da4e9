"""Which of a model's decoder blocks hold their weights, for a model streamed block by block
(``aqexport.streamed_model``): accelerate's offload hook gives a block its parameters for one
forward only, and calibrating a block reads and rewrites them between forwards."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.hooks import AlignDevicesHook
from torch import nn

__all__ = ["edges_released", "resident", "stream_from_plan"]


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


@contextmanager
def edges_released(model: nn.Module) -> Iterator[None]:
    """Spill a streamed model's resident parameters (embedding, final norm, LM head: all but the
    offloaded blocks') to a temporary safetensors file for a while, and read them back after.
    Verification opens ONNX Runtime's session on the artifact between two PyTorch forwards, and a
    7B model's float edges (1.6 GiB at a 49152-token vocabulary) would sit beside the session's
    weights for nothing. Spilled, not re-read from the checkpoint: the head and embedding hold
    the plan's fake-quant values by now (``calibrate.edges``). Each ``Parameter`` keeps its
    identity (its ``.data`` goes and comes back), so ties and hooks survive. A loaded model is
    left alone: verification releases its weights whole (``verify.release_weights``).

    Calibration spills them too while it trains block by block (``engine.calibrate``): the
    blocks need neither, and a 7B model's block training is what sets its build's peak."""
    if getattr(model, "streamed_weights", None) is None:
        yield
        return
    held = {}
    for name, parameter in model.named_parameters():  # each shared parameter once
        if parameter.device.type != "meta":
            held[name] = parameter
    with tempfile.TemporaryDirectory(prefix="aqexport-edges-") as folder:
        # ``torch.save``/``torch.load``, not safetensors: ``save_file`` serialises the whole file in
        # memory and ``safe_open`` maps it, each a second copy of the edges at its moment
        spill = Path(folder) / "edges.pt"
        torch.save({name: parameter.detach() for name, parameter in held.items()}, spill)
        for parameter in held.values():
            parameter.data = torch.empty(0, dtype=parameter.dtype)
        try:
            yield
        finally:
            values = torch.load(spill, weights_only=True)
            for name, parameter in held.items():
                parameter.data = values.pop(name)
