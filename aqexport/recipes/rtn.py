"""``recipe: rtn``: no training, no transforms; the preset's grid, min/max ranges."""

from __future__ import annotations

from typing import Literal

from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.recipes._common import common_settings
from aqexport.recipes.registry import QuantizedRecipeConfig, register_recipe

__all__ = ["RtnConfig"]


class RtnConfig(QuantizedRecipeConfig):
    recipe: Literal["rtn"] = "rtn"


@register_recipe(RtnConfig)
def rtn_settings(config: RtnConfig, epochs: int, seed: int) -> CalibrationRecipe:
    return CalibrationRecipe(**common_settings(config, seed), epochs=0, lwc=False, transform="none", qk_transform=False)
