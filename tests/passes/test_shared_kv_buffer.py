"""SharedKvBufferPass on the one-layer attention of ``test_group_query_attention``: after the GQA
fusion the cache inputs feed GroupQueryAttention only and the pass declares the shared buffer; a
graph whose cache is still read elsewhere keeps the growing contract (auto, with the reason in
the manifest) or is refused (``required``). ONNX Runtime runs the declared graph in place."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes import common as common_passes

from aqexport.errors import AqexportError
from aqexport.passes import GroupQueryAttentionPass, SharedKvBufferPass
from aqexport.passes.shared_kv_buffer import KV_CACHE_METADATA_KEY
from tests.passes.test_group_query_attention import _graph


def _past_length_read(model: ir.Model) -> None:
    """Add what the exporter's mask code does: read the past length off the cache tensor."""
    graph = model.graph
    past = next(v for v in graph.inputs if v.name == "past_key_values.0.value")
    tape = ir.tape.Tape()
    length = tape.op("Shape", [past], attributes={"start": 2, "end": 3})
    length.name = "past_length"
    graph.extend(tape.nodes)
    graph.outputs.append(length)


def test_fused_graph_gets_the_shared_buffer_and_its_past_length_from_the_mask():
    model = _graph()
    _past_length_read(model)
    GroupQueryAttentionPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    result = SharedKvBufferPass(required=True)(model)
    assert result.modified and result.stats == {"shapes_rewritten": 1}
    assert result.manifest["kv_cache"]["contract"] == "shared_buffer"
    assert model.metadata_props[KV_CACHE_METADATA_KEY] == "shared_buffer"
    caches = [value for value in model.graph.inputs if value.name.startswith("past")]
    readers = {node.op_type for value in caches for node, _ in value.uses()}
    assert readers == {"GroupQueryAttention"}
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString())
    feeds = {
        "input_ids": np.zeros((2, 1), np.int64),
        "attention_mask": np.ones((2, 6), np.int64),
        "x": np.zeros((2, 1, 32), np.float32),
        "attention_bias": np.zeros((2, 1, 1, 6), np.float32),
        # a buffer of 16 slots, 5 of them filled: the past length must come out as 5, not 16
        "past_key_values.0.key": np.zeros((2, 2, 16, 8), np.float32),
        "past_key_values.0.value": np.zeros((2, 2, 16, 8), np.float32),
    }
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert outputs["past_length"].tolist() == [5]


def test_unfused_cache_keeps_the_growing_contract_and_says_why():
    model = _graph()  # no GQA fusion: the cache concat still reads the past
    result = SharedKvBufferPass()(model)
    assert not result.modified
    assert result.manifest["kv_cache"]["contract"] == "growing"
    assert "Concat" in result.manifest["kv_cache"]["reason"]
    assert model.metadata_props[KV_CACHE_METADATA_KEY] == "growing"


def test_required_shared_buffer_on_an_unfused_graph_is_a_precondition_error():
    with pytest.raises(ir.passes.PreconditionError, match="kv_cache") as error:
        SharedKvBufferPass(required=True)(_graph())
    assert isinstance(error.value, AqexportError)
