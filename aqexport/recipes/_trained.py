"""The training knobs omniquant and affinequant share, and their measured defaults.

Knobs left at ``null`` take the method's default, so a config records only what its author
changed. Defaults measured on SmolLM2 (``benchmarks/calibration_ablation.py``):

* **Initialisation depends on the preset.** With activations quantized, transforms start from
  SmoothQuant's scales (first-6-block error on W4A4 −19 % against identity); weight-only, from
  the identity (SmoothQuant's migration makes the *weights* harder: ×1.9 on W4A16g128).
* **Stability factor 0.02 weight-only, 0.03 with activations**, not the reference's 1.0: with
  Adam every entry moves by about ``lr`` per step, so an H×H matrix with ``sf = 1`` gets
  off-diagonal row sums of ``H·lr`` after one step and the dominance guard crushes them.
* Learning rates 2× / 5× the paper's (the CPU schedule takes ~64 steps per block, not 2,560).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.recipes._common import common_settings, preset_of
from aqexport.recipes.registry import QuantizedRecipeConfig

__all__ = ["TrainedRecipeConfig", "trained_settings"]


class TrainedRecipeConfig(QuantizedRecipeConfig):
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="SmoothQuant strength of the init (0.5)")
    init: Literal["identity", "smoothquant"] | None = None
    aug_loss: bool | None = None
    train_dtype: Literal["float32", "float64"] | None = None
    stability_factor: float | None = Field(None, gt=0.0, le=1.0)
    lr_transform: float | None = Field(None, gt=0.0)
    lr_lwc: float | None = Field(None, gt=0.0)


def trained_settings(
    config: TrainedRecipeConfig, epochs: int, seed: int, transform: str, **engine: Any
) -> CalibrationRecipe:
    """The engine's settings: the shared knobs' measured defaults, the config's choices, and the
    method's own ``engine`` fields (affinequant's norm-side form)."""
    quantizes_activations = preset_of(config).activation is not None
    chosen: dict[str, Any] = {
        "init": "smoothquant" if quantizes_activations else "identity",
        "stability_factor": 0.03 if quantizes_activations else 0.02,
    }
    for key in ("alpha", "init", "aug_loss", "train_dtype", "stability_factor", "lr_transform", "lr_lwc"):
        if getattr(config, key) is not None:
            chosen[key] = getattr(config, key)
    return CalibrationRecipe(**common_settings(config, seed), epochs=epochs, transform=transform, **chosen, **engine)
