"""``recipe: none``: the float model, exported and fused; nothing to calibrate."""

from __future__ import annotations

from typing import ClassVar, Literal

from aqexport.recipes.registry import RecipeConfig, register_recipe

__all__ = ["NoQuantizationConfig"]


class NoQuantizationConfig(RecipeConfig):
    CALIBRATED: ClassVar[bool] = False
    NEEDS_PRESET: ClassVar[bool] = False

    recipe: Literal["none"] = "none"


@register_recipe(NoQuantizationConfig)
def _no_settings(config: NoQuantizationConfig, epochs: int, seed: int) -> None:
    return None
