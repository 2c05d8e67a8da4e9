"""FoldAffinePass: each numbered rule on the smallest norm → two-linear graph, checked numerically.

A fold is right when the graph, given the plan's transformed float weights ``W Aᵀ`` and biases
``b + W δ``, computes what the untouched graph computed with ``W`` and ``b``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from aqexport.calibrate.norm_forms import NormStructure
from aqexport.calibrate.quantizer import QuantScheme
from aqexport.errors import AqexportError
from aqexport.passes.fold_affine import FoldAffinePass
from tests.passes._plans import float_input, initializer, linear_plan, model_of, one_block_plan, run

H = 16
RNG = np.random.default_rng(0)
WEIGHTS = {name: RNG.standard_normal((8, H)).astype(np.float32) for name in ("fc1", "fc2")}
BIASES = {name: RNG.standard_normal(8).astype(np.float32) for name in ("fc1", "fc2")}


def _graph(norm: str, transformed: dict | None = None, extra_consumer: bool = False) -> ir.Model:
    """x → norm → (fc1, fc2) → sum; ``transformed`` swaps in ``(weights, biases)`` after folding."""
    weights, biases = transformed or (WEIGHTS, BIASES)
    x = float_input("x", [1, 3, H])
    gamma = initializer("layers.0.norm.weight", np.linspace(0.5, 2.0, H))
    inits = [gamma]
    if norm == "layer_norm":
        beta = initializer("layers.0.norm.bias", np.linspace(-1, 1, H))
        inits.append(beta)
        norm_node = ir.node("LayerNormalization", [x, gamma, beta], {"axis": -1}, name="/layers.0/norm/LN")
    else:  # RMSNorm as exported: x · rsqrt(mean(x²) + eps) · w
        two = initializer("two", np.asarray(2.0))
        eps = initializer("eps", np.asarray(1e-6))
        axes = ir.Value(name="axes", const_value=ir.tensor(np.asarray([-1], np.int64), name="axes"))
        inits += [two, eps, axes]
        pow_ = ir.node("Pow", [x, two])
        mean = ir.node("ReduceMean", [pow_.outputs[0], axes])
        add = ir.node("Add", [mean.outputs[0], eps])
        root = ir.node("Sqrt", [add.outputs[0]])
        inv = ir.node("Reciprocal", [root.outputs[0]])
        normed = ir.node("Mul", [x, inv.outputs[0]])
        norm_node = ir.node("Mul", [normed.outputs[0], gamma], name="/layers.0/norm/Mul_1")
        pre = [pow_, mean, add, root, inv, normed]
    nodes = [] if norm == "layer_norm" else pre
    nodes.append(norm_node)
    h = norm_node.outputs[0]
    outs = []
    for name in ("fc1", "fc2"):
        w = initializer(f"layers.0.{name}.weight", weights[name].T)
        b = initializer(f"layers.0.{name}.bias", biases[name])
        inits += [w, b]
        mm = ir.node("MatMul", [h, w], name=f"/layers.0/{name}/MatMul")
        ad = ir.node("Add", [mm.outputs[0], b], name=f"/layers.0/{name}/Add")
        nodes += [mm, ad]
        outs.append(ad.outputs[0])
    total = ir.node("Add", outs)
    nodes.append(total)
    result = total.outputs[0]
    if extra_consumer:  # the norm output also feeds something outside the group
        nodes.append(ir.node("ReduceSum", [h], {"keepdims": 0}))
        extra = ir.node("Add", [result, nodes[-1].outputs[0]])
        nodes.append(extra)
        result = extra.outputs[0]
    result.name = "y"
    return model_of(nodes, [x], [result], inits)


def _plan(matrix: torch.Tensor, shift: torch.Tensor | None):
    entries = {
        name: linear_plan(
            torch.from_numpy(WEIGHTS[name]) @ matrix.float().T,
            QuantScheme(8, None),
            input_transform="norm",
            input_shift=None if shift is None else "norm",
        )
        for name in ("fc1", "fc2")
    }
    return one_block_plan(
        entries, norm_transforms={"norm": matrix}, norm_shifts={} if shift is None else {"norm": shift}
    )


def _transformed(matrix: torch.Tensor, shift: torch.Tensor | None) -> tuple[dict, dict]:
    a = matrix.double().numpy()
    weights = {name: (WEIGHTS[name].astype(np.float64) @ a.T).astype(np.float32) for name in WEIGHTS}
    biases = {
        name: (BIASES[name] + (0 if shift is None else WEIGHTS[name].astype(np.float64) @ shift.numpy())).astype(
            np.float32
        )
        for name in BIASES
    }
    return weights, biases


def _check(norm: str, matrix: torch.Tensor, shift: torch.Tensor | None, extra_consumer: bool = False) -> dict:
    """Fold, check the function; returns the pass's stats."""
    x = RNG.standard_normal((1, 3, H)).astype(np.float32)
    expected = run(_graph(norm, extra_consumer=extra_consumer), x=x)
    folded = _graph(norm, _transformed(matrix, shift), extra_consumer=extra_consumer)
    result = FoldAffinePass(_plan(matrix, shift))(folded)
    np.testing.assert_allclose(run(folded, x=x), expected, rtol=1e-4, atol=1e-4)
    return result.stats


def _diagonal() -> torch.Tensor:
    return torch.diag(torch.linspace(0.3, 3.0, H, dtype=torch.float64))


def test_rule_1_diagonal_and_shift_fold_into_layer_norm():
    stats = _check("layer_norm", _diagonal(), torch.linspace(-0.5, 0.5, H, dtype=torch.float64))
    assert stats["placements"] == {"layer_norm": 1}


def test_rule_2_diagonal_folds_into_the_rms_norm_weight():
    stats = _check("rms_norm", _diagonal(), None)
    assert stats["placements"] == {"norm_weight": 1}


def test_rule_3_dense_transform_is_an_explicit_matmul():
    torch.manual_seed(0)
    dense = torch.eye(H, dtype=torch.float64) * 2 + 0.05 * torch.randn(H, H, dtype=torch.float64)
    model = _graph("layer_norm", _transformed(dense, None))
    FoldAffinePass(_plan(dense, None))(model)
    assert "/layers.0/norm/AffineInverse/MatMul" in {node.name for node in model.graph}
    stats = _check("layer_norm", dense, torch.linspace(-0.5, 0.5, H, dtype=torch.float64))
    assert stats["placements"] == {"explicit_matmul": 1}
    # Sub(δ) then the dense MatMul: H elementwise + 2·H² flops, (H + H²) float32 weights read
    cost = {"flops_per_token": H + 2 * H * H, "bytes_per_token": 4 * (H + H * H), "transforms": 1}
    assert stats["run_time_cost"] == cost
    assert stats["transforms"]["layers.0.norm"]["form"] == "dense"


def test_rule_3_shared_norm_output_is_not_folded_into_the_norm():
    stats = _check("rms_norm", _diagonal(), None, extra_consumer=True)
    assert stats["placements"] == {"explicit_mul": 1}


def test_a_reused_pass_reports_each_call_alone():
    fold = FoldAffinePass(_plan(_diagonal(), None))
    first = fold(_graph("rms_norm", _transformed(_diagonal(), None)))
    second = fold(_graph("rms_norm", _transformed(_diagonal(), None)))
    assert first.stats == second.stats and first.stats["placements"] == {"norm_weight": 1}
    assert first.stats["run_time_cost"] == {"flops_per_token": 0, "bytes_per_token": 0, "transforms": 0}


def test_a_plan_for_another_model_is_a_precondition_error():
    plan = _plan(_diagonal(), None)
    model = _graph("rms_norm")
    model.graph.initializers["layers.0.fc2.weight"].name = "renamed"  # a graph without module-path names
    with pytest.raises(ir.passes.PreconditionError, match="do not share one input") as error:
        FoldAffinePass(plan)(model)
    assert isinstance(error.value, AqexportError) and "StableNamesPass" in error.value.fix


def test_numpy_inverse_matches_the_float32_of_torch():
    """The explicit inverse is computed in numpy (no torch in graph passes): same float32 values
    as ``torch.linalg.inv(A).float()``, which the pass computed before."""
    torch.manual_seed(0)
    dense = torch.eye(H, dtype=torch.float64) * 2 + 0.05 * torch.randn(H, H, dtype=torch.float64)
    model = _graph("layer_norm")
    FoldAffinePass(_plan(dense, None))(model)
    stored = model.graph.initializers["layers.0.norm.inverse"].const_value.numpy()
    np.testing.assert_array_equal(stored, torch.linalg.inv(dense).float().numpy())


@pytest.mark.parametrize(
    ("norm", "shift", "extra_consumer"),
    [("layer_norm", True, False), ("rms_norm", False, False), ("rms_norm", False, True)],
)
def test_a_diagonal_stored_as_its_vector_folds_as_its_matrix(norm, shift, extra_consumer):
    """Plan format 6 stores a diagonal ``A`` as its diagonal; format 5 stored the d × d matrix.
    Both fold to the same graph, initializer for initializer."""
    matrix = _diagonal()
    delta = torch.linspace(-0.5, 0.5, H, dtype=torch.float64) if shift else None
    folded = {}
    for storage in ("matrix", "vector"):
        plan = _plan(matrix, delta)
        if storage == "vector":
            plan.blocks[0].norm_transforms["norm"] = torch.diagonal(matrix).clone()
        model = _graph(norm, _transformed(matrix, delta), extra_consumer=extra_consumer)
        stats = FoldAffinePass(plan)(model).stats
        folded[storage] = (
            stats["placements"],
            {v.name: v.const_value.numpy() for v in model.graph.initializers.values()},
        )
    assert folded["vector"][0] == folded["matrix"][0]
    assert folded["vector"][1].keys() == folded["matrix"][1].keys()
    assert all(np.array_equal(folded["vector"][1][k], folded["matrix"][1][k]) for k in folded["matrix"][1])


def test_a_vector_recorded_as_a_dense_transform_is_refused():
    plan = _plan(_diagonal(), None)
    plan.blocks[0].norm_transforms["norm"] = torch.linspace(0.3, 3.0, H, dtype=torch.float64)
    plan.blocks[0].norm_structures["norm"] = NormStructure("dense", torch.ones(H, dtype=torch.float64))
    with pytest.raises(ir.passes.PreconditionError, match="records a dense transform but stores a vector"):
        FoldAffinePass(plan)(_graph("rms_norm", _transformed(_diagonal(), None)))
