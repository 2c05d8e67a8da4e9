"""ORT fusions (``target.fuse``, on by default) change the graph, not the function: a fused and
an unfused build of the same model give the same logits, prefill and cached decode, with and
without left padding (``GroupQueryAttention`` keeps the model's mask as its attention bias)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from aqexport.config import load_config
from aqexport.pipeline import build
from aqexport.runtime import OnnxDecoder, create_session
from tests.conftest import tiny_build_config

FUSED_OPS = {
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "RotaryEmbedding",
}


def _logits(artifact, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Prefill of all but the last token, then one cached step; padded query rows zeroed (their
    logits are undefined in both graphs)."""
    session, _ = create_session(artifact)
    decoder = OnnxDecoder(session)
    prefill, past = decoder.step(ids[:, :-1], mask[:, :-1], decoder.empty_past(ids.shape[0]))
    step, _ = decoder.step(ids[:, -1:], mask, past)
    return [prefill * mask[:, :-1, None], step]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3_text", "opt"])
def test_fused_graph_computes_the_unfused_one(tiny_artifact, tiny_model_dir, tmp_path, kind):
    fused = tiny_artifact(kind)
    unfused = build(load_config(tiny_build_config(tmp_path, tiny_model_dir(kind), target={"fuse": False})), tmp_path)
    fused_ops = {node.op_type for node in onnx.load(str(fused / "model.onnx"), load_external_data=False).graph.node}
    plain_ops = {node.op_type for node in onnx.load(str(unfused / "model.onnx"), load_external_data=False).graph.node}
    assert not plain_ops & FUSED_OPS
    if kind != "opt":  # OPT's LayerNorm and learned positions have no rule here; nothing fuses
        assert {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= fused_ops
        assert "MultiHeadAttention" not in fused_ops
        fusions = json.loads((fused / "manifest.json").read_text())["fusions"]
        assert fusions["group_query_attention_layers"] == [0, 1]
        # Query and key of both layers rotate in RotaryEmbedding: GroupQueryAttentionPass fuses them
        # here; with torch 2.11 / transformers 5.17 onnxscript's rotary rule already had (H100 run).
        rotations = [node for node in onnx.load(str(fused / "model.onnx"), load_external_data=False).graph.node]
        assert sum(node.op_type == "RotaryEmbedding" for node in rotations) == 4
    ids = np.random.default_rng(0).integers(3, 100, (2, 30))
    unpadded = np.ones_like(ids)
    left_padded = unpadded.copy()
    left_padded[0, :7] = 0
    for mask in (unpadded, left_padded):
        for ours, reference in zip(_logits(fused, ids, mask), _logits(unfused, ids, mask)):
            assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
