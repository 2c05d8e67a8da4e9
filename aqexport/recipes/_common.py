"""What the handlers of several recipes share: the preset lookup and the common engine fields."""

from __future__ import annotations

from typing import Any

from aqexport.calibrate.recipe import PRESETS, Preset
from aqexport.recipes.registry import QuantizedRecipeConfig, rounding_entry

__all__ = ["common_settings", "preset_of", "rounding_step"]


def preset_of(config: QuantizedRecipeConfig) -> Preset:
    return PRESETS[config.preset]


def rounding_step(config: QuantizedRecipeConfig):
    """The engine's rounding step for the config's ``rounding`` (through its registry)."""
    return rounding_entry(config.rounding.method).handler(config.rounding)


def common_settings(config: QuantizedRecipeConfig, seed: int) -> dict[str, Any]:
    """Engine fields every quantizing recipe sets the same way from its config."""
    preset = preset_of(config)
    return {
        "method": config.recipe,
        "weight": preset.weight,
        "activation": preset.activation,
        "seed": seed,
        "static_activations": config.activations == "static",
        "rounding": rounding_step(config),
    }
