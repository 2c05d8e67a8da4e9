"""OrtFusionsPass keeps onnxscript's own GroupQueryAttention rules off: their GQA drops the
model's attention mask and moves RoPE into the kernel, and it fired on exports of some
torch/transformers versions (on an H100 it then disagreed with the CPU EP on 11 of 12 tokens).
The rules are replaced by spies here, so the tests fail if the exclusion stops working."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxscript.rewriter.ort_fusions._core as onnxscript_fusions
import pytest

from aqexport.passes import OrtFusionsPass
from aqexport.passes import ort_fusions as ort_fusions_module
from aqexport.passes._contract import PostconditionFailed
from tests.passes._plans import float_input, initializer, model_of, run


def _matmul_model() -> ir.Model:
    x = float_input("x", ["batch", 4])
    weight = initializer("w", np.arange(8, dtype=np.float32).reshape(4, 2))
    node = ir.node("MatMul", [x, weight])
    node.outputs[0].name = "y"
    return model_of([node], [x], [node.outputs[0]], [weight])


def _inserting_gqa(calls: list[str], name: str):
    """A stand-in for an onnxscript rule that fires: it records the call and adds a
    GroupQueryAttention node whose output becomes a graph output (so cleanup keeps it)."""

    def rule(model: ir.Model, debug: bool = False, **kwargs) -> int:
        calls.append(name)
        x = model.graph.inputs[0]
        node = ir.node("GroupQueryAttention", [x, x, x], domain="com.microsoft")
        node.outputs[0].name = "attention"
        model.graph.append(node)
        model.graph.outputs.append(node.outputs[0])
        return 1

    return rule


@pytest.mark.parametrize("rule", ["fuse_gqa", "fuse_qkv_gqa"])
def test_onnxscript_gqa_rules_never_run(monkeypatch, rule):
    calls: list[str] = []
    monkeypatch.setattr(onnxscript_fusions, rule, _inserting_gqa(calls, rule))
    model = _matmul_model()
    OrtFusionsPass()(model)
    assert calls == []
    assert getattr(onnxscript_fusions, rule).__name__ == "rule"  # restored after the pass
    assert run(model, x=np.ones((1, 4), np.float32)).tolist() == [[12.0, 16.0]]


def test_a_gqa_left_by_onnxscript_is_refused(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(onnxscript_fusions, "fuse_gqa", _inserting_gqa(calls, "fuse_gqa"))
    monkeypatch.setattr(ort_fusions_module, "EXCLUDED_FUSIONS", ())
    with pytest.raises(PostconditionFailed, match="GroupQueryAttention"):
        OrtFusionsPass()(_matmul_model())
    assert calls == ["fuse_gqa"]
