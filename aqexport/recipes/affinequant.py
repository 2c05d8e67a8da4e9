"""``recipe: affinequant``: LWC plus dense norm-group transforms, per-KV-head dense out transforms
and the RoPE-commuting q·k transform, trained under the gradual mask (ALGORITHMS.md §5)."""

from __future__ import annotations

from typing import Literal

from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.recipes._trained import TrainedRecipeConfig, trained_settings
from aqexport.recipes.registry import register_recipe

__all__ = ["AffineQuantConfig"]


class AffineQuantConfig(TrainedRecipeConfig):
    recipe: Literal["affinequant"] = "affinequant"


@register_recipe(AffineQuantConfig)
def affinequant_settings(config: AffineQuantConfig, epochs: int, seed: int) -> CalibrationRecipe:
    return trained_settings(config, epochs, seed, transform="dense")
