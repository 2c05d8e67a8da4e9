"""How a block's frozen, transformed weights become integer codes: the engine's rounding step.

Rounding is the second axis of a recipe, independent of the transform method: the engine first
freezes a block with round-to-nearest codes (its ranges come from the learned clipping), then
hands the block to the recipe's ``Rounding``, which may replace the codes. A rounding method
that weighs errors by the inputs (GPTQ, ``aqexport.calibrate.gptq``) sets ``needs_hessians`` and
gets each linear's input ``XᵀX`` as the calibrated model sees it: after the transform, the
activation quantizer and the quantized blocks before it.

Methods are frozen dataclasses: their fields are the method's settings and land in the plan's
recipe identity, so a plan made with other rounding is never resumed by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aqexport.calibrate.plan import BlockPlan

__all__ = ["NearestRounding", "Rounding"]


@dataclass(frozen=True)
class Rounding:
    name: str = "nearest"

    @property
    def needs_hessians(self) -> bool:
        return False

    @property
    def hessian_tokens(self) -> int:
        """Calibration tokens the Hessians come from (when ``needs_hessians``): the caller runs
        extra windows through the calibrated blocks when this exceeds the training windows'."""
        return 0

    def refine(self, plan: BlockPlan, weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor]) -> None:
        """Replace ``plan``'s codes in place. ``weights``: each linear's transformed float weight
        [out, in] the codes quantize; ``hessians``: its inputs' ``XᵀX / n`` where asked for
        (linears reading one input share one tensor). A method may consume both mappings: a
        7B block's weights and Hessians are 2.6 GiB, freed linear by linear as they are used."""


@dataclass(frozen=True)
class NearestRounding(Rounding):
    """Round to nearest: the codes the engine froze are already these."""

    name: str = "nearest"
