"""TiedEmbeddingPass: the embedding's GatherBlockQuantized reads the LM head's MatMulNBits table and
returns exactly the head's dequantized rows; the head's own output does not change."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
import torch

from aqexport.calibrate.edges import HEAD_SCHEMES
from aqexport.errors import AqexportError
from aqexport.passes.quantize_weights import pack_matmul_nbits
from aqexport.passes.tied_embedding import TiedEmbeddingPass
from tests.passes._plans import initializer, linear_plan, model_of, run_all


def _tied_graph(table: torch.Tensor, entry, block: int) -> ir.Model:
    """``ids → Gather(embed.weight) → MatMulNBits(head)``: a tied model's two ends after lowering."""
    vocab, hidden = table.shape
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    weight = initializer("embed.weight", table.numpy())
    packed, scales, zero_points, bits = pack_matmul_nbits(entry, block)
    head = [
        ir.Value(name=f"head.weight_Q{bits}", const_value=ir.tensor(packed, name=f"head.weight_Q{bits}")),
        initializer("head.weight_scales", scales),
    ]
    if zero_points is not None:
        head.append(ir.Value(name="head.weight_zero_points", const_value=ir.tensor(zero_points)))
    gather = ir.node("Gather", [weight, ids], {"axis": 0}, name="/embed/Gather")
    attributes = {"K": hidden, "N": vocab, "bits": bits, "block_size": block}
    matmul = ir.node(
        "MatMulNBits", [gather.outputs[0], *head], attributes, domain="com.microsoft", name="/head/MatMulNBits"
    )
    gather.outputs[0].name, matmul.outputs[0].name = "hidden", "logits"
    model = model_of([gather, matmul], [ids], [gather.outputs[0], matmul.outputs[0]], [weight, *head])
    model.opset_imports["com.microsoft"] = 1
    return model


@pytest.mark.parametrize(
    "scheme, hidden, block",
    [
        (HEAD_SCHEMES["int4"], 576, 32),  # SmolLM2's mobile head: symmetric, no zero points stored
        (HEAD_SCHEMES["int8"], 576, 128),  # 576 = 4.5 x 128: padded rows, sliced after the lookup
        (dataclasses.replace(HEAD_SCHEMES["int4"], symmetric=False), 96, 32),  # zero points packed over 3 blocks
    ],
)
def test_lookup_returns_the_heads_dequantized_rows(scheme, hidden, block):
    torch.manual_seed(0)
    table = torch.randn(64, hidden)
    entry = linear_plan(table, scheme)
    model = _tied_graph(table, entry, block)
    ids = np.array([[0, 5, 63, 5]], dtype=np.int64)
    before = run_all(model, ids=ids)[1]
    result = TiedEmbeddingPass({"embed": "head"})(model)
    assert result.modified and result.stats == {"ties": 1, "lookups": 1}
    assert "Gather" not in [node.op_type for node in model.graph]
    # the lookup reads the head's codes themselves, not a reshaped copy ONNX Runtime would fold
    (lookup,) = [node for node in model.graph if node.op_type == "GatherBlockQuantized"]
    assert lookup.inputs[0] is next(node for node in model.graph if node.op_type == "MatMulNBits").inputs[1]
    assert not model.graph.initializers["embed.weight"].uses()
    rows, logits = run_all(model, ids=ids)
    np.testing.assert_array_equal(rows, entry.dequantize().numpy()[ids])
    # the head reads the same codes as before the pass, now on the head's own rows
    expected = rows.reshape(-1, hidden) @ entry.dequantize().numpy().T
    np.testing.assert_allclose(logits.reshape(-1, 64), expected, rtol=1e-4, atol=1e-3)
    assert before.shape == logits.shape


def test_a_float_head_is_refused():
    table = torch.randn(16, 32)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    weight = initializer("embed.weight", table.numpy())
    gather = ir.node("Gather", [weight, ids], {"axis": 0}, name="/embed/Gather")
    model = model_of([gather], [ids], [gather.outputs[0]], [weight])
    with pytest.raises(AqexportError, match="not one MatMulNBits"):
        TiedEmbeddingPass({"embed": "head"})(model)
