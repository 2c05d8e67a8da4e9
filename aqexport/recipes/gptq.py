"""``rounding: gptq``: GPTQ (Frantar et al., 2023) on the grid the recipe froze, weighted by each
linear's inputs in the calibrated model. Composes with every transform recipe: ``recipe: rtn`` +
``rounding: gptq`` is plain GPTQ; with affinequant it rounds *after* the learned transforms, the
way the methods at the top of ALGORITHMS.md's tables do."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aqexport.calibrate.gptq import DAMPENING, GptqRounding
from aqexport.recipes.registry import RoundingConfig, register_rounding

__all__ = ["GptqRoundingConfig"]


class GptqRoundingConfig(RoundingConfig):
    method: Literal["gptq"] = "gptq"
    dampening: float = Field(DAMPENING, gt=0.0, le=1.0, description="added to H's diagonal, × its mean")


@register_rounding(GptqRoundingConfig)
def gptq_rounding(config: GptqRoundingConfig) -> GptqRounding:
    return GptqRounding(dampening=config.dampening)
