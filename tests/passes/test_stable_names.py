"""StableNamesPass, one smallest graph per numbered rule."""

from __future__ import annotations

import onnx_ir as ir

from aqexport.passes.stable_names import DERIVED_FROM_KEY, StableNamesPass


def _graph_with(nodes, initializers, inputs, outputs) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def _init(name: str, shape=(2, 2)) -> ir.Value:
    import numpy as np

    return ir.Value(name=name, const_value=ir.tensor(np.zeros(shape, dtype=np.float32), name=name))


def test_rules_1_to_4():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 2]))
    w = _init("model.model.layers.0.mlp.up_proj.weight")
    folded = _init("val_7")
    folded.metadata_props["pkg.onnxscript.optimizer.folded_from"] = "['model.model.layers.0.q_proj.weight']"
    scope = "['', 'model', 'model.model', 'model.model.layers.0', 'model.model.layers.0.q_proj', 'linear']"
    mm1 = ir.node("MatMul", [x, folded], name="node_linear")
    mm1.metadata_props["pkg.torch.onnx.name_scopes"] = scope
    mm2 = ir.node("MatMul", [mm1.outputs[0], w], name="node_linear_1")
    mm2.metadata_props["pkg.torch.onnx.name_scopes"] = scope
    shape_math = ir.node("Identity", [mm2.outputs[0]], name="node_Shape_3")
    model = _graph_with([mm1, mm2, shape_math], [w, folded], [x], [shape_math.outputs[0]])

    result = StableNamesPass()(model)

    assert result.modified and result.stats == {"initializers": 2, "nodes": 2}
    names = set(model.graph.initializers)
    assert names == {"model.layers.0.mlp.up_proj.weight", "model.layers.0.q_proj.weight"}  # rules 1, 2
    assert model.graph.initializers["model.layers.0.q_proj.weight"].metadata_props[DERIVED_FROM_KEY]
    assert [n.name for n in model.graph] == [
        "/model/layers.0/q_proj/MatMul",  # rule 3
        "/model/layers.0/q_proj/MatMul_1",
        "node_Shape_3",  # rule 4
    ]


def test_collisions_are_left_alone():
    a = _init("model.w")
    b = _init("w")
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 2]))
    add = ir.node("Add", [a, b])
    model = _graph_with([add], [a, b], [x], [add.outputs[0]])
    StableNamesPass()(model)
    assert set(model.graph.initializers) == {"model.w", "w"}
