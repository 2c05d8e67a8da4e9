"""The recipe registry: config type → handler, the torchao ``quantize_`` way.

A recipe is a small frozen pydantic config (its own fields, validated on its own, dumped with a
``version``) plus a handler that turns it into the engine's settings
(``aqexport.calibrate.recipe.CalibrationRecipe``). Weight rounding is a second, composable axis:
a rounding config (``nearest``, ``gptq``) with its own handler that returns the engine's rounding
step, so any transform method composes with any rounding method (``recipe: affinequant`` +
``rounding: gptq``) without either knowing the other.

Why a registry and not an if-chain on names: the registry *is* the one list of methods. The
config schema (``aqexport.config``), the ``--help`` text, the error that names the valid
recipes and ``make_recipe`` all read it, so adding a method is one module that defines its
config and registers its handler, plus one import line in ``aqexport.recipes``.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aqexport.errors import ConfigError

__all__ = [
    "QuantizedRecipeConfig",
    "RecipeConfig",
    "RoundingConfig",
    "config_name",
    "recipe_entry",
    "recipe_names",
    "register_recipe",
    "register_rounding",
    "rounding_entry",
    "rounding_names",
]

PresetName = Literal["w4a16", "w4a16g128", "w4a16g32", "w3a16g128", "w8a16", "w8a8", "w4a8", "w4a4"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The config's schema version, written into every dump (manifest, plan identity) so a reader
    #: can tell which fields a saved config had. Bump it when a field's meaning changes.
    VERSION: ClassVar[int] = 1
    version: int = Field(1, description="schema version of this config")

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != cls.VERSION:
            raise ValueError(f"{cls.__name__} is version {cls.VERSION}, this config says {value}")
        return value


class RoundingConfig(_Frozen):
    """How a frozen, transformed weight becomes integer codes. ``method`` names the subclass."""

    method: str


class RecipeConfig(_Frozen):
    """The ``quantization:`` section. ``recipe`` names the subclass."""

    #: Whether the recipe quantizes anything (and so needs calibration text and a preset).
    CALIBRATED: ClassVar[bool] = True
    #: Whether ``preset`` must be given (a method that fixes its own schemes sets False).
    NEEDS_PRESET: ClassVar[bool] = True

    recipe: str


class QuantizedRecipeConfig(RecipeConfig):
    """Fields every quantizing recipe shares: the scheme, activations, rounding, the model's ends."""

    preset: PresetName | None = None
    activations: Literal["dynamic", "static"] = Field(
        "dynamic", description="activation ranges per token at run time, or per tensor fixed from calibration"
    )
    rounding: Any = Field(
        "nearest",
        validate_default=True,
        description="weight rounding after the transforms: nearest, or gptq (error-compensating, on the inputs "
        "each linear sees in the calibrated model); a name or a mapping with 'method' and its options",
    )
    lm_head: Literal["float", "int8", "int4"] = Field(
        "float", description="the LM head as MatMulNBits: int8 in groups of 128, int4 symmetric in groups of 32"
    )
    lm_head_method: Literal["auto", "gptq", "rtn"] = Field(
        "auto",
        description="GPTQ on the head's inputs from the calibrated model (calibration.head_tokens of them), "
        "or round-to-nearest; auto: GPTQ for int4, RTN for int8 (SmolLM2 int8 build: RTN 27.91, GPTQ 27.98)",
    )
    embedding: Literal["float", "int8", "int4", "tied", "auto"] = Field(
        "float",
        description="the token embedding as GatherBlockQuantized: int8/int4 RTN in groups of 128, or tied: it "
        "reads the quantized LM head's table (models that tie the two; one table stored instead of two); auto: "
        "tied where the model ties them and the head is quantized, int4 otherwise",
    )

    @field_validator("rounding", mode="before")
    @classmethod
    def _rounding(cls, value: Any) -> RoundingConfig:
        """A bare name (``rounding: gptq``) or a mapping (``{method: gptq, dampening: 0.02}``)."""
        if isinstance(value, RoundingConfig):
            return value
        raw = {"method": value} if isinstance(value, str) else dict(value)
        entry = rounding_entry(str(raw.get("method")))
        try:
            return entry.config_type.model_validate(raw)
        except ValidationError as exc:  # one line naming the key, like every other config error
            error = exc.errors()[0]
            key = ".".join(["quantization.rounding", *(str(part) for part in error["loc"])])
            raise ConfigError(
                f"bad value for '{key}': {error['msg']}", f"see rounding '{entry.name}' options"
            ) from None

    @property
    def head_method(self) -> str | None:
        """``auto``: GPTQ where RTN loses (int4), RTN where it is already near-lossless (int8)."""
        if self.lm_head == "float":
            return None
        if self.lm_head_method == "auto":
            return "gptq" if self.lm_head == "int4" else "rtn"
        return self.lm_head_method


@dataclass(frozen=True)
class Entry:
    name: str
    config_type: type[BaseModel]
    handler: Callable[..., Any]


_RECIPES: dict[str, Entry] = {}
_ROUNDINGS: dict[str, Entry] = {}


def config_name(config_type: type[BaseModel], key: str) -> str:
    """The one value of a ``Literal`` discriminator field (``recipe`` / ``method``)."""
    annotation = typing.get_type_hints(config_type)[key]
    values = typing.get_args(annotation)
    if typing.get_origin(annotation) is not Literal or len(values) != 1:
        raise TypeError(f"{config_type.__name__}.{key} must be a Literal of one name")
    return values[0]


def _register(table: dict[str, Entry], key: str, config_type: type[BaseModel]):
    name = config_name(config_type, key)

    def decorator(handler: Callable[..., Any]) -> Callable[..., Any]:
        if name in table and table[name].config_type is not config_type:
            raise ValueError(
                f"'{name}' is registered twice ({table[name].config_type.__name__}, {config_type.__name__})"
            )
        table[name] = Entry(name, config_type, handler)
        return handler

    return decorator


def register_recipe(config_type: type[RecipeConfig]):
    """``@register_recipe(MyConfig)`` on ``handler(config, epochs, seed) -> CalibrationRecipe | None``."""
    return _register(_RECIPES, "recipe", config_type)


def register_rounding(config_type: type[RoundingConfig]):
    """``@register_rounding(MyRounding)`` on ``handler(config) -> engine rounding step``."""
    return _register(_ROUNDINGS, "method", config_type)


def _lookup(table: dict[str, Entry], name: str, what: str) -> Entry:
    if name not in table:
        raise ConfigError(f"{what} '{name}' is not available", f"use one of: {', '.join(sorted(table))}")
    return table[name]


def recipe_entry(name: str) -> Entry:
    return _lookup(_RECIPES, name, "quantization.recipe")


def rounding_entry(name: str) -> Entry:
    return _lookup(_ROUNDINGS, name, "quantization.rounding")


def recipe_names() -> tuple[str, ...]:
    return tuple(sorted(_RECIPES))


def rounding_names() -> tuple[str, ...]:
    return tuple(sorted(_ROUNDINGS))
