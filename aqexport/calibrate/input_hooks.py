"""What happens to a linear's input before its (quantized) weight: ``Qa((x − δ) A⁻¹)``.

One forward pre-hook per linear, reading an ``InputState`` at call time, serves three uses:
training (the engine swaps ``A⁻¹`` and ``δ`` every step), the frozen fake-quant model built from
a plan, and observing the ranges of the transformed inputs to fix static activation scales.

Activation quantization is either dynamic per token (a range per row of the last axis: what the
CPU path's ``MatMulNBits accuracy_level=4`` / dynamic quantize ops compute at run time) or
static per tensor with a calibrated scale and zero point (the QDQ form NPU and mobile EPs
need). While a static scheme trains, its range is the current batch's, since the calibrated
range does not exist until the block is frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from aqexport.calibrate.outliers import OutlierSplit, quantize_with_outliers
from aqexport.calibrate.quantizer import QuantScheme, fake_quantize, fake_quantize_with
from aqexport.calibrate.structure import BlockStructure

__all__ = ["InputState", "input_state", "install_input_hooks", "remove_input_hooks"]

_HOOKS_ATTRIBUTE = "_aqexport_input_hooks"
_STATE_ATTRIBUTE = "_aqexport_input_state"


@dataclass
class InputState:
    activation: QuantScheme | None = None
    static: bool = False  # per-tensor activation ranges (static after calibration)
    # norm path -> A⁻¹ (a diagonal one: its diagonal); a streamed block's large ones wait in files
    # (``residency.FileTensors``)
    inverses: Mapping[str, torch.Tensor] = field(default_factory=dict)
    shifts: dict[str, torch.Tensor] = field(default_factory=dict)  # norm path -> δ
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # linear -> (Δ, z)
    observed: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # linear -> (min, max): observe only
    outliers: dict[str, OutlierSplit] = field(default_factory=dict)  # linear -> LLM.int8 split

    def map(self, linear: str, norm: str | None, x: torch.Tensor) -> torch.Tensor:
        if norm is not None and norm in self.shifts:
            x = x - self.shifts[norm].to(x.dtype)
        if norm is not None and norm in self.inverses:
            inverse = self.inverses[norm].to(x.dtype)  # a diagonal one as its diagonal (engine.frozen_inverse)
            x = x * inverse if inverse.ndim == 1 else x @ inverse
        if self.observed is not None:
            low, high = x.detach().amin(), x.detach().amax()
            if linear in self.observed:
                low, high = torch.minimum(low, self.observed[linear][0]), torch.maximum(high, self.observed[linear][1])
            self.observed[linear] = (low, high)
            return x
        if self.activation is None:
            return x
        if linear in self.outliers:
            return quantize_with_outliers(x, self.activation, self.outliers[linear])
        if not self.static:
            return fake_quantize(x, self.activation)
        if linear in self.ranges:
            scale, zero = self.ranges[linear]
            return fake_quantize_with(x, self.activation, scale.to(x.dtype), zero.to(x.dtype))
        return fake_quantize(x.reshape(1, -1), self.activation).reshape(x.shape)


def remove_input_hooks(block: nn.Module) -> None:
    for handle in getattr(block, _HOOKS_ATTRIBUTE, []):
        handle.remove()
    setattr(block, _HOOKS_ATTRIBUTE, [])
    setattr(block, _STATE_ATTRIBUTE, None)


def input_state(block: nn.Module) -> InputState | None:
    """The state ``block``'s input hooks read, if it has any."""
    return getattr(block, _STATE_ATTRIBUTE, None)


def install_input_hooks(block: nn.Module, structure: BlockStructure, state: InputState) -> None:
    """Hook every linear of ``block`` to ``state``; installing again replaces earlier hooks."""
    remove_input_hooks(block)
    handles = []
    for name in structure.linears:
        group = structure.group_of(name)
        norm = None if group is None else group.norm

        def hook(module, args, name=name, norm=norm):
            return (state.map(name, norm, args[0]), *args[1:])

        handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    setattr(block, _HOOKS_ATTRIBUTE, handles)
    setattr(block, _STATE_ATTRIBUTE, state)
