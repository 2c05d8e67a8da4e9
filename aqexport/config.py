"""The *what* of a build: ``model.yaml`` as frozen, validated pydantic models.

Every section forbids unknown keys, because a misspelt key that is silently ignored (``sequlen``)
gives a build that looks fine and measures the wrong thing. Relative paths are resolved against
the folder of the YAML file, not the current directory, so a config means the same thing
wherever the command is run from. ``load_config`` turns every validation failure into one
``ConfigError`` line naming the key and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from aqexport.errors import ConfigError

__all__ = [
    "BuildConfig",
    "CalibrationSpec",
    "EvaluationSpec",
    "ModelSpec",
    "OutputSpec",
    "QuantizationSpec",
    "TargetSpec",
    "load_config",
    "IMPLEMENTED_RECIPES",
    "CALIBRATED_RECIPES",
    "require_buildable",
    "require_calibratable",
]

Recipe = Literal["none", "rtn", "smoothquant", "omniquant", "affinequant", "llm_int8"]
Preset = Literal["w4a16", "w4a16g128", "w4a16g32", "w3a16g128", "w8a16", "w8a8", "w4a8", "w4a4"]
Provider = Literal["cpu", "cuda", "xnnpack", "nnapi", "coreml", "qnn"]

#: Recipes this version can lower into an artifact (``build``) and calibrate (``calibrate``). The
#: schema names all of them so configs written for later versions validate; the commands refuse
#: the rest with one line instead of a half-built artifact.
CALIBRATED_RECIPES: frozenset[str] = frozenset({"rtn", "smoothquant", "omniquant", "affinequant", "llm_int8"})
IMPLEMENTED_RECIPES: frozenset[str] = frozenset({"none"}) | CALIBRATED_RECIPES
IMPLEMENTED_PROFILES: frozenset[str] = frozenset({"cpu", "cuda", "mobile"})
IMPLEMENTED_FORMATS: frozenset[str] = frozenset({"onnx", "ort"})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_path(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path.resolve()


class ModelSpec(_Section):
    """Where the model comes from.

    ``source`` is one string because that is how people name models: ``default`` (the packaged
    SmolLM2-135M-Instruct), a local Hugging Face folder, a ``.gguf`` file, or a Hub id such as
    ``HuggingFaceTB/SmolLM2-135M``. Which one it is is decided in ``aqexport.sources``.
    """

    source: str = "default"
    gguf_file: str | None = Field(None, description="GGUF file name inside a folder or Hub repo holding several")
    revision: str | None = None
    dtype: Literal["float32"] = "float32"
    trust_remote_code: bool = False


class CalibrationSpec(_Section):
    """Defaults are sized for a 2-core CPU (SmolLM2 w4a16g128 affinequant in well under 15
    minutes); the paper's protocol is samples 128, seqlen 2048, epochs 20."""

    data: Path | None = None
    samples: int = Field(16, ge=1)
    seqlen: int = Field(256, ge=16)
    seed: int = 2
    epochs: int = Field(4, ge=2)
    plan_dir: Path | None = Field(None, description="where the QuantPlan lives; default: <output.dir>.plan")
    head_tokens: int = Field(
        16384,
        ge=16,
        description="calibration tokens the LM head's GPTQ Hessian is estimated from (forward passes only; "
        "SmolLM2's int4 head: ppl 27.85 from 4096, 27.43 from 16384)",
    )

    _resolve = field_validator("data", "plan_dir")(_resolve_path)


class QuantizationSpec(_Section):
    """Training knobs left at ``null`` take the method's default (``aqexport.calibrate.recipe``),
    so a config records only what its author chose to change."""

    recipe: Recipe = "none"
    preset: Preset | None = None
    alpha: float | None = Field(None, ge=0.0, le=1.0, description="SmoothQuant migration strength")
    init: Literal["identity", "smoothquant"] | None = None
    aug_loss: bool | None = None
    activations: Literal["dynamic", "static"] = Field(
        "dynamic", description="activation ranges per token at run time, or per tensor fixed from calibration"
    )
    train_dtype: Literal["float32", "float64"] | None = None
    stability_factor: float | None = Field(None, gt=0.0, le=1.0)
    lr_transform: float | None = Field(None, gt=0.0)
    lr_lwc: float | None = Field(None, gt=0.0)
    outlier_threshold: float | None = Field(None, gt=0.0, description="llm_int8: τ, 6.0 by default")
    outlier_split: Literal["dynamic", "static"] | None = Field(
        None, description="llm_int8: outlier channels chosen per call at run time, or fixed from calibration"
    )
    outlier_layers: dict[str, Literal["dynamic", "static"]] = Field(
        default_factory=dict, description="llm_int8: module-path glob -> split mode, overriding outlier_split"
    )
    lm_head: Literal["float", "int8", "int4"] = Field(
        "float", description="the LM head as MatMulNBits: int8 in groups of 128, int4 symmetric in groups of 32"
    )
    lm_head_method: Literal["auto", "gptq", "rtn"] = Field(
        "auto",
        description="GPTQ on the head's inputs from the calibrated model (calibration.head_tokens of them), "
        "or round-to-nearest; auto: GPTQ for int4, RTN for int8 (SmolLM2 int8 build: RTN 27.91, GPTQ 27.98)",
    )
    embedding: Literal["float", "int8", "int4"] = Field(
        "float", description="RTN of the token embedding, groups of 128 (GatherBlockQuantized)"
    )


class TargetSpec(_Section):
    profile: Literal["cpu", "cuda", "mobile"] = "cpu"
    providers: tuple[Provider, ...] = ("cpu",)
    opset: int = Field(21, ge=21, le=23)
    formats: tuple[Literal["onnx", "ort"], ...] = ("onnx",)
    fuse: bool = Field(True, description="ONNX Runtime contrib-op fusions (RMSNorm, skip-RMSNorm, rotary, attention)")
    weight_format: Literal["matmul_nbits", "qdq", "qdq8"] = Field(
        "matmul_nbits",
        description="com.microsoft.MatMulNBits (CPU/CUDA kernels), or standard DequantizeLinear → MatMul (any EP); "
        "qdq8 stores 2-4-bit codes in 8-bit tensors, which the ORT format (model.ort) needs",
    )
    max_context: int = Field(
        512,
        ge=8,
        le=32768,
        description="mobile: the static KV cache's slots (prompt + generated tokens one artifact can hold)",
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None,
        description="MatMulNBits accuracy_level; null: 4 for 8-bit weights (ONNX Runtime's CPU EP has no fast "
        "float kernel for them: 50 ms vs 0.24 ms for SmolLM2's LM head) and 0 (float) for 2-4-bit ones. "
        "4 lets ONNX Runtime quantize activations to int8 per block, which the plan was not calibrated for",
    )


class EvaluationSpec(_Section):
    """What the build verifies. ``text: null`` skips perplexity (parity is always checked)."""

    text: Path | None = None
    seqlen: int = Field(512, ge=8)
    max_windows: int | None = Field(40, ge=1)
    compare_pytorch: bool = True
    prompt: str = "The capital of France is"
    generate_tokens: int = Field(64, ge=0)
    ladder: bool = Field(
        True, description="quantized builds: also check exported fp and folded fp graphs against HF eager"
    )

    _resolve = field_validator("text")(_resolve_path)


class OutputSpec(_Section):
    dir: Path

    _resolve = field_validator("dir")(_resolve_path)


class BuildConfig(_Section):
    model: ModelSpec = ModelSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    target: TargetSpec = TargetSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    output: OutputSpec

    def plan_dir(self) -> Path:
        return self.calibration.plan_dir or self.output.dir.with_name(self.output.dir.name + ".plan")

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def sha256(self) -> str:
        """Hash of the validated config (not the YAML text), so comments don't change it."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def _explain(error: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    loc = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        section: Any = model
        for part in error["loc"][:-1]:
            field = section.model_fields.get(str(part)) if hasattr(section, "model_fields") else None
            section = field.annotation if field is not None else None
        allowed = ", ".join(section.model_fields) if hasattr(section, "model_fields") else "?"
        return f"unknown key '{loc}'", f"remove it or use one of: {allowed}"
    if kind == "missing":
        return f"missing key '{loc}'", f"add '{loc}' to the config"
    given = error.get("input")
    return (
        f"bad value for '{loc}': {error['msg']} (got {given!r})",
        f"set '{loc}' to a valid value",
    )


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BuildConfig:
    """Read and validate a YAML config; every failure is one ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found", "pass the path of a model.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"'{path}' is not valid YAML{where}", "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"'{path}' must hold a mapping of sections", "see examples/*.yaml")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        config = BuildConfig.model_validate(raw, context={"base_dir": path.parent.resolve()})
    except ValidationError as exc:
        errors = exc.errors()
        cause, fix = _explain(errors[0], BuildConfig)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{path}: {cause}{more}", fix) from None
    _check_files(config)
    return config


def require_calibratable(config: BuildConfig) -> None:
    """``aqexport calibrate`` needs a calibrated recipe, a preset and calibration text."""
    recipe = config.quantization.recipe
    if recipe not in CALIBRATED_RECIPES:
        raise ConfigError(
            f"quantization.recipe '{recipe}' cannot be calibrated in this version",
            f"use one of: {', '.join(sorted(CALIBRATED_RECIPES))}",
        )
    if config.quantization.preset is None and recipe != "llm_int8":
        raise ConfigError("missing key 'quantization.preset'", "add e.g. 'preset: w4a16g128'")
    if config.calibration.data is None:
        raise ConfigError("missing key 'calibration.data'", "point it at the calibration text (WikiText-2 valid)")
    from aqexport.calibration_run import recipe_from_config  # imports config: here to avoid a cycle

    recipe_from_config(config)  # refuses impossible combinations (llm_int8 at w4a16, …) before any weight loads


def require_buildable(config: BuildConfig) -> None:
    recipe = config.quantization.recipe
    if recipe in CALIBRATED_RECIPES:
        require_calibratable(config)
    if recipe not in IMPLEMENTED_RECIPES:
        raise ConfigError(
            f"quantization.recipe '{recipe}' is not available in this version of 'build'",
            f"use one of: {', '.join(sorted(IMPLEMENTED_RECIPES))}",
        )
    quant = config.quantization
    if recipe == "none" and (quant.lm_head != "float" or quant.embedding != "float"):
        raise ConfigError(
            "quantization.lm_head / embedding need a quantized build",
            "set quantization.recipe (e.g. rtn) and preset, or keep them 'float'",
        )
    if config.target.profile not in IMPLEMENTED_PROFILES:
        raise ConfigError(
            f"target.profile '{config.target.profile}' is not available in this version",
            f"use one of: {', '.join(sorted(IMPLEMENTED_PROFILES))}",
        )
    if config.target.profile == "mobile":
        _require_mobile(config)
    if "ort" in config.target.formats and config.target.weight_format == "qdq":
        raise ConfigError(
            "target.formats ort with weight_format qdq: the ORT format has no 4-bit tensor type",
            "use weight_format: qdq8 (same codes in 8-bit storage) or matmul_nbits",
        )
    missing = set(config.target.formats) - IMPLEMENTED_FORMATS
    if missing:
        raise ConfigError(
            f"target.formats {sorted(missing)} not available in this version",
            "use formats: [onnx]",
        )


def _require_mobile(config: BuildConfig) -> None:
    """What the static mobile graph cannot express, refused before any weight loads."""
    if config.quantization.embedding != "float":
        raise ConfigError(
            "target.profile mobile with quantization.embedding "
            f"'{config.quantization.embedding}': the quantized embedding is a com.microsoft op no mobile EP runs",
            "set quantization.embedding: float",
        )
    evaluation, context = config.evaluation, config.target.max_context
    if (evaluation.text is not None and evaluation.seqlen > context) or evaluation.generate_tokens >= context:
        raise ConfigError(
            f"target.max_context {context} cannot hold verification's windows (evaluation.seqlen "
            f"{evaluation.seqlen}) or its prompt plus {evaluation.generate_tokens} generated tokens",
            "raise target.max_context or lower evaluation.seqlen / generate_tokens",
        )


def _check_files(config: BuildConfig) -> None:
    for key, value in (
        ("calibration.data", config.calibration.data),
        ("evaluation.text", config.evaluation.text),
    ):
        if value is not None and not value.is_file():
            raise ConfigError(f"{key}: file '{value}' not found", f"point '{key}' at a text file")
    out = config.output.dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir '{out}' exists and is a file", "choose another directory")
