"""``aqexport.lowering``: ``run_passes`` records each pass's stats and merges the passes' manifest
sections without naming a pass; a failed pre/postcondition is one ``PassContractError`` naming
the pass; the pass lists follow the target."""

from __future__ import annotations

import onnx_ir as ir
import pytest
import torch
from onnx_ir.passes import common as common_passes

from aqexport.calibrate.quantizer import QuantScheme
from aqexport.errors import AqexportError, PassContractError
from aqexport.lowering import LoweringResult, fp_passes, profile_passes, quantized_passes, run_passes
from aqexport.passes import PackMatMulNBitsPass, QuantizeWeightsPass
from aqexport.target import Target
from tests.passes._plans import float_input, initializer, linear_plan, model_of, one_block_plan


def _two_linears() -> tuple[ir.Model, dict]:
    torch.manual_seed(0)
    x = float_input("x", ["batch", 32])
    nodes, inits, linears = [], [], {}
    for name in ("q", "k"):
        weight = torch.randn(8, 32)
        linears[name] = linear_plan(weight, QuantScheme(4, 16))
        inits.append(initializer(f"layers.0.{name}.weight", weight.T.numpy()))
        nodes.append(ir.node("MatMul", [x, inits[-1]], name=f"/layers.0/{name}/MatMul"))
        nodes[-1].outputs[0].name = f"y_{name}"
    return model_of(nodes, [x], [node.outputs[0] for node in nodes], inits), one_block_plan(linears).linears()


def test_records_stats_and_merges_manifest_sections():
    model, linears = _two_linears()
    passes = [QuantizeWeightsPass(linears), PackMatMulNBitsPass(), common_passes.TopologicalSortPass()]
    result = run_passes(model, passes)
    assert isinstance(result, LoweringResult) and result.model is model
    assert [record["pass"] for record in result.records] == [
        "QuantizeWeightsPass",
        "PackMatMulNBitsPass",
        "TopologicalSortPass",
    ]
    quantize, pack, sort = result.records
    # the default cpu target emits 4-bit MatMulNBits at the fast level 4, which the build then measures
    assert quantize["stats"] == {"linears": 2, "weight_format": "matmul_nbits", "integer_activations": 2}
    assert pack["stats"] == {"groups": 1, "nodes_merged": 2} and pack["nodes_after"] == 2  # MatMulNBits + Split
    assert "stats" not in sort and set(sort) == {"pass", "modified", "nodes_before", "nodes_after", "seconds"}
    assert result.sections == {
        "quantization": {"integer_activation_linears": ["layers.0.q", "layers.0.k"]},
        "fusions": {"packed_matmul_nbits": [["/layers.0/q/MatMulNBits", "/layers.0/k/MatMulNBits"]]},
    }


def test_a_failed_precondition_is_one_error_naming_the_pass():
    model, linears = _two_linears()
    with pytest.raises(PassContractError, match="QuantizeWeightsPass: the planned linear 'layers.0.v'") as error:
        run_passes(model, [QuantizeWeightsPass({**linears, "layers.0.v": linears["layers.0.q"]})])
    assert error.value.pass_name == "QuantizeWeightsPass" and "StableNamesPass" in error.value.fix
    assert isinstance(error.value, AqexportError) and error.value.exit_code == 1


class _Broken(ir.passes.InPlacePass):
    """An onnx_ir-style pass whose ``ensures`` fails with a plain exception (onnx_ir wraps it)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=False)

    def ensures(self, model: ir.Model) -> None:
        raise ValueError("no graph output")


def test_onnx_ir_contract_errors_become_the_same_error():
    model, _ = _two_linears()
    with pytest.raises(PassContractError, match="_Broken: postcondition failed.*no graph output") as error:
        run_passes(model, [_Broken()])
    assert "bug" in error.value.fix


def test_pass_lists_follow_the_target():
    plan = one_block_plan({})
    names = lambda passes: [type(p).__name__ for p in passes]  # noqa: E731
    fused = names(quantized_passes(plan, None, None, Target()))
    assert fused[:5] == [
        "StableNamesPass",
        "FoldAffinePass",
        "ActivationQuantPass",
        "QuantizeWeightsPass",
        "QuantizeEmbeddingPass",
    ]
    assert fused[-8:] == [
        "CheckerPass",
        "OrtFusionsPass",
        "GroupQueryAttentionPass",
        "SharedKvBufferPass",
        "RemoveNoOpReshapesPass",
        "PackMatMulNBitsPass",
        "RemoveUnusedNodesPass",
        "TopologicalSortPass",
    ]
    assert "SharedKvBufferPass" not in names(quantized_passes(plan, None, None, Target(kv_cache="growing")))
    assert "OrtFusionsPass" not in names(quantized_passes(plan, None, None, Target(fuse=False)))
    assert "OrtFusionsPass" not in names(fp_passes(Target(profile="npu", fuse=False)))
    assert names(profile_passes(Target(profile="cuda"))) == ["Float16Pass"]
    assert "MobileOpsPass" in names(profile_passes(Target(profile="npu")))
    assert profile_passes(Target()) == profile_passes(Target(profile="mobile")) == []
    target = Target(weight_format="qdq", accuracy_level=4)
    quantize = next(p for p in quantized_passes(plan, None, None, target) if isinstance(p, QuantizeWeightsPass))
    assert quantize.target is target
