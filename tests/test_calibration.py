"""Calibration engine on tiny models: structure discovery, exact folding, ordering, resume."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoTokenizer

from aqexport.calibrate.block_inputs import catch_block_inputs
from aqexport.calibrate.data import calibration_windows
from aqexport.calibrate.engine import apply_plan, calibrate, frozen_inverse
from aqexport.calibrate.fold import BlockTransforms, compact_norm_transform, transformed_weights
from aqexport.calibrate.input_hooks import InputState, install_input_hooks
from aqexport.calibrate.plan import QuantPlan
from aqexport.calibrate.structure import decoder_blocks, discover_block
from aqexport.calibrate.transforms import enforce_dominance_
from aqexport.capture import cache_layout
from aqexport.recipes import make_recipe
from tests.conftest import ARCHITECTURES
from tests.tiny_models import data_file

EXPECTED_GROUPS = {
    "llama": {"input_layernorm": 3, "post_attention_layernorm": 2},
    "qwen2": {"input_layernorm": 3, "post_attention_layernorm": 2},
    "gemma3_text": {"input_layernorm": 3, "pre_feedforward_layernorm": 2},
    "opt": {"self_attn_layer_norm": 3, "final_layer_norm": 1},
}


def _load(tiny_model_dir, kind):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind), attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir(kind))


def _first_block(model):
    layout = cache_layout(model)
    _, blocks = decoder_blocks(model)
    inputs = catch_block_inputs(model, blocks, torch.randint(4, 300, (2, 24)))
    return blocks, inputs, layout


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_structure_is_discovered_without_names(tiny_model_dir, kind):
    model, _ = _load(tiny_model_dir, kind)
    blocks, inputs, layout = _first_block(model)
    structure = discover_block(blocks[0], inputs.hidden[:1], inputs.kwargs[0], layout.head_dims[0], layout.kv_heads[0])
    assert {g.norm: len(g.linears) for g in structure.norm_groups} == EXPECTED_GROUPS[kind]
    assert structure.out_pair is not None and structure.out_pair.producer.endswith("v_proj")
    assert structure.out_pair.consumer.endswith(("o_proj", "out_proj"))
    # The MLP's last linear has no foldable predecessor.
    assert not any(lin.endswith(("down_proj", "fc2")) for g in structure.norm_groups for lin in g.linears)
    assert {g.weight_offset for g in structure.norm_groups} == ({1.0} if kind == "gemma3_text" else {0.0})


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_folding_random_transforms_preserves_fp_outputs(tiny_model_dir, kind):
    """Dense norm transforms, shifts (where the norm has a bias), out and q·k transforms at once,
    through the same fold algebra and input hooks the engine trains and freezes with."""
    torch.manual_seed(0)
    model, _ = _load(tiny_model_dir, kind)
    blocks, inputs, layout = _first_block(model)
    block, kwargs, hidden = blocks[0], inputs.kwargs[0], inputs.hidden[:1]
    structure = discover_block(block, hidden, kwargs, layout.head_dims[0], layout.kv_heads[0])
    transforms = BlockTransforms()
    for group in structure.norm_groups:
        width = block.get_submodule(group.linears[0]).in_features
        matrix = torch.eye(width, dtype=torch.float64) * 2 + 0.2 * torch.randn(width, width, dtype=torch.float64)
        enforce_dominance_(matrix, torch.ones_like(matrix), 0.05)
        transforms.norm[group.norm] = matrix
        if group.has_bias:
            transforms.shift[group.norm] = torch.randn(width, dtype=torch.float64)
    assert (kind == "opt") == bool(transforms.shift)  # OPT's LayerNorms have biases
    pair = structure.out_pair
    transforms.out = torch.eye(pair.head_dim, dtype=torch.float64) + 0.1 * torch.randn(
        pair.kv_heads, pair.head_dim, pair.head_dim, dtype=torch.float64
    )
    if structure.qk_pair is not None:
        half = pair.head_dim // 2
        transforms.qk = torch.stack(
            [1 + 0.2 * torch.rand(pair.kv_heads, half), 0.3 * torch.rand(pair.kv_heads, half)], -2
        )
    weights, biases = transformed_weights(block, structure, transforms, torch.float64)
    overrides = {f"{name}.weight": weight.float() for name, weight in weights.items()}
    overrides.update({f"{name}.bias": bias.float() for name, bias in biases.items()})
    state = InputState(
        inverses={norm: torch.linalg.inv(a).float() for norm, a in transforms.norm.items()},
        shifts={norm: shift.float() for norm, shift in transforms.shift.items()},
    )
    with torch.no_grad():
        reference = block(hidden, **kwargs)
        install_input_hooks(block, structure, state)
        folded = functional_call(block, overrides, (hidden,), kwargs)
        install_input_hooks(block, structure, InputState())
    reference = reference[0] if isinstance(reference, tuple) else reference
    folded = folded[0] if isinstance(folded, tuple) else folded
    assert float((folded - reference).abs().max() / reference.abs().max()) <= 1e-4


def _calibrate(tiny_model_dir, method, plan, stop_after=None, kind="llama", **options):
    model, tokenizer = _load(tiny_model_dir, kind)
    layout = cache_layout(model)
    windows = calibration_windows(tokenizer, data_file("valid"), 6, 48, 2)
    recipe = make_recipe(method, "w3a16g128", epochs=3, **options)

    def stop(done, total):
        if stop_after is not None and done == stop_after:
            raise KeyboardInterrupt

    calibrate(model, windows, recipe, plan, layout.head_dims[0], layout.kv_heads[0], on_block=stop)
    return model


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_methods_order_by_block_error(tiny_model_dir, kind):
    errors = {}
    for method in ("rtn", "omniquant", "affinequant"):
        dense = {"transform": "dense"} if method == "affinequant" else {}  # the paper's form (default: diagonal)
        recipe = make_recipe(method, "w3a16g128", epochs=3, **dense)
        plan = QuantPlan(recipe.as_dict(), {})
        _calibrate(tiny_model_dir, method, plan, kind=kind, **dense)
        errors[method] = sum(b.output_mse for b in plan.blocks.values())
        for block in plan.blocks.values():
            for report in block.matrix_reports.values():
                assert report["min_dominance_margin"] > 0 and report["inverse_error"] < 1e-10
    assert errors["affinequant"] < errors["omniquant"] < errors["rtn"], errors


def test_a_diagonal_transform_is_inverted_as_a_vector_with_the_dense_values():
    """The frozen hooks hold a diagonal ``A⁻¹`` as its diagonal, and ``(x − δ)A⁻¹`` is the dense
    product bit for bit; any other ``A`` keeps its dense inverse."""
    generator = torch.Generator().manual_seed(0)
    diagonal = torch.diag(torch.rand(576, generator=generator, dtype=torch.float64) * 3 + 0.1)
    dense = diagonal + 0.01 * torch.rand(576, 576, generator=generator, dtype=torch.float64)
    x = torch.randn(3, 7, 576, generator=generator)
    for matrix, ndim in ((diagonal, 1), (dense, 2)):
        inverse = frozen_inverse(matrix)
        assert inverse.ndim == ndim
        held = InputState(inverses={"norm": inverse}).map("linear", "norm", x)
        assert torch.equal(held, x @ torch.linalg.inv(matrix).float())


def test_a_diagonal_norm_transform_folds_as_a_vector_with_the_dense_values(tiny_model_dir):
    """Training and freezing hand a diagonal ``A`` to the fold as its diagonal: the weights are
    the dense product's bit for bit, a frozen plan's d × d diagonal is compacted to it, and the
    out transform applied per head equals the block-diagonal product."""
    model, _ = _load(tiny_model_dir, "llama")
    blocks, inputs, layout = _first_block(model)
    block = blocks[0]
    structure = discover_block(block, inputs.hidden[:1], inputs.kwargs[0], layout.head_dims[0], layout.kv_heads[0])
    generator = torch.Generator().manual_seed(0)
    pair = structure.out_pair
    out = torch.eye(pair.head_dim, dtype=torch.float64) + 0.1 * torch.randn(
        pair.kv_heads, pair.head_dim, pair.head_dim, generator=generator, dtype=torch.float64
    )
    vectors = {}
    for group in structure.norm_groups:
        width = block.get_submodule(group.linears[0]).in_features
        vectors[group.norm] = torch.rand(width, generator=generator, dtype=torch.float64) * 3 + 0.1
    matrices = {norm: torch.diag(vector) for norm, vector in vectors.items()}
    assert all(torch.equal(compact_norm_transform(matrices[norm]), vectors[norm]) for norm in vectors)
    by_vector, _ = transformed_weights(block, structure, BlockTransforms(vectors, out=out), torch.float64)
    by_matrix, _ = transformed_weights(block, structure, BlockTransforms(matrices, out=out), torch.float64)
    grouped = {name for group in structure.norm_groups for name in group.linears}
    assert grouped and all(torch.equal(by_vector[name], by_matrix[name]) for name in grouped)
    heads = block.get_submodule(pair.consumer).in_features // pair.head_dim
    dense_out = torch.block_diag(*out.repeat_interleave(heads // pair.kv_heads, dim=0).unbind(0))
    expected = block.get_submodule(pair.consumer).weight.double() @ dense_out.T
    torch.testing.assert_close(by_vector[pair.consumer], expected, rtol=1e-12, atol=1e-12)


def test_resume_after_interruption_gives_the_same_plan(tiny_model_dir, tmp_path):
    recipe = make_recipe("affinequant", "w3a16g128", epochs=3).as_dict()
    identity = {"source": "tiny-llama"}
    whole = QuantPlan.open(tmp_path / "whole", recipe, identity)
    _calibrate(tiny_model_dir, "affinequant", whole)

    with pytest.raises(KeyboardInterrupt):
        _calibrate(tiny_model_dir, "affinequant", QuantPlan.open(tmp_path / "resumed", recipe, identity), stop_after=1)
    partial = QuantPlan.open(tmp_path / "resumed", recipe, identity)
    assert sorted(partial.blocks) == [0]
    _calibrate(tiny_model_dir, "affinequant", partial)
    resumed = QuantPlan.open(tmp_path / "resumed", recipe, identity)
    assert sorted(resumed.blocks) == sorted(whole.blocks) == [0, 1]
    calibrated = _calibrate(tiny_model_dir, "affinequant", QuantPlan.open(tmp_path / "whole", recipe, identity))
    rebuilt = apply_plan(_load(tiny_model_dir, "llama")[0], whole)
    ids = torch.tensor([[5, 9, 40, 7, 3]])
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, calibrated(ids).logits)
    for index in whole.blocks:
        expected, got = whole.blocks[index].tensors(), resumed.blocks[index].tensors()
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (index, key)


def test_plan_for_another_recipe_is_refused(tmp_path):
    from aqexport.errors import AqexportError

    QuantPlan.open(tmp_path, {"method": "rtn"}, {}).save(tmp_path)
    with pytest.raises(AqexportError, match="another recipe"):
        QuantPlan.open(tmp_path, {"method": "affinequant"}, {})


def test_calibrate_command_writes_plan_and_report(tiny_model_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from aqexport.cli import cli
    from tests.conftest import tiny_build_config

    config = tiny_build_config(
        tmp_path,
        tiny_model_dir("qwen2"),
        quantization={"recipe": "affinequant", "preset": "w4a16g128"},
        calibration={"data": str(data_file("valid")), "samples": 4, "seqlen": 32, "epochs": 2},
    )
    result = CliRunner().invoke(cli, ["calibrate", str(config)])
    assert result.exit_code == 0, result.output
    plan_dir = tmp_path / "artifact.plan"
    report = json.loads((plan_dir / "report.json").read_text())
    assert report["evaluation"]["fake_quant_perplexity"] > 0 and report["min_dominance_margin"] > 0
    assert sorted(p.name for p in plan_dir.glob("block_*.safetensors")) == [
        "block_000.safetensors",
        "block_001.safetensors",
    ]
    plan = json.loads((plan_dir / "plan.json").read_text())
    linears = plan["blocks"]["0"]["linears"]
    assert linears["self_attn.q_proj"]["input_transform"] == "input_layernorm"
    assert linears["self_attn.v_proj"]["has_bias"]  # Qwen2's v bias moved by the out transform
    # A second run finds every block done and resumes without retraining.
    again = CliRunner().invoke(cli, ["calibrate", str(config)])
    assert again.exit_code == 0, again.output
    assert json.loads((plan_dir / "report.json").read_text())["resumed_from_block"] == 2


@pytest.mark.parametrize(
    "quantization, expected",
    [
        ({"recipe": "none"}, "cannot be calibrated"),
        ({"recipe": "rtn"}, "quantization.preset"),
        ({"recipe": "llm_int8", "preset": "w4a16"}, "is W8A8"),
        ({"recipe": "affinequant", "preset": "w4a16", "outlier_split": "static"}, "applies to recipe llm_int8 only"),
        ({"recipe": "llm_int8", "activations": "static"}, "per token"),
    ],
)
def test_calibrate_refuses_bad_recipes(tiny_model_dir, tmp_path, capsys, quantization, expected):
    from aqexport.cli import main
    from tests.conftest import tiny_build_config

    config = tiny_build_config(
        tmp_path, tiny_model_dir("llama"), quantization=quantization, calibration={"data": str(data_file("valid"))}
    )
    with pytest.raises(SystemExit) as info:
        main(["calibrate", str(config)])
    assert info.value.code == 2 and expected in capsys.readouterr().err
