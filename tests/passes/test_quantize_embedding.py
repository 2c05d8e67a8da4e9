"""QuantizeEmbeddingPass: GatherBlockQuantized returns exactly the plan's dequantized rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
import torch

from aqexport.calibrate.edges import EMBEDDING_SCHEMES
from aqexport.errors import AqexportError
from aqexport.passes.quantize_embedding import QuantizeEmbeddingPass
from tests.passes._plans import initializer, linear_plan, model_of, run


def _gather_graph(table: torch.Tensor, also_matmul: bool = False) -> ir.Model:
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    weight = initializer("embed.weight", table.numpy())
    gather = ir.node("Gather", [weight, ids], {"axis": 0}, name="/embed/Gather")
    nodes = [gather]
    if also_matmul:  # a tied LM head reading the same table
        nodes.append(ir.node("MatMul", [gather.outputs[0], weight], name="/head/MatMul"))
    out = nodes[-1].outputs[0]
    out.name = "y"
    return model_of(nodes, [ids], [out], [weight])


@pytest.mark.parametrize("fmt, hidden", [("int4", 320), ("int4", 200), ("int8", 200), ("int4", 576)])  # 200: ragged
def test_rule_1_2_rows_equal_the_dequantized_plan(fmt, hidden):
    torch.manual_seed(0)
    table = torch.randn(64, hidden)
    entry = linear_plan(table, EMBEDDING_SCHEMES[fmt])
    model = _gather_graph(table)
    result = QuantizeEmbeddingPass({"embed": entry})(model)
    assert result.modified and result.stats == {"embeddings": 1, "lookups": 1}
    assert [node.op_type for node in model.graph] == ["GatherBlockQuantized"]
    ids = np.array([[0, 5, 63, 5]], dtype=np.int64)
    np.testing.assert_array_equal(run(model, ids=ids), entry.dequantize().numpy()[ids])


@pytest.mark.parametrize("hidden, group, block", [(576, 128, 32), (2048, 128, 128), (960, 128, 32), (64, 128, 32)])
def test_rule_1_rows_tile_into_an_even_number_of_uniform_blocks(hidden, group, block):
    """ONNX Runtime's CUDA kernel finds a block by flat element index: every row must hold a
    whole, even number of blocks (SmolLM2's 576 = 4.5 x 128 gave perplexity 1610 on an H100)."""
    torch.manual_seed(0)
    table = torch.randn(8, hidden)
    entry = linear_plan(table, dataclasses.replace(EMBEDDING_SCHEMES["int4"], group_size=group))
    model = _gather_graph(table)
    QuantizeEmbeddingPass({"embed": entry})(model)
    node = next(iter(model.graph))
    assert node.attributes["block_size"].value == block
    assert node.inputs[2].const_value.shape == (8, hidden // block)
    ids = np.array([[0, 7, 3]], dtype=np.int64)
    np.testing.assert_array_equal(run(model, ids=ids), entry.dequantize().numpy()[ids])


def test_table_shared_with_a_matmul_is_refused():
    table = torch.randn(16, 16)
    with pytest.raises(AqexportError, match="untie"):
        QuantizeEmbeddingPass({"embed": linear_plan(table, EMBEDDING_SCHEMES["int4"])})(_gather_graph(table, True))
