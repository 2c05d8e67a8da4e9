"""``recipe: llm_int8``: symmetric int8 weights per output channel, inputs quantized per token
(symmetric int8) except the outlier channels (|x| ≥ τ, 6.0), which stay in float
(``aqexport.calibrate.outliers``), chosen at run time or fixed from calibration, per layer."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from aqexport.calibrate.recipe import LLM_INT8_SCHEME, CalibrationRecipe
from aqexport.errors import ConfigError
from aqexport.recipes._common import rounding_step
from aqexport.recipes.registry import QuantizedRecipeConfig, register_recipe

__all__ = ["LlmInt8Config"]


class LlmInt8Config(QuantizedRecipeConfig):
    """W8A8 with the outlier split; the method fixes its own schemes, so ``preset`` may only
    restate them."""

    NEEDS_PRESET: ClassVar[bool] = False

    recipe: Literal["llm_int8"] = "llm_int8"
    outlier_threshold: float = Field(6.0, gt=0.0, description="τ: an input channel is an outlier at |x| ≥ τ")
    outlier_split: Literal["dynamic", "static"] = Field(
        "dynamic", description="outlier channels chosen per call at run time, or fixed from calibration"
    )
    outlier_layers: dict[str, Literal["dynamic", "static"]] = Field(
        default_factory=dict, description="module-path glob -> split mode, overriding outlier_split"
    )

    @model_validator(mode="after")
    def _w8a8_per_token(self) -> LlmInt8Config:
        if self.preset not in (None, "w8a8"):
            raise ConfigError(
                f"recipe llm_int8 is W8A8, not '{self.preset}'", "drop quantization.preset or set it to w8a8"
            )
        if self.activations == "static":
            raise ConfigError(
                "recipe llm_int8 quantizes activations per token", "drop quantization.activations: static"
            )
        if self.rounding.method != "nearest":
            raise ConfigError(
                "recipe llm_int8 rounds to nearest: its outlier columns stay in float and would absorb GPTQ's error",
                "drop quantization.rounding",
            )
        return self


@register_recipe(LlmInt8Config)
def llm_int8_settings(config: LlmInt8Config, epochs: int, seed: int) -> CalibrationRecipe:
    return CalibrationRecipe(
        "llm_int8",
        LLM_INT8_SCHEME,
        LLM_INT8_SCHEME,
        epochs=0,
        lwc=False,
        transform="none",
        qk_transform=False,
        seed=seed,
        outlier_threshold=config.outlier_threshold,
        outlier_split=config.outlier_split,
        outlier_layers=dict(config.outlier_layers),
        rounding=rounding_step(config),
    )
