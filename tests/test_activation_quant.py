"""Statistics pass, SmoothQuant scales, the RoPE-commuting q·k transform, activation presets."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoTokenizer

from aqexport.calibrate.block_inputs import catch_block_inputs
from aqexport.calibrate.data import calibration_windows
from aqexport.calibrate.engine import apply_plan, calibrate, smoothquant_scales
from aqexport.calibrate.fold import BlockTransforms, transformed_weights
from aqexport.calibrate.plan import QuantPlan
from aqexport.calibrate.statistics import StatisticsCollector
from aqexport.calibrate.structure import decoder_blocks, discover_block, rotary_pair_matrix
from aqexport.calibrate.transforms import enforce_rotary_dominance_
from aqexport.capture import cache_layout
from aqexport.recipes import make_recipe
from tests.conftest import ARCHITECTURES
from tests.tiny_models import data_file


def _block0(tiny_model_dir, kind):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind), attn_implementation="sdpa").eval()
    layout = cache_layout(model)
    _, blocks = decoder_blocks(model)
    inputs = catch_block_inputs(model, blocks, torch.randint(4, 300, (2, 24)))
    structure = discover_block(blocks[0], inputs.hidden[:1], inputs.kwargs[0], layout.head_dims[0], layout.kv_heads[0])
    return model, blocks[0], inputs, structure


def _out(result):
    return result[0] if isinstance(result, tuple) else result


def test_statistics_match_a_direct_computation():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 4))
    batches = [torch.randn(1, 5, 8) * 4, torch.randn(1, 7, 8) * 4]
    with StatisticsCollector(block, threshold=6.0) as collector:
        for x in batches:
            block(x)
    stats = collector.stats["0"]
    flat = torch.cat([x.reshape(-1, 8) for x in batches])
    assert torch.equal(stats.absmax, flat.abs().amax(0))
    assert torch.equal(stats.outliers, (flat.abs() >= 6.0).sum(0))
    centers = [(x.reshape(-1, 8).amax(0) + x.reshape(-1, 8).amin(0)) / 2 for x in batches]
    assert torch.allclose(stats.shift, (centers[0] + centers[1]) / 2)
    assert stats.tokens == 12
    assert torch.equal(stats.outlier_channels(), torch.nonzero(stats.outliers).flatten())
    block(batches[0])  # hooks are gone after the context
    assert stats.tokens == 12


def test_smoothquant_scales_follow_the_formula(tiny_model_dir):
    _, block, inputs, structure = _block0(tiny_model_dir, "llama")
    with StatisticsCollector(block) as collector:
        block(inputs.hidden[:1], **inputs.kwargs[0])
    group = structure.norm_groups[0]
    stats = collector.stats[group.linears[0]]
    scales = smoothquant_scales(block, group.linears, stats, 0.5)
    weight_max = torch.stack([block.get_submodule(n).weight.abs().amax(0) for n in group.linears]).amax(0)
    expected = (stats.absmax.sqrt() / weight_max.sqrt()).clamp(min=1e-2)
    assert torch.allclose(scales, expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_qk_pair_is_found_exactly_where_a_rope_commuting_transform_is_exact(tiny_model_dir, kind):
    _, block, _, structure = _block0(tiny_model_dir, kind)
    if kind == "gemma3_text":
        # q_norm / k_norm sit between the projections and RoPE: no transform of this family is exact.
        assert structure.qk_pair is None
        return
    pair = structure.qk_pair
    assert pair is not None
    if pair.heads == pair.kv_heads:
        # Without GQA the scores q·kᵀ are symmetric in the two roles: either labelling is exact.
        assert {pair.query.rsplit(".", 1)[1], pair.key.rsplit(".", 1)[1]} == {"q_proj", "k_proj"}
    else:
        assert pair.query.endswith("q_proj") and pair.key.endswith("k_proj")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rope_qk_transform_preserves_outputs_and_a_dense_one_does_not(tiny_model_dir, kind):
    torch.manual_seed(0)
    _, block, inputs, structure = _block0(tiny_model_dir, kind)
    hidden, kwargs = inputs.hidden[:1], inputs.kwargs[0]
    pair = structure.qk_pair
    half = pair.head_dim // 2
    a = 1.5 + 0.3 * torch.randn(pair.kv_heads, half)
    b = 0.8 * torch.randn(pair.kv_heads, half)
    coefficients = torch.stack([a, b], dim=-2).double()
    enforce_rotary_dominance_(coefficients)
    weights, biases = transformed_weights(block, structure, BlockTransforms(qk=coefficients), torch.float64)
    overrides = {f"{n}.weight": w.float() for n, w in weights.items()}
    overrides.update({f"{n}.bias": b.float() for n, b in biases.items()})
    if kind == "qwen2":
        assert {structure.qk_pair.query, structure.qk_pair.key} <= set(biases)  # q/k biases move too
    with torch.no_grad():
        reference = _out(block(hidden, **kwargs))
        folded = _out(functional_call(block, overrides, (hidden,), kwargs))
        assert float((folded - reference).abs().max() / reference.abs().max()) <= 1e-4
        # The reference's dense per-head q·k matrix, applied before RoPE, is not exact.
        dense = torch.eye(pair.head_dim) + 0.3 * torch.randn(pair.kv_heads, pair.head_dim, pair.head_dim)
        q = block.get_submodule(pair.query).weight
        k = block.get_submodule(pair.key).weight
        repeat = pair.heads // pair.kv_heads
        q_new = dense.repeat_interleave(repeat, 0).transpose(-1, -2) @ q.reshape(pair.heads, pair.head_dim, -1)
        k_new = torch.linalg.inv(dense) @ k.reshape(pair.kv_heads, pair.head_dim, -1)
        broken = _out(
            functional_call(
                block,
                {f"{pair.query}.weight": q_new.reshape(q.shape), f"{pair.key}.weight": k_new.reshape(k.shape)},
                (hidden,),
                kwargs,
            )
        )
        assert float((broken - reference).abs().max() / reference.abs().max()) > 1e-2


def test_rotary_pair_matrix_commutes_with_a_rotation():
    coefficients = torch.tensor([[[0.9, 1.2], [0.3, -0.4]]], dtype=torch.float64)  # [1, 2, d/2 = 2]
    r = rotary_pair_matrix(coefficients)[0]
    theta = torch.tensor([0.7, -1.9], dtype=torch.float64)
    rotation = rotary_pair_matrix(torch.stack([theta.cos(), theta.sin()])[None])[0]
    assert torch.allclose(r @ rotation, rotation @ r)
    norm2 = (coefficients[0] ** 2).sum(0).repeat(2)
    assert torch.allclose(torch.linalg.inv(r).T, r / norm2[None, :])


def _calibrated(tiny_model_dir, preset, method="affinequant", kind="llama", **training):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind), attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(kind))
    layout = cache_layout(model)
    windows = calibration_windows(tokenizer, data_file("valid"), 4, 32, 2)
    recipe = make_recipe(method, preset, epochs=2, **training)
    plan = QuantPlan(recipe.as_dict(), {})
    calibrate(model, windows, recipe, plan, layout.head_dims[0], layout.kv_heads[0])
    return model, plan


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_activation_preset_quantizes_every_linear_input_per_token(tiny_model_dir, kind):
    model, plan = _calibrated(tiny_model_dir, "w4a4", kind=kind)
    seen = {}
    _, blocks = decoder_blocks(model)
    block = blocks[0]
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, a[0].detach()))
        for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(torch.tensor([[5, 9, 40, 7, 3, 11, 12]]))
    for handle in handles:
        handle.remove()
    assert set(seen) == set(plan.blocks[0].linears)
    # OPT's LayerNorms have biases: the trained shift δ is recorded and its linears' biases moved.
    shifted = {e.input_shift for b in plan.blocks.values() for e in b.linears.values()} - {None}
    assert bool(shifted) == (kind == "opt")
    assert all(set(b.norm_shifts) == shifted for b in plan.blocks.values())
    for name, x in seen.items():
        for token in x.reshape(-1, x.shape[-1]):
            assert torch.unique(token).numel() <= 16, name  # 4-bit: at most 16 levels per token
    # The fake-quant model rebuilt from the plan alone is the calibrated one, bit for bit.
    rebuilt = apply_plan(AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind), attn_implementation="sdpa"), plan)
    ids = torch.tensor([[5, 9, 40, 7, 3]])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(ids).logits, model(ids).logits)


def test_plan_round_trips_activation_scheme_stats_and_qk(tiny_model_dir, tmp_path):
    _, plan = _calibrated(tiny_model_dir, "w4a8", kind="qwen2")
    plan.save(tmp_path)
    loaded = QuantPlan.open(tmp_path, plan.recipe, plan.model)
    for index, block in plan.blocks.items():
        other = loaded.blocks[index]
        assert other.structure == block.structure and block.structure.qk_pair is not None
        assert other.qk_transform is not None and torch.equal(other.qk_transform, block.qk_transform)
        for name, entry in block.linears.items():
            assert other.linears[name].activation == entry.activation and entry.activation.bits == 8
            assert torch.equal(other.linears[name].stats.absmax, entry.stats.absmax)
            assert other.linears[name].stats.tokens == entry.stats.tokens == 4 * 32
        assert "qk" in block.matrix_reports and block.matrix_reports["qk"]["min_dominance_margin"] > 0


def test_smoothquant_recipe_reduces_w8a8_error_against_rtn(tiny_model_dir):
    errors = {}
    for method in ("rtn", "smoothquant"):
        _, plan = _calibrated(tiny_model_dir, "w8a8", method=method, kind="opt")
        errors[method] = sum(b.output_mse for b in plan.blocks.values())
        if method == "smoothquant":
            assert all(b.norm_transforms for b in plan.blocks.values())
            assert all(b.out_transform is None and b.qk_transform is None for b in plan.blocks.values())
    assert errors["smoothquant"] < errors["rtn"], errors


def test_static_activations_share_one_calibrated_grid_per_tensor(tiny_model_dir, tmp_path):
    model, plan = _calibrated(tiny_model_dir, "w8a8", kind="qwen2", static_activations=True)
    for block in plan.blocks.values():
        assert block.static_activations
        for entry in block.linears.values():
            assert entry.act_scale is not None and entry.act_scale.ndim == 0 and float(entry.act_scale) > 0
    seen = {}
    _, blocks = decoder_blocks(model)
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, a[0].detach()))
        for name, module in blocks[1].named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(torch.tensor([[5, 9, 40, 7, 3, 11, 12, 80, 120]]))
    for handle in handles:
        handle.remove()
    for name, x in seen.items():
        entry = plan.blocks[1].linears[name]
        codes = x / entry.act_scale + entry.act_zero
        assert torch.allclose(codes, codes.round(), atol=1e-3), name  # every token on the same static grid
    plan.save(tmp_path)
    loaded = QuantPlan.open(tmp_path, plan.recipe, plan.model)
    rebuilt = apply_plan(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), attn_implementation="sdpa"), loaded
    )
    ids = torch.tensor([[5, 9, 40, 7, 3]])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(ids).logits, model(ids).logits)


def test_float64_training_and_aug_loss_give_a_float32_fake_quant_model(tiny_model_dir):
    model, plan = _calibrated(tiny_model_dir, "w4a8", kind="llama", train_dtype="float64", aug_loss=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert plan.recipe["train_dtype"] == "float64" and plan.recipe["aug_loss"]
    for block in plan.blocks.values():
        assert len(block.loss_curve) == 2 and all(torch.isfinite(torch.tensor(block.loss_curve)))
        assert all(r["min_dominance_margin"] > 0 for r in block.matrix_reports.values())
