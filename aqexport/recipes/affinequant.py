"""``recipe: affinequant``: LWC plus norm-group transforms (dense, block-diagonal, Kronecker or
diagonal with ``transform:``), per-KV-head dense out transforms and the RoPE-commuting q·k
transform, trained under the gradual mask (ALGORITHMS.md §5).

**Default form, by measurement** (BENCHMARKS.md, "AffineQuant transform forms"; SmolLM2
w4a16g128, the example's budget, WikiText-2 40 × 512 on ONNX Runtime at the measured level 4):
dense 29.18 with 60 run-time 576×576 float MatMuls (76 MiB read per token), diagonal 29.27 with
none, block-diagonal (64) 29.99, Kronecker (24 × 24) 30.76. Weight-only presets therefore default
to ``diagonal``: the dense transforms stay where they fold into weights for free (out, q·k), and
the norm side costs nothing at run time, for +0.3 % perplexity against dense. With activations
quantized the norm-side transform is what tames their outliers, nothing cheaper was measured
there, and those presets keep ``dense``.

``transform`` shapes only the norm-side transforms, the ones the graph carries at run time
(``docs/transforms.md``); the out and q·k transforms fold into weights at no run-time cost and
stay dense. Whether a block size or factor pair fits the model is checked per norm group when
calibration starts (``aqexport.calibrate.norm_forms.factor_shapes``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.recipes._common import preset_of
from aqexport.recipes._trained import TrainedRecipeConfig, trained_settings
from aqexport.recipes.registry import register_recipe

__all__ = ["AffineQuantConfig"]

_FORM_OF = {"transform_block": "block_diagonal", "transform_factors": "kronecker"}


class AffineQuantConfig(TrainedRecipeConfig):
    recipe: Literal["affinequant"] = "affinequant"
    transform: Literal["dense", "block_diagonal", "kronecker", "diagonal"] | None = Field(
        None,
        description="form of the norm-side transforms (run time: d² dense, d·k block-diagonal, d·(d₁+d₂) "
        "Kronecker, none diagonal: it folds into the norm); null: diagonal for weight-only presets, dense "
        "with activations quantized (measured, module docstring)",
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


def norm_form(config: AffineQuantConfig) -> str:
    """The configured form, else the measured default for the preset (module docstring)."""
    if config.transform is not None:
        return config.transform
    return "diagonal" if preset_of(config).activation is None else "dense"


@register_recipe(AffineQuantConfig)
def affinequant_settings(config: AffineQuantConfig, epochs: int, seed: int) -> CalibrationRecipe:
    return trained_settings(
        config,
        epochs,
        seed,
        transform="dense",
        norm_form=norm_form(config),
        norm_block=config.transform_block,
        norm_factors=config.transform_factors,
    )
