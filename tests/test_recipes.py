"""Recipes are registered configs: one list of methods, each validated on its own, composable
with a rounding method, and a new one needs no change outside its module."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aqexport.calibrate.data import calibration_windows
from aqexport.calibrate.engine import calibrate
from aqexport.calibrate.plan import QuantPlan
from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.capture import cache_layout
from aqexport.config import BuildConfig, load_config
from aqexport.errors import ConfigError
from aqexport.recipes import (
    QuantizedRecipeConfig,
    calibration_recipe,
    make_recipe,
    recipe_config,
    recipe_entry,
    recipe_names,
    register_recipe,
)
from aqexport.recipes import registry as recipe_registry
from aqexport.recipes.rtn import rtn_settings
from tests.conftest import tiny_build_config
from tests.tiny_models import data_file

ENGINE = Path(__file__).resolve().parents[1] / "aqexport" / "calibrate" / "engine.py"


def test_the_registry_is_the_one_list_of_methods():
    assert recipe_names() == ("affinequant", "llm_int8", "none", "omniquant", "rtn", "smoothquant")
    for name in recipe_names():
        entry = recipe_entry(name)
        assert entry.config_type.model_fields["recipe"].default == name
    with pytest.raises(ConfigError, match="use one of: affinequant, llm_int8, none"):
        recipe_entry("gptq")


def test_the_engine_never_branches_on_a_method_name():
    """Methods differ only in the ``CalibrationRecipe`` fields their handlers set."""
    tree = ast.parse(ENGINE.read_text())
    reads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "method"]
    assert not reads, f"engine.py reads .method at lines {[n.lineno for n in reads]}"


@pytest.mark.parametrize("name", ["rtn", "smoothquant", "omniquant", "affinequant"])
def test_every_method_maps_to_engine_settings(name):
    recipe = make_recipe(name, "w4a8", epochs=3, seed=5)
    assert isinstance(recipe, CalibrationRecipe) and recipe.method == name and recipe.seed == 5
    assert recipe.activation is not None and recipe.rounding.name == "nearest"
    assert recipe.trains == (name in ("omniquant", "affinequant"))


def test_a_config_round_trips_with_its_versions(tmp_path):
    config = load_config(
        tiny_build_config(
            tmp_path,
            tmp_path,
            quantization={
                "recipe": "affinequant",
                "preset": "w4a16",
                "rounding": {"method": "gptq", "dampening": 0.02},
            },
            calibration={"data": str(data_file("valid"))},
        )
    )
    dumped = config.model_dump(mode="json")
    assert dumped["quantization"]["version"] == 1 and dumped["quantization"]["rounding"]["version"] == 1
    assert BuildConfig.model_validate(dumped) == config
    with pytest.raises(ConfigError, match="version"):
        BuildConfig.model_validate({**dumped, "quantization": {**dumped["quantization"], "version": 7}})


class _SymmetricRtnConfig(QuantizedRecipeConfig):
    """A recipe defined outside the package: RTN with symmetric weights."""

    recipe: Literal["rtn_symmetric"] = "rtn_symmetric"


@pytest.fixture
def registered_symmetric_rtn():
    def handler(config, epochs, seed):
        recipe = rtn_settings(config, epochs, seed)
        weight = type(recipe.weight)(recipe.weight.bits, recipe.weight.group_size, symmetric=True)
        return type(recipe)(**{**vars(recipe), "weight": weight})

    register_recipe(_SymmetricRtnConfig)(handler)
    yield
    recipe_registry._RECIPES.pop("rtn_symmetric")


def test_a_new_recipe_needs_only_its_registration(registered_symmetric_rtn, tmp_path):
    path = tiny_build_config(
        tmp_path,
        tmp_path,
        quantization={"recipe": "rtn_symmetric", "preset": "w4a16g128", "lm_head": "int8"},
        calibration={"data": str(data_file("valid"))},
    )
    config = load_config(path)
    recipe = calibration_recipe(config.quantization, config.calibration.epochs, config.calibration.seed)
    assert recipe.method == "rtn_symmetric" and recipe.weight.symmetric and recipe.epochs == 0
    with pytest.raises(ConfigError, match="applies to recipe llm_int8 only"):
        make_recipe("rtn_symmetric", "w4a16", outlier_threshold=2.0)


def _block_errors(tiny_model_dir, recipe) -> float:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    layout = cache_layout(model)
    windows = calibration_windows(tokenizer, data_file("valid"), 6, 48, 2)
    plan = QuantPlan(recipe.as_dict(), {})
    calibrate(model, windows, recipe, plan, layout.head_dims[0], layout.kv_heads[0])
    for block in plan.blocks.values():
        for entry in block.linears.values():  # GPTQ chooses codes on the frozen grid
            assert int(entry.codes.min()) >= entry.scheme.qmin and int(entry.codes.max()) <= entry.scheme.qmax
    return sum(block.output_mse for block in plan.blocks.values())


@pytest.mark.parametrize("method", ["rtn", "affinequant"])
def test_gptq_rounding_composes_and_lowers_block_error(tiny_model_dir, method):
    torch.manual_seed(0)
    nearest = _block_errors(tiny_model_dir, make_recipe(method, "w3a16g128", epochs=2))
    gptq = _block_errors(tiny_model_dir, make_recipe(method, "w3a16g128", epochs=2, rounding="gptq"))
    assert gptq < nearest, (gptq, nearest)


@pytest.mark.parametrize(
    "preset, configured, expected",
    [
        ("w4a16g128", None, "diagonal"),  # measured: no run-time inverse, +0.3 % ppl against dense
        ("w3a16g128", None, "diagonal"),
        ("w4a8", None, "dense"),  # activations quantized: the norm-side transform tames their outliers
        ("w4a4", None, "dense"),
        ("w4a16g128", "dense", "dense"),
        ("w4a8", "kronecker", "kronecker"),
    ],
)
def test_affinequant_norm_form_defaults_by_preset(preset, configured, expected):
    raw = {"recipe": "affinequant", "preset": preset, **({"transform": configured} if configured else {})}
    assert calibration_recipe(recipe_config(raw), 4, 0).norm_form == expected


def _gptq_codes(tiny_model_dir, hessian_windows) -> list[torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    layout = cache_layout(model)
    recipe = make_recipe("rtn", "w4a16g128", rounding={"method": "gptq", "tokens": 480})
    plan = QuantPlan(recipe.as_dict(), {})
    windows = calibration_windows(tokenizer, data_file("valid"), 4, 48, 2)
    extra = None if hessian_windows is None else hessian_windows(tokenizer, windows)
    calibrate(model, windows, recipe, plan, layout.head_dims[0], layout.kv_heads[0], hessian_windows=extra)
    return [entry.codes for block in plan.blocks.values() for entry in block.linears.values()]


def test_gptq_hessians_come_from_the_hessian_windows_through_the_calibrated_blocks(tiny_model_dir):
    """The same windows given as Hessian windows give the same codes as none (the training
    windows' Hessians, propagated through the quantized blocks); more windows give other codes."""
    alone = _gptq_codes(tiny_model_dir, None)
    same = _gptq_codes(tiny_model_dir, lambda tokenizer, windows: windows.clone())
    more = _gptq_codes(
        tiny_model_dir, lambda tokenizer, windows: calibration_windows(tokenizer, data_file("valid"), 10, 48, 1002)
    )
    assert all(torch.equal(a, b) for a, b in zip(alone, same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(alone, more, strict=True))
