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
from aqexport.target import Target
from tests.conftest import tiny_build_config
from tests.tiny_models import data_file

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


def _assert_same_logits(fused, unfused, seed: int) -> None:
    """Prefill and one cached step of a batch of two, unpadded and with row 0 left-padded."""
    ids = np.random.default_rng(seed).integers(3, 100, (2, 30))
    unpadded = np.ones_like(ids)
    left_padded = unpadded.copy()
    left_padded[0, :7] = 0
    for mask in (unpadded, left_padded):
        for ours, reference in zip(_logits(fused, ids, mask), _logits(unfused, ids, mask)):
            assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()


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
    _assert_same_logits(fused, unfused, seed=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3_text"])
def test_packed_qkv_attention_rotates_what_the_unfused_graph_rotates(tiny_model_dir, tmp_path, kind, monkeypatch):
    """An int4 build packs q/k/v into one MatMulNBits, and ``PackedQkvAttentionPass`` hands the
    packed output to ``GroupQueryAttention``, which splits and rotates it (at past length + i):
    the logits equal those of the unfused graph, left padding included
    (accuracy level 0, so the int4 matmuls compute in float in both graphs). The pass is the
    cuda profile's; forced on here, the float32 cpu graph checks its function exactly on this
    machine's CPU EP (the cuda artifact's parity is checked on a GPU, ``test_cuda_profile``)."""
    monkeypatch.setattr(Target, "attention_takes_packed_qkv", property(lambda self: self.fuse))
    settings = {
        "quantization": {"recipe": "rtn", "preset": "w4a16g128"},
        "calibration": {"data": str(data_file("valid")), "samples": 2, "seqlen": 32},
    }
    target = {"accuracy_level": 0}
    (tmp_path / "f").mkdir()
    (tmp_path / "u").mkdir()
    fused = build(
        load_config(tiny_build_config(tmp_path / "f", tiny_model_dir(kind), target=target, **settings)),
        tmp_path / "f",
    )
    unfused = build(
        load_config(
            tiny_build_config(tmp_path / "u", tiny_model_dir(kind), target={**target, "fuse": False}, **settings)
        ),
        tmp_path / "u",
    )
    graph = onnx.load(str(fused / "model.onnx"), load_external_data=False).graph
    attentions = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    fusions = json.loads((fused / "manifest.json").read_text())["fusions"]
    if kind == "gemma3_text":  # q/k norms sit between the split and the rotations: left as they were
        assert fusions["packed_qkv_attention"] == 0 and len(fusions["packed_qkv_left_unfused"]) == 2
    else:  # Qwen2's q/k/v biases become one Add on the packed tensor
        assert fusions["packed_qkv_attention"] == 2 and len(attentions) == 2
        assert not [node for node in graph.node if node.op_type == "RotaryEmbedding"]
        for node in attentions:
            assert node.input[1] == node.input[2] == ""  # packed q/k/v
            assert len(node.input) < 10 or node.input[9] == ""  # positions from seqlens_k
            assert onnx.helper.get_node_attr_value(node, "do_rotary") == 1
    _assert_same_logits(fused, unfused, seed=1)
