"""``recipe: omniquant`` (diagonal): learnable weight clipping plus a learned diagonal transform per
norm group, a diagonal out transform and (rotary models) a diagonal q·k transform — AffineQuant
with the mask frozen at width 1."""

from __future__ import annotations

from typing import Literal

from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.recipes._trained import TrainedRecipeConfig, trained_settings
from aqexport.recipes.registry import register_recipe

__all__ = ["OmniQuantConfig"]


class OmniQuantConfig(TrainedRecipeConfig):
    recipe: Literal["omniquant"] = "omniquant"


@register_recipe(OmniQuantConfig)
def omniquant_settings(config: OmniQuantConfig, epochs: int, seed: int) -> CalibrationRecipe:
    return trained_settings(config, epochs, seed, transform="diagonal")
