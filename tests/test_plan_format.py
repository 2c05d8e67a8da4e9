"""The plan's on-disk format: declared once by the dataclass fields, version-checked on load."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aqexport.calibrate.norm_forms import NormStructure
from aqexport.calibrate.outliers import OutlierSplit
from aqexport.calibrate.plan import PLAN_FORMAT, BlockPlan, LinearPlan, QuantPlan
from aqexport.calibrate.plan_schema import from_record, to_record
from aqexport.calibrate.quantizer import QuantScheme
from aqexport.calibrate.statistics import ChannelStats
from aqexport.calibrate.structure import BlockStructure, NormGroup, OutPair, QkPair
from aqexport.errors import AqexportError

RECIPE = {"method": "affinequant", "epochs": 4, "weight": {"bits": 3, "group_size": 128}}
MODEL = {"source": "tiny-llama", "source_sha256": "a" * 64}


def _linear(generator: torch.Generator, out: int = 4, columns: int = 8, **extra) -> LinearPlan:
    scheme = QuantScheme(4, 4)
    return LinearPlan(
        scheme,
        torch.randint(0, 16, (out, columns), dtype=torch.uint8, generator=generator),
        torch.rand(out, 2, generator=generator) + 0.1,
        torch.randint(0, 16, (out, 2), generator=generator).float(),
        **extra,
    )


def _full_block(index: int = 0) -> BlockPlan:
    """A block holding every optional field of LinearPlan and BlockPlan."""
    g = torch.Generator().manual_seed(index)

    def stats() -> ChannelStats:
        absmax, shift = torch.rand(8, generator=g) * 9, torch.randn(8, generator=g)
        return ChannelStats(absmax, shift, torch.randint(0, 5, (8,), generator=g), 96, 6.0)

    linears = {
        "self_attn.q_proj": _linear(
            g,
            input_transform="input_layernorm",
            bias=torch.randn(4, generator=g, dtype=torch.float64),
            activation=QuantScheme(8),
            stats=stats(),
            input_shift="input_layernorm",
            act_scale=torch.tensor(0.0375),
            act_zero=torch.tensor(131.0),
            outlier=OutlierSplit("static", 6.0, torch.tensor([1, 5])),
            outlier_weight=torch.randn(4, 2, generator=g),
        ),
        "self_attn.k_proj": _linear(g, outlier=OutlierSplit("dynamic", 6.0), stats=stats()),
        "self_attn.v_proj": _linear(g, outlier=OutlierSplit("static", 6.0, torch.zeros(0, dtype=torch.long))),
        "self_attn.o_proj": _linear(g),
    }
    structure = BlockStructure(
        (NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 1.0, False),),
        OutPair("self_attn.v_proj", "self_attn.o_proj", 2, 1, 2),
        tuple(linears),
        QkPair("self_attn.q_proj", "self_attn.k_proj", 2, 1, 2),
    )
    return BlockPlan(
        index=index,
        linears=linears,
        norm_transforms={"input_layernorm": torch.randn(8, 8, generator=g, dtype=torch.float64)},
        out_transform=torch.randn(1, 2, 2, generator=g, dtype=torch.float64),
        structure=structure,
        matrix_reports={"input_layernorm": {"min_dominance_margin": 0.31, "condition": 7.5, "inverse_error": 1e-15}},
        loss_curve=[0.5, 0.25, 1 / 3],
        output_mse=1.2345e-4,
        seconds=2.5,
        qk_transform=torch.randn(1, 2, 2, generator=g, dtype=torch.float64),
        norm_shifts={"input_layernorm": torch.randn(8, generator=g, dtype=torch.float64)},
        static_activations=True,
        norm_structures={
            "input_layernorm": NormStructure(
                "kronecker",
                torch.rand(8, generator=g, dtype=torch.float64),
                [torch.randn(n, n, generator=g, dtype=torch.float64) for n in (2, 4)],
            ),
            "post_attention_layernorm": NormStructure(
                "block_diagonal",
                torch.rand(8, generator=g, dtype=torch.float64),
                [torch.randn(2, 4, 4, generator=g, dtype=torch.float64)],
            ),
            "final": NormStructure("dense", torch.ones(8, dtype=torch.float64)),
        },
    )


def _assert_same(expected, got, path: str = "") -> None:
    """Exact equality, tensors by dtype and ``torch.equal``, walking dataclasses and containers."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.dtype == expected.dtype and got.shape == expected.shape, path
        assert torch.equal(got, expected), path
    elif dataclasses.is_dataclass(expected):
        assert type(got) is type(expected), path
        for f in dataclasses.fields(expected):
            _assert_same(getattr(expected, f.name), getattr(got, f.name), f"{path}.{f.name}")
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected), path
        for key in expected:
            _assert_same(expected[key], got[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(expected, got)):
            _assert_same(a, b, f"{path}.{i}")
    else:
        assert type(got) is type(expected) and got == expected, path


def _saved(tmp_path, blocks=(0,)) -> QuantPlan:
    plan = QuantPlan.open(tmp_path, RECIPE, MODEL)
    plan.blocks_path = "model.layers"
    for index in blocks:
        plan.add_block(_full_block(index))
    return plan


def test_full_block_round_trips_exactly_through_disk(tmp_path):
    block = _full_block()
    _saved(tmp_path)
    loaded = QuantPlan.open(tmp_path, RECIPE, MODEL)
    assert loaded.blocks_path == "model.layers" and sorted(loaded.blocks) == [0]
    _assert_same(block, loaded.blocks[0])
    assert loaded.blocks[0].metadata() == block.metadata()
    assert json.loads((tmp_path / "plan.json").read_text())["blocks"]["0"] == block.metadata()
    expected, got = block.tensors(), load_file(str(tmp_path / "block_000.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) and expected[k].dtype == got[k].dtype for k in expected)


def test_layout_of_the_files(tmp_path):
    _saved(tmp_path)
    tensors = load_file(str(tmp_path / "block_000.safetensors"))
    q = "linears.self_attn.q_proj"
    assert {f"{q}.{n}" for n in ("codes", "scale", "zero", "bias", "act_scale", "outlier.channels")} <= tensors.keys()
    assert tensors[f"{q}.act_scale"].shape == () and tensors[f"{q}.stats.outliers"].dtype == torch.int64
    assert {"norm_transforms.input_layernorm", "norm_shifts.input_layernorm", "out_transform", "qk_transform"} <= (
        tensors.keys()
    )
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["format"] == PLAN_FORMAT == 6
    structures = saved["blocks"]["0"]["norm_structures"]
    assert structures["input_layernorm"] == {"form": "kronecker", "factors": [None, None]}
    assert structures["final"] == {"form": "dense", "factors": []}
    assert tensors["norm_structures.input_layernorm.factors.1"].shape == (4, 4)
    assert tensors["norm_structures.post_attention_layernorm.factors.0"].dtype == torch.float64
    linears = saved["blocks"]["0"]["linears"]
    assert linears["self_attn.q_proj"]["has_bias"] and not linears["self_attn.k_proj"]["has_bias"]
    assert linears["self_attn.q_proj"]["outlier"] == {"mode": "static", "threshold": 6.0, "channels": 2}
    assert linears["self_attn.k_proj"]["outlier"]["channels"] is None
    assert linears["self_attn.v_proj"]["outlier"]["channels"] == 0
    assert linears["self_attn.q_proj"]["stats"] == {"tokens": 96, "threshold": 6.0}


def test_declared_casts_apply_on_save():
    g = torch.Generator().manual_seed(1)
    entry = _linear(g, bias=torch.randn(4, generator=g), act_scale=torch.tensor([0.5], dtype=torch.float64))
    entry.scale = entry.scale.double()
    block = BlockPlan(0, {"x": entry}, {"n": torch.eye(8)}, None, BlockStructure((), None, ("x",)))
    tensors, meta = to_record(block)
    assert tensors["linears.x.scale"].dtype == torch.float32 and tensors["linears.x.bias"].dtype == torch.float64
    assert tensors["linears.x.act_scale"].shape == () and tensors["norm_transforms.n"].dtype == torch.float64
    loaded = from_record(BlockPlan, "", json.loads(json.dumps(meta)), tensors)
    assert loaded.out_transform is None and loaded.linears["x"].outlier is None
    assert loaded.linears["x"].act_zero is None and loaded.linears["x"].stats is None


@pytest.mark.parametrize("found", [3, 99, None])
def test_plan_of_another_format_is_refused(tmp_path, found):
    _saved(tmp_path)
    index = tmp_path / "plan.json"
    saved = json.loads(index.read_text())
    if found is None:
        del saved["format"]
    else:
        saved["format"] = found
    index.write_text(json.dumps(saved))
    with pytest.raises(AqexportError) as raised:
        QuantPlan.open(tmp_path, RECIPE, MODEL)
    message = str(raised.value)
    assert "\n" not in message
    assert f"plan formats 4, 5 and {PLAN_FORMAT}" in message
    assert (f"plan format {found}," if found is not None else "has no plan format") in message
    assert "recalibrate into a fresh plan_dir" in raised.value.fix


def test_format_4_plan_loads_with_plain_matrices_and_is_rewritten_as_current(tmp_path):
    """Plans written before norm-side forms existed (format 4) hold dense or diagonal matrices
    only: they load with no structures, and a resumed run rewrites the index in the new format."""
    _saved(tmp_path)
    index = tmp_path / "plan.json"
    saved = json.loads(index.read_text())
    saved["format"] = 4
    del saved["blocks"]["0"]["norm_structures"], saved["block_sha256"]  # format 4 predates both
    file = tmp_path / "block_000.safetensors"
    save_file({k: v for k, v in load_file(str(file)).items() if not k.startswith("norm_structures.")}, str(file))
    index.write_text(json.dumps(saved))
    plan = QuantPlan.open(tmp_path, RECIPE, MODEL)
    assert plan.blocks[0].norm_structures == {}
    _assert_same(_full_block().norm_transforms, plan.blocks[0].norm_transforms)
    plan.add_block(_full_block(1))
    assert json.loads(index.read_text())["format"] == PLAN_FORMAT
    assert sorted(QuantPlan.open(tmp_path, RECIPE, MODEL).blocks) == [0, 1]


def test_resume_loads_only_blocks_whose_file_landed(tmp_path):
    _saved(tmp_path, blocks=(0, 1))
    (tmp_path / "block_001.safetensors").unlink()
    assert sorted(QuantPlan.open(tmp_path, RECIPE, MODEL).blocks) == [0]


def test_block_file_that_does_not_match_the_index_is_refused(tmp_path):
    _saved(tmp_path)
    file = tmp_path / "block_000.safetensors"
    tensors = load_file(str(file))
    del tensors["linears.self_attn.q_proj.bias"]
    save_file(tensors, str(file))
    index = tmp_path / "plan.json"  # its sha256 recorded: a file the index vouches for, yet not its block
    saved = json.loads(index.read_text())
    saved["block_sha256"]["0"] = hashlib.sha256(file.read_bytes()).hexdigest()
    index.write_text(json.dumps(saved))
    with pytest.raises(AqexportError, match="has_bias"):
        QuantPlan.open(tmp_path, RECIPE, MODEL)


@pytest.mark.parametrize(
    "recipe, model, expected",
    [
        ({**RECIPE, "epochs": 20}, MODEL, "recipe.epochs: 4 != 20"),
        ({**RECIPE, "weight": {"bits": 4, "group_size": 128}}, MODEL, "recipe.weight.bits: 3 != 4"),
        ({**RECIPE, "lwc": True}, MODEL, "recipe.lwc: (missing) != true"),
        (RECIPE, {**MODEL, "source_sha256": "b" * 64}, "this build: model.source_sha256)"),
    ],
)
def test_plan_for_another_recipe_names_the_differing_key(tmp_path, recipe, model, expected):
    _saved(tmp_path)
    with pytest.raises(AqexportError) as raised:
        QuantPlan.open(tmp_path, recipe, model)
    message = str(raised.value)
    assert "\n" not in message and "another recipe" in message and expected in message
    assert "a" * 64 not in message
