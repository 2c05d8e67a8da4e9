"""Quantization recipes: one module per method, each a config class and a registered handler.

The import lines below *are* the registration: the registry (``registry.py``) is the one list
of methods that the config schema, error messages and ``make_recipe`` read. To add a method,
write ``recipes/<name>.py`` with its config and ``@register_recipe`` (or ``@register_rounding``)
handler and import it here.
"""

from __future__ import annotations

from aqexport.recipes import affinequant, gptq, llm_int8, nearest, none, omniquant, rtn, smoothquant  # noqa: F401
from aqexport.recipes.registry import (
    QuantizedRecipeConfig,
    RecipeConfig,
    RoundingConfig,
    recipe_entry,
    recipe_names,
    register_recipe,
    register_rounding,
    rounding_names,
)
from aqexport.recipes.settings import calibration_recipe, make_recipe, recipe_config

__all__ = [
    "QuantizedRecipeConfig",
    "RecipeConfig",
    "RoundingConfig",
    "calibration_recipe",
    "make_recipe",
    "recipe_config",
    "recipe_entry",
    "recipe_names",
    "register_recipe",
    "register_rounding",
    "rounding_names",
]
