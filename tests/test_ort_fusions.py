"""ORT fusions (``target.fuse``, on by default) change the graph, not the function: a fused and
an unfused build of the same model give the same logits, prefill and cached decode."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from aqexport.config import load_config
from aqexport.pipeline import build
from aqexport.runtime import OnnxDecoder, create_session
from tests.conftest import tiny_build_config

FUSED_OPS = {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "MultiHeadAttention"}


def _logits(artifact, ids: np.ndarray) -> list[np.ndarray]:
    session, _ = create_session(artifact)
    decoder = OnnxDecoder(session)
    prefill, past = decoder.step(ids[:, :-1], np.ones_like(ids[:, :-1]), decoder.empty_past(1))
    step, _ = decoder.step(ids[:, -1:], np.ones_like(ids), past)
    return [prefill, step]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3_text", "opt"])
def test_fused_graph_computes_the_unfused_one(tiny_artifact, tiny_model_dir, tmp_path, kind):
    fused = tiny_artifact(kind)
    unfused = build(load_config(tiny_build_config(tmp_path, tiny_model_dir(kind), target={"fuse": False})), tmp_path)
    fused_ops = {node.op_type for node in onnx.load(str(fused / "model.onnx"), load_external_data=False).graph.node}
    plain_ops = {node.op_type for node in onnx.load(str(unfused / "model.onnx"), load_external_data=False).graph.node}
    assert not plain_ops & FUSED_OPS
    if kind != "opt":  # OPT's LayerNorm and learned positions have no rule here; nothing fuses
        assert fused_ops & FUSED_OPS
    ids = np.random.default_rng(0).integers(0, 100, (1, 30))
    for ours, reference in zip(_logits(fused, ids), _logits(unfused, ids)):
        assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
