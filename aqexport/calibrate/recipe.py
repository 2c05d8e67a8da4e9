"""The engine's settings: a small frozen ``CalibrationRecipe`` every method is expressed in.

Users never write one: a method's config (``aqexport.recipes``) is turned into one by that
method's registered handler, and the engine reads only these fields, never a method's name
(``method`` is a label for the plan's identity and reports). Methods are recipes of one engine
(``aqexport.calibrate.engine``), not separate code paths:

* ``rtn``: no training, no transforms: round to nearest.
* ``smoothquant``: no training; a diagonal transform per norm group from calibration statistics,
  ``s_j = max|x_j|^α / max|W_:,j|^(1−α)`` (weight max over every linear of the group), then RTN.
* ``omniquant`` (diagonal): learnable weight clipping plus a learned diagonal transform per
  norm group, a diagonal out transform and (on rotary models) a diagonal q·k transform, i.e.
  AffineQuant with the mask frozen at width 1.
* ``llm_int8``: no training, no transforms: symmetric int8 weights per output channel, inputs
  quantized per token (symmetric int8) except the outlier channels (τ = 6.0), which stay in
  float (``aqexport.calibrate.outliers``), statically or at run time, per layer.
* ``affinequant``: LWC plus dense norm-group transforms, per-KV-head dense out transforms and the
  RoPE-commuting q·k transform, trained under the gradual mask.

Presets name the weight scheme and, for ``wXaY`` with Y < 16, the activation scheme: dynamic,
per token, asymmetric (the reference's W4A4 setting), applied to the input of every linear but
the LM head. ``w4a8`` uses g128 weights because its CPU lowering (``MatMulNBits`` with
``accuracy_level=4``) quantizes blocked weights against int8 activations.

Defaults measured on SmolLM2 (``benchmarks/calibration_ablation.py``, table in BENCHMARKS.md):

* Learning rates are 2× (transforms) and 5× (LWC) the paper's 5e-3 / 1e-2 because the CPU
  schedule takes ~64 steps per block instead of 2,560.
* **Initialisation depends on the preset.** With activations quantized, transforms start from
  SmoothQuant's scales (first-6-block error on W4A4 −19 % against identity); weight-only, they
  start from the identity, because SmoothQuant's migration makes the *weights* harder to quantize
  (first-6-block error on W4A16g128 ×1.9 against identity).
* **Stability factor 0.02 weight-only, 0.03 with activations, not the reference's 1.0.** With
  Adam every entry moves by about ``lr`` per step whatever its gradient, so an H×H matrix with
  ``sf = 1`` gets off-diagonal row sums of ``H·lr`` after one step, the dominance guard crushes
  them every step, and the dense method ends *worse* than the diagonal one. ``sf`` scales exactly
  that step: at 0.001 the dense part barely moves (≈ omniquant), at 0.05+ it is noise again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from aqexport.calibrate.quantizer import QuantScheme
from aqexport.calibrate.rounding import NearestRounding, Rounding

__all__ = ["CalibrationRecipe", "LLM_INT8_SCHEME", "PRESETS", "Preset"]

LLM_INT8_SCHEME = QuantScheme(8, None, symmetric=True)


@dataclass(frozen=True)
class Preset:
    weight: QuantScheme
    activation: QuantScheme | None = None  # None: activations stay in float


PRESETS: dict[str, Preset] = {
    "w4a16": Preset(QuantScheme(4, None)),
    "w4a16g128": Preset(QuantScheme(4, 128)),
    "w4a16g32": Preset(QuantScheme(4, 32)),  # the onnxruntime-genai builder's default int4 block
    "w3a16g128": Preset(QuantScheme(3, 128)),
    "w8a16": Preset(QuantScheme(8, None)),
    "w8a8": Preset(QuantScheme(8, None), QuantScheme(8, None)),
    "w4a8": Preset(QuantScheme(4, 128), QuantScheme(8, None)),
    "w4a4": Preset(QuantScheme(4, None), QuantScheme(4, None)),
}


@dataclass(frozen=True)
class CalibrationRecipe:
    method: str
    weight: QuantScheme
    activation: QuantScheme | None = None
    epochs: int = 20
    lwc: bool = True
    transform: str = "dense"  # none | diagonal | dense
    init: str = "identity"  # identity | smoothquant: the fixed scales s₀ norm-group transforms start from
    alpha: float = 0.5  # SmoothQuant migration strength (init and the smoothquant method)
    qk_transform: bool = True  # the RoPE-commuting q·k transform, where discovery finds q and k
    aug_loss: bool = False  # add MSE(F(x_q), F_q(x_q)) to the loss
    static_activations: bool = False  # per-tensor activation ranges fixed from calibration data
    train_dtype: str = "float32"  # float32 | float64
    stability_factor: float = 0.02
    lr_transform: float = 1e-2
    lr_lwc: float = 5e-2
    dominance_margin: float = 1e-2
    seed: int = 2
    outlier_threshold: float = 6.0  # LLM.int8's τ; also the statistics' outlier count threshold
    outlier_split: str | None = None  # llm_int8: dynamic | static, the default for every linear
    outlier_layers: dict[str, str] = field(default_factory=dict)  # module-path glob -> mode
    rounding: Rounding = field(default_factory=NearestRounding)  # codes of the frozen, transformed weights
    # norm-side (norm → q/k/v, norm → gate/up) form where ``transform`` is dense:
    # dense | block_diagonal | kronecker | diagonal (aqexport.calibrate.norm_forms)
    norm_form: str = "dense"
    norm_block: int | None = None  # block_diagonal: block size k (None: the largest divisor of d ≤ 64)
    norm_factors: tuple[int, int] | None = None  # kronecker: (d₁, d₂) (None: d₁ the divisor closest to √d)
    windows_per_step: int = 1  # calibration windows whose mean loss makes one optimizer step

    @property
    def norm_side_form(self) -> str:
        """The form of the norm-group transforms: diagonal methods are diagonal everywhere."""
        return "diagonal" if self.transform == "diagonal" else self.norm_form

    @property
    def trains(self) -> bool:
        return self.epochs > 0 and (self.lwc or self.transform != "none")

    def as_dict(self) -> dict:
        """The recipe's identity in a plan. The LLM.int8 fields are left out for other methods
        (τ only counts outliers in their statistics), so plans made before those fields existed
        stay reusable; likewise the norm-side form fields while they are dense (format-4 plans), and
        ``windows_per_step`` at 1."""
        data = asdict(self)
        if self.norm_form == "dense" and self.norm_block is None and self.norm_factors is None:
            data.pop("norm_form"), data.pop("norm_block"), data.pop("norm_factors")
        elif self.norm_factors is not None:
            data["norm_factors"] = list(self.norm_factors)
        if self.outlier_split is None:
            data.pop("outlier_split"), data.pop("outlier_layers")
            if self.outlier_threshold == 6.0:
                data.pop("outlier_threshold")
        if self.windows_per_step == 1:  # the schedule every plan had before the field existed
            data.pop("windows_per_step")
        data["weight"] = asdict(self.weight)
        data["activation"] = None if self.activation is None else asdict(self.activation)
        return data
