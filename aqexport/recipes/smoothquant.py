"""``recipe: smoothquant``: no training; a diagonal transform per norm group from calibration
statistics, ``s_j = max|x_j|^α / max|W_:,j|^(1−α)`` (weight max over the group's linears)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.recipes._common import common_settings
from aqexport.recipes.registry import QuantizedRecipeConfig, register_recipe

__all__ = ["SmoothQuantConfig"]


class SmoothQuantConfig(QuantizedRecipeConfig):
    recipe: Literal["smoothquant"] = "smoothquant"
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="SmoothQuant migration strength (0.5)")


@register_recipe(SmoothQuantConfig)
def smoothquant_settings(config: SmoothQuantConfig, epochs: int, seed: int) -> CalibrationRecipe:
    return CalibrationRecipe(
        **common_settings(config, seed),
        epochs=0,
        lwc=False,
        transform="diagonal",
        init="smoothquant",
        qk_transform=False,
        alpha=0.5 if config.alpha is None else config.alpha,
    )
