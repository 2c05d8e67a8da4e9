"""From a recipe config to the engine's ``CalibrationRecipe``, through the registry."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.errors import ConfigError, explain_validation_error
from aqexport.recipes.registry import RecipeConfig, recipe_entry, recipe_names

__all__ = ["calibration_recipe", "make_recipe", "recipe_config"]


def recipe_config(raw: Any) -> RecipeConfig:
    """The ``quantization:`` mapping as the config class its ``recipe`` registered, looked up when
    the config is read, so a recipe registered by any module (a plugin's too) is accepted without
    ``aqexport.config`` knowing it. Each class validates its own fields; a key that belongs to
    another method is refused naming that method."""
    if isinstance(raw, RecipeConfig):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError("'quantization' must be a mapping", "see examples/*.yaml")
    entry = recipe_entry(str(raw.get("recipe", "none")))
    try:
        return entry.config_type.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            owners = [name for name in recipe_names() if key in recipe_entry(name).config_type.model_fields]
            if owners:
                raise ConfigError(
                    f"'quantization.{key}' applies to recipe {' / '.join(owners)} only",
                    f"remove '{key}' or use recipe: {owners[0]}",
                ) from None
        raise explain_validation_error(error, entry.config_type, ("quantization",)) from None


def calibration_recipe(config: RecipeConfig, epochs: int, seed: int) -> CalibrationRecipe | None:
    """The engine's settings for ``config`` (``None`` for a recipe that calibrates nothing)."""
    return recipe_entry(config.recipe).handler(config, epochs, seed)


def make_recipe(method: str, preset: str | None, epochs: int = 20, seed: int = 2, **options: Any) -> CalibrationRecipe:
    """A ``CalibrationRecipe`` from a method name and its config fields, for tests and benchmarks
    (the same validation a model.yaml gets). ``static_activations=True`` is ``activations: static``;
    ``None`` values keep the method's default."""
    options = {key: value for key, value in options.items() if value is not None}
    if options.pop("static_activations", False):
        options["activations"] = "static"
    return calibration_recipe(recipe_config({"recipe": method, "preset": preset, **options}), epochs, seed)
