"""``rounding: gptq``: GPTQ (Frantar et al., 2023) on the grid the recipe froze, weighted by each
linear's inputs in the calibrated model. Composes with every transform recipe: ``recipe: rtn`` +
``rounding: gptq`` is plain GPTQ; with affinequant it rounds *after* the learned transforms, the
way the methods at the top of ALGORITHMS.md's tables do."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aqexport.calibrate.gptq import DAMPENING, TOKENS, GptqRounding
from aqexport.recipes.registry import RoundingConfig, register_rounding

__all__ = ["GptqRoundingConfig"]


class GptqRoundingConfig(RoundingConfig):
    method: Literal["gptq"] = "gptq"
    dampening: float = Field(DAMPENING, gt=0.0, le=1.0, description="added to H's diagonal, × its mean")
    tokens: int = Field(
        TOKENS,
        ge=256,
        description="calibration tokens each linear's Hessian is estimated from (forward passes only, in windows of "
        "calibration.seqlen; at least the training windows). SmolLM2 rtn+gptq w4a16g128: 31.72 from 4096, "
        "30.88 from 32768",
    )
    act_order: bool = Field(
        True,
        description="quantize columns in decreasing input energy on the fixed per-group grid (SmolLM2 rtn+gptq "
        "w4a16g128: 29.32 against 30.88 in natural order)",
    )


@register_rounding(GptqRoundingConfig)
def gptq_rounding(config: GptqRoundingConfig) -> GptqRounding:
    return GptqRounding(dampening=config.dampening, tokens=config.tokens, act_order=config.act_order)
