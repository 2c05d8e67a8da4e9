"""``recipe: affinequant``: LWC plus norm-group transforms (dense by default; block-diagonal,
Kronecker or diagonal with ``transform:``), per-KV-head dense out transforms and the
RoPE-commuting q·k transform, trained under the gradual mask (ALGORITHMS.md §5).

``transform`` shapes only the norm-side transforms, the ones the graph carries at run time
(``docs/transforms.md``); the out and q·k transforms fold into weights at no run-time cost and
stay dense. Whether a block size or factor pair fits the model is checked per norm group when
calibration starts (``aqexport.calibrate.norm_forms.factor_shapes``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.recipes._trained import TrainedRecipeConfig, trained_settings
from aqexport.recipes.registry import register_recipe

__all__ = ["AffineQuantConfig"]

_FORM_OF = {"transform_block": "block_diagonal", "transform_factors": "kronecker"}


class AffineQuantConfig(TrainedRecipeConfig):
    recipe: Literal["affinequant"] = "affinequant"
    transform: Literal["dense", "block_diagonal", "kronecker", "diagonal"] = Field(
        "dense",
        description="form of the norm-side transforms (run time: d² dense, d·k block-diagonal, d·(d₁+d₂) "
        "Kronecker, none diagonal: it folds into the norm)",
    )
    transform_block: int | None = Field(
        None,
        ge=1,
        description="block size k of transform: block_diagonal (must divide the hidden size; default: "
        "its largest divisor up to 64)",
    )
    transform_factors: tuple[int, int] | None = Field(
        None,
        description="(d₁, d₂) of transform: kronecker, d₁·d₂ = hidden size (default: d₁ the divisor closest to √d)",
    )

    @field_validator("transform_block", "transform_factors")
    @classmethod
    def _only_with_its_form(cls, value, info: ValidationInfo):
        form = _FORM_OF[info.field_name]
        if value is not None and info.data.get("transform") != form:
            raise ValueError(f"applies to transform: {form} only")
        if info.field_name == "transform_factors" and value is not None and min(value) < 1:
            raise ValueError("both factors must be at least 1")
        return value


@register_recipe(AffineQuantConfig)
def affinequant_settings(config: AffineQuantConfig, epochs: int, seed: int) -> CalibrationRecipe:
    return trained_settings(
        config,
        epochs,
        seed,
        transform="dense",
        norm_form=config.transform,
        norm_block=config.transform_block,
        norm_factors=config.transform_factors,
    )
