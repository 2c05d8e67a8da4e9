"""``rounding: nearest`` (default): round every transformed weight to its nearest code."""

from __future__ import annotations

from typing import Literal

from aqexport.calibrate.rounding import NearestRounding
from aqexport.recipes.registry import RoundingConfig, register_rounding

__all__ = ["NearestRoundingConfig"]


class NearestRoundingConfig(RoundingConfig):
    method: Literal["nearest"] = "nearest"


@register_rounding(NearestRoundingConfig)
def nearest_rounding(config: NearestRoundingConfig) -> NearestRounding:
    return NearestRounding()
