"""The *what* of a build: ``model.yaml`` as frozen, validated pydantic models.

Every section forbids unknown keys, because a misspelt key that is silently ignored (``sequlen``)
gives a build that looks fine and measures the wrong thing. Relative paths are resolved against
the folder of the YAML file, not the current directory, so a config means the same thing
wherever the command is run from. ``load_config`` turns every validation failure into one
``ConfigError`` line naming the key and the fix.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aqexport.errors import ConfigError, explain_validation_error
from aqexport.memory_budget import parse_size
from aqexport.recipes import RecipeConfig, recipe_config, recipe_entry, recipe_names
from aqexport.recipes.none import NoQuantizationConfig
from aqexport.yaml_files import read_yaml_mapping

__all__ = [
    "BuildConfig",
    "CalibrationSpec",
    "EvaluationSpec",
    "ModelSpec",
    "OutputSpec",
    "QuantizationSpec",
    "TargetSpec",
    "load_config",
    "require_calibratable",
]

Provider = Literal["cpu", "cuda", "xnnpack", "nnapi", "coreml", "qnn"]


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
    windows_per_step: int = Field(
        1,
        ge=1,
        description="calibration windows whose mean loss makes one optimizer step; under torchrun the ranks "
        "share each step's windows (aqexport.calibrate.data_parallel), so it must be at least the rank count",
    )
    plan_dir: Path | None = Field(None, description="where the QuantPlan lives; default: <output.dir>.plan")
    head_tokens: int = Field(
        16384,
        ge=16,
        description="calibration tokens the LM head's GPTQ Hessian is estimated from (forward passes only; "
        "SmolLM2's int4 head: ppl 27.85 from 4096, 27.43 from 16384)",
    )

    _resolve = field_validator("data", "plan_dir")(_resolve_path)


#: ``quantization:`` holds an instance of the recipe's own config class (a ``RecipeConfig``).
QuantizationSpec = Annotated[SerializeAsAny[RecipeConfig], BeforeValidator(recipe_config)]


#: What a profile sets where the config leaves a ``target:`` key out (or null): the phone's CPU
#: artifact's context and ARM kernel level, the static graph's cache slots and EP.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mobile": {"max_context": 2048, "accuracy_level": 4},
    "npu": {"max_context": 512, "npu": "coreml"},
}
#: npu: the prefill graph's tokens per call unless set (at most ``max_context``); Qualcomm's
#: NPU pipelines pair a 128-token graph with a one-token one the same way (AR-128 / AR-1).
PREFILL_TOKENS = 128
#: What the mobile profile quantizes unless the config says otherwise (quantizing recipes only).
MOBILE_QUANTIZATION_DEFAULTS = {"lm_head": "int4", "embedding": "auto"}


class TargetSpec(_Section):
    profile: Literal["cpu", "cuda", "mobile", "npu"] = Field(
        "cpu",
        description="cpu: float32 activations, MatMulNBits; cuda: float16; mobile: the cpu graph sized for a "
        "phone's CPU EP (int4 LM head, embedding tied to it or int4, unless set, accuracy_level 4, max_context, "
        "model.ort and "
        "required_operators_and_types.config); npu: static step graph + model.ort + per-EP usability report",
    )
    npu: Literal["nnapi", "coreml", "qnn"] | None = Field(
        None,
        description="npu profile: the EP the static graph is meant for, reported first (default coreml); "
        "coreml stores the plan's weights as float16 values (its EP has no DequantizeLinear), nnapi as QDQ, qnn as "
        "QDQ with uint16 activations around every linear (w4a16)",
    )
    providers: tuple[Provider, ...] = ("cpu",)
    opset: int = Field(21, ge=21, le=23)
    formats: tuple[Literal["onnx", "ort"], ...] = ("onnx",)
    fuse: bool = Field(True, description="ONNX Runtime contrib-op fusions (RMSNorm, skip-RMSNorm, rotary, attention)")
    weight_format: Literal["matmul_nbits", "qdq", "qdq8"] = Field(
        "matmul_nbits",
        description="com.microsoft.MatMulNBits (CPU/CUDA kernels), or standard DequantizeLinear → MatMul (any EP); "
        "qdq8 stores 2-4-bit codes in 8-bit tensors, which the ORT format (model.ort) needs",
    )
    max_context: int | None = Field(
        None,
        ge=8,
        le=32768,
        description="mobile: the positions (prompt + generated tokens) genai_config.json and the rotary tables "
        "are sized for, default 2048; npu: the static KV cache's slots, default 512; unused on cpu / cuda",
    )
    prefill_tokens: int | None = Field(
        None,
        ge=2,
        le=4096,
        description="npu: the tokens the prefill graph (prefill.onnx) takes per call, a prompt running through "
        "it in chunks of this many; it shares model.onnx.data with the step graph; default 128 (at most "
        "max_context); npu only",
    )
    kv_cache: Literal["auto", "shared_buffer", "growing"] = Field(
        "auto",
        description="shared_buffer: the genai model builder's KV contract (GroupQueryAttention writes into a "
        "preallocated buffer, past_present_share_buffer: true); growing: past and present are separate "
        "tensors, copied every token; auto: shared_buffer when every attention fused into "
        "GroupQueryAttention, else growing (the manifest's kv_cache section says why)",
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None,
        description="MatMulNBits accuracy_level; null: 4 for 8-bit weights (ONNX Runtime's CPU EP has no fast "
        "float kernel for them: 50 ms vs 0.24 ms for SmolLM2's LM head); for 2-4-bit ones on the cpu profile, "
        "measured: 4 (int8 activations per block, the fast path) if the verified perplexity stays within "
        "accuracy_tolerance of the fake-quant model's, else 0 (float); 4 on the mobile profile (the int8 path "
        "is the one MLAS's ARM kernels accelerate); 0 on other profiles",
    )
    accuracy_tolerance: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="auto accuracy_level: the relative perplexity increase over the plan's fake-quant model "
        "that level 4 may cost before the build falls back to level 0",
    )

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, raw: Any) -> Any:
        """Fill what the profile decides where the config leaves it out, so the recorded config
        (manifest, build identity) names the values the build used."""
        if not isinstance(raw, dict):
            return raw
        defaults = PROFILE_DEFAULTS.get(str(raw.get("profile", "cpu")), {})
        filled = {**raw, **{key: value for key, value in defaults.items() if raw.get(key) is None}}
        if (
            filled.get("profile") == "npu"
            and filled.get("prefill_tokens") is None
            and isinstance(filled["max_context"], int)
        ):
            filled["prefill_tokens"] = min(PREFILL_TOKENS, filled["max_context"])
        return filled


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


class BuildSpec(_Section):
    """How the build may use this machine (``aqexport.memory_budget``); nothing here changes the
    artifact, so none of it is in the build identity."""

    max_memory: str | float | None = Field(
        None,
        description="memory the build may hold: a size such as 16GB or 512MiB, or a number of GiB; the build "
        "is refused before loading when the model's weights alone exceed it, and stopped with one clear error "
        "when its resident memory passes it (default: 90% of the machine's)",
    )

    stream: Literal["auto", "always", "never"] = Field(
        "auto",
        description="load the model one decoder block at a time from its safetensors checkpoint or GGUF file "
        "(the same artifact, byte for byte; every pass over the model reads the weights again): auto streams "
        "every local GGUF, and safetensors whose weights exceed 40% of max_memory (aqexport.stream_choice)",
    )

    @field_validator("max_memory")
    @classmethod
    def _size(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            parse_size(value)  # ValueError: pydantic reports the key and the expected form
        return value


class OutputSpec(_Section):
    dir: Path

    _resolve = field_validator("dir")(_resolve_path)


class BuildConfig(_Section):
    """The whole config, validated once: fields section by section, then the rules that span
    sections (``_required_inputs`` before, ``_target_can_express`` after), so every command
    that holds a ``BuildConfig`` holds a buildable one."""

    model: ModelSpec = ModelSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    quantization: QuantizationSpec = NoQuantizationConfig()
    target: TargetSpec = TargetSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    build: BuildSpec = BuildSpec()
    output: OutputSpec

    @model_validator(mode="before")
    @classmethod
    def _required_inputs(cls, raw: Any) -> Any:
        """What a recipe cannot start without is reported before any misplaced key: an unknown
        recipe, a missing preset, missing calibration text."""
        if not isinstance(raw, dict) or not isinstance(raw.get("quantization"), dict):
            return raw
        quantization = raw["quantization"]
        config_type = recipe_entry(str(quantization.get("recipe", "none"))).config_type
        target = raw.get("target")
        if isinstance(target, dict) and target.get("profile") == "mobile":
            defaults = {k: v for k, v in MOBILE_QUANTIZATION_DEFAULTS.items() if k in config_type.model_fields}
            quantization = {**defaults, **quantization}
            raw = {**raw, "quantization": quantization}
        if config_type.NEEDS_PRESET and quantization.get("preset") is None:
            raise ConfigError("missing key 'quantization.preset'", "add e.g. 'preset: w4a16g128'")
        calibration = raw.get("calibration") or {}
        if config_type.CALIBRATED and isinstance(calibration, dict) and calibration.get("data") is None:
            raise ConfigError("missing key 'calibration.data'", "point it at the calibration text (WikiText-2 valid)")
        return raw

    @model_validator(mode="after")
    def _target_can_express(self) -> BuildConfig:
        target = self.target
        if target.profile in ("mobile", "npu"):
            _require_context(self)
        else:
            for key in ("max_context", "npu"):
                if getattr(target, key) is not None:
                    raise ConfigError(
                        f"target.{key} applies to the mobile / npu profiles, not '{target.profile}'",
                        f"remove target.{key}, or set target.profile: mobile (or npu)",
                    )
        if target.profile == "mobile":
            _require_mobile(self)
        if target.profile == "npu":
            _require_npu(self)
        elif target.npu is not None or target.prefill_tokens is not None:
            name = "npu" if target.npu is not None else "prefill_tokens"
            raise ConfigError(
                f"target.{name} applies to profile npu", f"remove target.{name}, or set target.profile: npu"
            )
        if "ort" in target.formats and target.weight_format == "qdq":
            raise ConfigError(
                "target.formats ort with weight_format qdq: the ORT format has no 4-bit tensor type",
                "use weight_format: qdq8 (same codes in 8-bit storage) or matmul_nbits",
            )
        if getattr(self.quantization, "embedding", "float") == "tied":
            _require_head_table(self)
        if target.kv_cache == "shared_buffer" and (target.profile == "npu" or not target.fuse):
            raise ConfigError(
                "target.kv_cache shared_buffer needs the fused GroupQueryAttention graph, which "
                + ("the npu profile does not build" if target.profile == "npu" else "fuse: false turns off"),
                "use target.kv_cache: auto or growing",
            )
        return self

    def plan_dir(self) -> Path:
        return self.calibration.plan_dir or self.output.dir.with_name(self.output.dir.name + ".plan")

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def sha256(self) -> str:
        """Hash of the validated config (not the YAML text), so comments don't change it."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BuildConfig:
    """Read and validate a YAML config; every failure is one ``ConfigError``."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config file", "pass the path of a model.yaml", "sections", "examples/*.yaml")
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
        first = explain_validation_error(errors[0], BuildConfig)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{path}: {first.cause}{more}", first.fix) from None
    except ConfigError as exc:  # a rule spanning sections, raised by a validator
        raise ConfigError(f"{path}: {exc.cause}", exc.fix) from None
    _check_files(config)
    return config


def require_calibratable(config: BuildConfig) -> None:
    """``aqexport calibrate`` needs a recipe that calibrates something (the rest of what it needs,
    a preset and calibration text, every quantized config already has)."""
    if not type(config.quantization).CALIBRATED:
        calibrated = [name for name in recipe_names() if recipe_entry(name).config_type.CALIBRATED]
        raise ConfigError(
            f"quantization.recipe '{config.quantization.recipe}' cannot be calibrated",
            f"use one of: {', '.join(calibrated)}",
        )


def _require_context(config: BuildConfig) -> None:
    """Verification must fit the positions a mobile / npu artifact is sized for."""
    evaluation, context = config.evaluation, config.target.max_context
    if (evaluation.text is not None and evaluation.seqlen > context) or evaluation.generate_tokens >= context:
        raise ConfigError(
            f"target.max_context {context} cannot hold verification's windows (evaluation.seqlen "
            f"{evaluation.seqlen}) or its prompt plus {evaluation.generate_tokens} generated tokens",
            "raise target.max_context or lower evaluation.seqlen / generate_tokens",
        )


def _require_mobile(config: BuildConfig) -> None:
    """The mobile profile is the CPU EP's MatMulNBits artifact: what only the static npu graph
    takes (QDQ weight storage, an NPU execution provider) is refused with the profile to use."""
    target = config.target
    if target.weight_format != "matmul_nbits":
        raise ConfigError(
            f"target.profile mobile with weight_format {target.weight_format}: the mobile artifact runs "
            "MatMulNBits on the phone's CPU EP; QDQ weights are for the static NPU graph",
            "remove target.weight_format, or set target.profile: npu for NNAPI / CoreML / QNN",
        )
    npu_providers = [p for p in target.providers if p not in ("cpu", "xnnpack")]
    if npu_providers:
        raise ConfigError(
            f"target.profile mobile with providers {npu_providers}: the mobile artifact is the CPU EP's "
            "(dynamic shapes, com.microsoft ops); NPU EPs take the static graph",
            "use providers: [cpu], or set target.profile: npu",
        )


def _require_npu(config: BuildConfig) -> None:
    """What the static npu graph cannot express, refused before any weight loads."""
    target = config.target
    if target.prefill_tokens > target.max_context:
        raise ConfigError(
            f"target.prefill_tokens {target.prefill_tokens} is more than the {target.max_context} cache slots "
            "(target.max_context) a prompt is written into",
            f"set target.prefill_tokens to at most {target.max_context}",
        )
    if getattr(config.quantization, "embedding", "float") != "float":
        raise ConfigError(
            "target.profile npu with quantization.embedding "
            f"'{config.quantization.embedding}': the quantized embedding is a com.microsoft op no NPU EP runs",
            "set quantization.embedding: float",
        )


def _require_head_table(config: BuildConfig) -> None:
    """``embedding: tied`` reads the head's MatMulNBits codes: a quantized head in that format."""
    if config.quantization.lm_head == "float":
        raise ConfigError(
            "quantization.embedding tied reads the quantized LM head's table, but lm_head is float",
            "set quantization.lm_head: int4 or int8, or embedding: int4",
        )
    if config.target.weight_format != "matmul_nbits":
        raise ConfigError(
            f"quantization.embedding tied reads the head's MatMulNBits codes; weight_format "
            f"{config.target.weight_format} stores none",
            "use target.weight_format: matmul_nbits, or embedding: int4",
        )


def _check_files(config: BuildConfig) -> None:
    for key, value in (
        ("calibration.data", config.calibration.data),
        ("evaluation.text", config.evaluation.text),
    ):
        if value is not None and not value.is_file():
            raise ConfigError(f"{key}: file '{value}' not found", f"point '{key}' at a text file")
        problem = None if value is None else _text_problem(value)
        if problem is not None:
            raise ConfigError(f"{key}: file '{value}' {problem}", f"point '{key}' at a UTF-8 text (WikiText-2's)")
    out = config.output.dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output.dir '{out}' exists and is a file", "choose another directory")


def _text_problem(path: Path, head: int = 1 << 16) -> str | None:
    """Why ``path`` cannot be a text to calibrate or evaluate on, from its first ``head`` bytes
    (a text of a few tokens is caught once the tokenizer is loaded; this needs none)."""
    with path.open("rb") as handle:
        data = handle.read(head)
    if not data.strip() and len(data) < head:
        return "is empty" if not data else "holds only whitespace"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=len(data) < head)
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.start})"
    return None
