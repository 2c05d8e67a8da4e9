"""GroupQueryAttentionPass on the smallest exported-style attention: one layer whose
``MultiHeadAttention`` reads the KV cache through ``Concat(past, new) → Unsqueeze → Expand →
Reshape → Transpose → Reshape``, as ``OrtFusionsPass`` leaves it. After the pass one
``GroupQueryAttention`` writes ``present`` itself, and ONNX Runtime computes the same output and
cache, with a causal, left-padded additive mask."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes import common as common_passes

from aqexport.errors import AqexportError
from aqexport.passes import GroupQueryAttentionPass
from tests.passes._plans import float_input, initializer, model_of, run_all

B, HEADS, KV_HEADS, D = 2, 4, 2, 8
HIDDEN = HEADS * D
MS = "com.microsoft"


def _ints(name: str, values) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(np.asarray(values, np.int64), name=name))


def _graph(cache: bool = True, mask_input: bool = True) -> ir.Model:
    """``cache=False``: the attention reads the new key/value only (no ``Concat`` with the past),
    which the rewrite does not match."""
    rng = np.random.default_rng(0)
    x = float_input("x", ["batch", "sequence", HIDDEN])
    bias = float_input("attention_bias", ["batch", 1, "sequence", "total"])
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "sequence"]))
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "total"]))
    pasts = [float_input(f"past_key_values.0.{kind}", ["batch", KV_HEADS, "past", D]) for kind in ("key", "value")]
    weights = {
        name: initializer(f"w_{name}", rng.standard_normal((HIDDEN, width)) / 4)
        for name, width in (("q", HIDDEN), ("k", KV_HEADS * D), ("v", KV_HEADS * D), ("o", HIDDEN))
    }
    constants = [
        _ints("split_heads", [0, 0, KV_HEADS, D]),
        _ints("unsqueeze_axis", [2]),
        _ints("repeat", [1, 1, HEADS // KV_HEADS, 1, 1]),  # broadcast: each KV head to its query heads
        _ints("all_heads", [0, HEADS, -1, D]),
        _ints("merge_heads", [0, 0, HIDDEN]),
    ]
    split, axis, repeat, all_heads, merge = constants
    tape = ir.tape.Tape()
    query = tape.op("MatMul", [x, weights["q"]])
    attention_inputs, presents = [], []
    for kind, past in zip(("k", "v"), pasts):
        new = tape.op(
            "Transpose", [tape.op("Reshape", [tape.op("MatMul", [x, weights[kind]]), split])], {"perm": [0, 2, 1, 3]}
        )
        full = tape.op("Concat", [past, new], {"axis": -2}) if cache else new
        presents.append(full)
        expanded = tape.op("Reshape", [tape.op("Expand", [tape.op("Unsqueeze", [full, axis]), repeat]), all_heads])
        attention_inputs.append(tape.op("Reshape", [tape.op("Transpose", [expanded], {"perm": [0, 2, 1, 3]}), merge]))
    attention = tape.op(
        "MultiHeadAttention", [query, *attention_inputs, None, None, bias], {"num_heads": HEADS}, domain=MS
    )
    output = tape.op("MatMul", [attention, weights["o"]])
    output.name = "y"
    outputs = [output]
    if cache:
        presents[0].name, presents[1].name = "present.0.key", "present.0.value"
        outputs += presents
    inputs = [ids, mask, x, bias, *pasts] if mask_input else [ids, x, bias, *pasts]
    model = model_of(tape.nodes, inputs, outputs, [*weights.values(), *constants])
    model.opset_imports[MS] = 1
    common_passes.ShapeInferencePass(strict_mode=False)(model)  # head_dim and kv heads are read from shapes
    return model


def _feeds(seq: int, past: int) -> dict[str, np.ndarray]:
    """Row 0 left-padded by two tokens; the mask is the model's additive causal one."""
    rng = np.random.default_rng(1)
    total = past + seq
    mask = np.ones((B, total), np.int64)
    mask[0, :2] = 0
    keys = np.arange(total)
    causal = keys[None, :] <= (past + np.arange(seq))[:, None]
    allowed = causal[None, None] & (mask[:, None, None, :] == 1)
    return {
        "input_ids": np.zeros((B, seq), np.int64),
        "attention_mask": mask,
        "x": rng.standard_normal((B, seq, HIDDEN)).astype(np.float32),
        "attention_bias": np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32),
        "past_key_values.0.key": rng.standard_normal((B, KV_HEADS, past, D)).astype(np.float32),
        "past_key_values.0.value": rng.standard_normal((B, KV_HEADS, past, D)).astype(np.float32),
    }


def _outputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Padded query rows zeroed: every key is masked for them, and the two kernels disagree on
    what a fully masked row means (the logits there are never read)."""
    y, *present = run_all(model, **feeds)
    seq = y.shape[1]
    return [y * feeds["attention_mask"][:, -seq:, None], *present]


@pytest.mark.parametrize("seq, past", [(5, 0), (1, 4)])  # prefill (batch 2 with past only at seq 1), decode
def test_attention_and_cache_plumbing_become_one_group_query_attention(seq, past):
    model = _graph()
    feeds = _feeds(seq, past)
    expected = _outputs(model, feeds)
    result = GroupQueryAttentionPass()(model)
    assert result.modified
    assert result.stats == {"fused": 1, "rotary_fused": 0, "skipped": 0}
    assert result.manifest == {
        "fusions": {"group_query_attention_layers": [0], "rotary_embedding_layers": [], "attention_left_unfused": []}
    }
    common_passes.RemoveUnusedNodesPass()(model)
    ops = [node.op_type for node in model.graph]
    assert ops.count("GroupQueryAttention") == 1
    assert not {"MultiHeadAttention", "Concat", "Unsqueeze"} & set(ops)  # the cache plumbing is gone
    assert [value.name for value in model.graph.outputs] == ["y", "present.0.key", "present.0.value"]
    for ours, reference in zip(_outputs(model, feeds), expected):
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_attention_without_the_cache_concat_is_left_and_reported():
    model = _graph(cache=False)
    result = GroupQueryAttentionPass()(model)
    assert not result.modified and result.stats == {"fused": 0, "rotary_fused": 0, "skipped": 1}
    (reason,) = result.manifest["fusions"]["attention_left_unfused"]
    assert "not the exported cache concat" in reason
    assert [node.op_type for node in model.graph].count("MultiHeadAttention") == 1


def test_a_reused_pass_reports_each_call_alone():
    fuse = GroupQueryAttentionPass()
    assert fuse(_graph()).manifest == fuse(_graph()).manifest


def test_missing_attention_mask_is_a_precondition_error():
    with pytest.raises(ir.passes.PreconditionError, match="attention_mask") as error:
        GroupQueryAttentionPass()(_graph(mask_input=False))
    assert isinstance(error.value, AqexportError)
