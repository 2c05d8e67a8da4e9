"""Which of a model's decoder blocks hold their weights, for a model streamed block by block
(``aqexport.streamed_model``): accelerate's offload hook gives a block its parameters for one
forward only, and calibrating a block reads and rewrites them between forwards."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.hooks import AlignDevicesHook
from torch import nn

from aqexport.calibrate.input_hooks import input_state

__all__ = ["FileTensors", "edges_released", "resident", "spill_inverses", "stream_from_plan"]


#: a streamed block's transform inverses from this size on wait in files between its forwards
#: (``spill_inverses``): a 1B model's (hidden 2048) 32 MiB a block do, SmolLM2's 2.6 MiB do not
SPILL_BYTES = 16 * 2**20


def _streamed(block: nn.Module) -> bool:
    hook = getattr(block, "_hf_hook", None)
    return isinstance(hook, AlignDevicesHook) and hook.offload


@contextmanager
def resident(block: nn.Module) -> Iterator[None]:
    """Hold a streamed block's parameters for a while (calibrating it reads and rewrites its
    weights outside any forward): set from the weights map on entry, released on exit, its
    transforms' inverses with them (``spill_inverses``). A block without an offload hook (a
    loaded model's) is left alone."""
    if not _streamed(block):
        yield
        return
    hook = block._hf_hook
    hook.pre_forward(block)
    hook.offload = False  # forwards inside neither reload nor release
    try:
        yield
    finally:
        hook.offload = True
        hook.post_forward(block, None)
        spill_inverses(block)


class FileTensors(Mapping[str, torch.Tensor]):
    """Tensors by name in a temporary file of their own each, read at each access: nothing of
    them stays in memory once the caller lets go of what it read. Deleted with this object."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        folder = Path(tempfile.mkdtemp(prefix="aqexport-spill-"))
        self._files = {}
        for index, (name, tensor) in enumerate(tensors.items()):
            self._files[name] = folder / f"{index}.pt"
            torch.save(tensor.detach().clone(), self._files[name])  # a view would save its whole storage
        weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.load(self._files[name], weights_only=True)

    def __contains__(self, name: object) -> bool:  # Mapping's would read the file to find out
        return name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def spill_inverses(block: nn.Module) -> None:
    """Move a streamed block's transform inverses (its input hooks' ``A⁻¹``, ``engine._input_state``)
    to files read when its forward multiplies by them. Held, a fake-quant model keeps every
    block's beside the one block of weights it streams: two 4096² float32 matrices per 7B block,
    4 GiB over 32 blocks. Read back, not recomputed: one float64 4096² inverse takes seconds, and
    a block's forward reads each up to three times (q, k, v). A block whose inverses take less than
    ``SPILL_BYTES`` keeps them (the packaged SmolLM2's: 2.6 MiB a block, cheaper held than read
    five times a forward), as does a block without an offload hook (a loaded model's)."""
    state = input_state(block)
    if state is None or isinstance(state.inverses, FileTensors) or not _streamed(block):
        return
    if sum(inverse.nbytes for inverse in state.inverses.values()) >= SPILL_BYTES:
        state.inverses = FileTensors(state.inverses)


def stream_from_plan(model: nn.Module, plan) -> None:
    """Point a streamed model's weights at ``plan``: a block it holds reloads as fake-quant
    (``streamed_model.CheckpointMap``). No-op for a loaded model."""
    weights = getattr(model, "streamed_weights", None)
    if weights is not None:
        weights.plan = plan


@contextmanager
def edges_released(model: nn.Module) -> Iterator[None]:
    """Spill a streamed model's resident parameters (embedding, final norm, LM head: all but the
    offloaded blocks') to a temporary file for a while, and read them back after.
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
