"""The shared-buffer KV contract (``passes/shared_kv_buffer.py``) end to end on the four tiny
families: the fused artifacts declare it, and driving the same graph with one preallocated buffer
per tensor (bound as both past and present, as onnxruntime-genai does) gives the logits the
growing cache gives, on a left-padded batch through prefill and several decode steps, in our
runtime, in ``bench`` and under onnxruntime-genai."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from aqexport.runtime import OnnxDecoder, create_session
from aqexport.runtime.bench import bench_session
from tests.conftest import ARCHITECTURES

PROMPTS = ([11, 42, 97, 150, 33, 7, 8], [5, 6, 77])


def _left_padded() -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, PROMPTS))
    ids = np.array([[0] * (width - len(p)) + p for p in PROMPTS], np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS], np.int64)
    return ids, mask


def _decode(decoder: OnnxDecoder, steps: int = 6) -> list[np.ndarray]:
    """Logits of a left-padded batch's prefill and of ``steps`` greedy decode steps."""
    ids, mask = _left_padded()
    logits, past = decoder.step(ids, mask, decoder.empty_past(len(ids)))
    seen = [logits]
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        logits, past = decoder.step(token, mask, past)
        seen.append(logits)
    return seen


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_fused_artifacts_declare_the_shared_buffer(tiny_artifact, kind):
    artifact = tiny_artifact(kind)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["kv_cache"]["contract"] == "shared_buffer"
    genai = json.loads((artifact / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    metadata = {p.key: p.value for p in onnx.load(artifact / "model.onnx", load_external_data=False).metadata_props}
    assert metadata["aqexport.kv_cache"] == "shared_buffer"
    graph = onnx.load(artifact / "model.onnx", load_external_data=False).graph
    readers = {n.op_type for n in graph.node for name in n.input if name.startswith("past_key_values.")}
    assert readers == {"GroupQueryAttention"}  # nothing reads the buffer's length as the past length


@pytest.mark.parametrize("kind", ARCHITECTURES)  # gemma3: sliding window of 8 inside 7 + 6 tokens
def test_shared_buffer_gives_the_growing_cache_logits_on_a_left_padded_batch(tiny_artifact, kind):
    session, _ = create_session(tiny_artifact(kind))
    shared = _decode(OnnxDecoder(session, kv_cache="shared_buffer"))
    growing = _decode(OnnxDecoder(session, kv_cache="growing"))
    for ours, reference in zip(shared, growing):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    # and the padded row is the unpadded prompt's continuation
    alone = OnnxDecoder(session)
    logits, _ = alone.step(np.array([PROMPTS[1]]), np.ones((1, len(PROMPTS[1])), np.int64), alone.empty_past(1))
    np.testing.assert_allclose(shared[0][1, -1], logits[0, -1], rtol=1e-4, atol=1e-4)


def test_a_reused_earlier_past_is_not_overwritten(tiny_artifact):
    """Two continuations of one past: the second must not see the first's writes to the buffer."""
    session, _ = create_session(tiny_artifact("llama"))
    decoder = OnnxDecoder(session, kv_cache="shared_buffer")
    ids = np.array([[3, 4, 5]])
    _, past = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
    mask = np.ones((1, 4), np.int64)
    first, _ = decoder.step(np.array([[9]]), mask, past)
    decoder.step(np.array([[17]]), mask, past)
    again, _ = decoder.step(np.array([[9]]), mask, past)
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_bench_decodes_the_same_tokens_under_both_contracts(tiny_artifact, kind):
    session, _ = create_session(tiny_artifact(kind))
    runs = {
        contract: bench_session(
            session,
            (8,),
            decode_tokens=10,
            decode_context=16,
            repeats=1,
            warmup=0,
            seed=5,
            vocab_size=100,
            kv_cache=contract,
        )
        for contract in ("shared_buffer", "growing")
    }
    assert runs["shared_buffer"].kv_cache == "shared_buffer"
    assert runs["shared_buffer"].decoded_token_ids == runs["growing"].decoded_token_ids


@pytest.mark.genai
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_genai_decodes_the_same_batch_with_and_without_sharing(tiny_artifact, kind, tmp_path):
    """onnxruntime-genai 0.18 does not mask pad tokens of a padded batch by itself (a padded row
    decodes as batch 1 with the pads as text does), so under genai the two contracts are compared
    with each other on the same padded batch; our runtime's padding is checked above."""
    from tests.genai_support import genai_greedy_batch

    artifact = tiny_artifact(kind)
    growing = tmp_path / "growing"
    shutil.copytree(artifact, growing)
    genai = json.loads((growing / "genai_config.json").read_text())
    genai["search"]["past_present_share_buffer"] = False
    (growing / "genai_config.json").write_text(json.dumps(genai))
    ids, _ = _left_padded()
    shared_tokens = genai_greedy_batch(artifact, ids, 8)
    assert shared_tokens == genai_greedy_batch(growing, ids, 8)
    assert len(shared_tokens) == 2 and all(len(row) == 8 for row in shared_tokens)
