"""The *what* of a calibration: a small frozen recipe, built from a method name and a preset.

Methods are recipes of one engine (``aqexport.calibrate.engine``), not separate code paths:

* ``rtn``: no training, no transforms: round to nearest.
* ``omniquant`` (diagonal): learnable weight clipping plus a learned diagonal transform per
  norm group and a diagonal out transform, i.e. AffineQuant with the mask frozen at width 1.
* ``affinequant``: LWC plus dense norm-group transforms and per-KV-head dense out transforms,
  trained under the gradual mask.

Learning rates default to 2× (transforms) and 5× (LWC) the paper's 5e-3 / 1e-2 because the CPU
schedule takes ~64 steps per block instead of 2,560; measured on SmolLM2 w4a16g128 affinequant
(16 × 256, 4 epochs): perplexity 29.84 at the paper's rates, 29.68 at these.

Only weight-only presets are built in this version; activation presets are named so configs
validate, and refused with one line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from aqexport.calibrate.quantizer import QuantScheme
from aqexport.errors import ConfigError

__all__ = ["CalibrationRecipe", "WEIGHT_ONLY_PRESETS", "make_recipe"]

WEIGHT_ONLY_PRESETS: dict[str, QuantScheme] = {
    "w4a16": QuantScheme(4, None),
    "w4a16g128": QuantScheme(4, 128),
    "w3a16g128": QuantScheme(3, 128),
    "w8a16": QuantScheme(8, None),
}


@dataclass(frozen=True)
class CalibrationRecipe:
    method: str
    weight: QuantScheme
    epochs: int = 20
    lwc: bool = True
    transform: str = "dense"  # none | diagonal | dense
    stability_factor: float = 1.0
    lr_transform: float = 1e-2
    lr_lwc: float = 5e-2
    dominance_margin: float = 1e-2
    seed: int = 2

    @property
    def trains(self) -> bool:
        return self.lwc or self.transform != "none"

    def as_dict(self) -> dict:
        data = asdict(self)
        data["weight"] = asdict(self.weight)
        return data


def make_recipe(method: str, preset: str, epochs: int = 20, seed: int = 2, **training: float) -> CalibrationRecipe:
    """``training`` overrides ``stability_factor``, ``lr_transform`` and ``lr_lwc``."""
    if preset not in WEIGHT_ONLY_PRESETS:
        raise ConfigError(
            f"preset '{preset}' quantizes activations, which this version does not calibrate yet",
            f"use one of: {', '.join(WEIGHT_ONLY_PRESETS)}",
        )
    scheme = WEIGHT_ONLY_PRESETS[preset]
    if method == "rtn":
        return CalibrationRecipe("rtn", scheme, epochs=0, lwc=False, transform="none", seed=seed)
    if method == "omniquant":
        return CalibrationRecipe("omniquant", scheme, epochs=epochs, transform="diagonal", seed=seed, **training)
    if method == "affinequant":
        return CalibrationRecipe("affinequant", scheme, epochs=epochs, transform="dense", seed=seed, **training)
    raise ConfigError(f"calibration method '{method}' is not available", "use rtn, omniquant or affinequant")
