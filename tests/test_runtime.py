"""Runtime pieces on their own: provider reporting, windows, perplexity math, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aqexport.errors import AqexportError
from aqexport.runtime import OnnxDecoder, create_session, perplexity, split_windows
from aqexport.runtime.decoder import positions_from_mask
from aqexport.runtime.generate import SamplingConfig, generate


def test_unavailable_provider_is_reported_not_hidden(tiny_artifact):
    session, info = create_session(tiny_artifact("llama"), ("xnnpack", "cpu"))
    if "XnnpackExecutionProvider" in info.available:
        assert info.used[0] == "XnnpackExecutionProvider"
    else:
        assert info.unavailable == ["XnnpackExecutionProvider"]
        assert info.used == ["CPUExecutionProvider"]
        with pytest.raises(AqexportError, match="not in this onnxruntime build"):
            create_session(tiny_artifact("llama"), ("xnnpack",), strict=True)


def test_unknown_provider(tiny_artifact):
    with pytest.raises(AqexportError, match="unknown execution provider"):
        create_session(tiny_artifact("llama"), ("tpu",))


def test_windows_drop_the_tail():
    windows = split_windows(range(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_windows(range(10), 4, max_windows=1).shape == (1, 4)
    with pytest.raises(ValueError):
        split_windows(range(3), 4)


def test_perplexity_of_uniform_logits_is_vocab_size():
    vocab = 17
    result = perplexity(lambda w: np.zeros((w.size, vocab), dtype=np.float32), split_windows(np.arange(40) % vocab, 8))
    assert result.perplexity == pytest.approx(vocab, rel=1e-6)
    assert result.tokens == 5 * 7 and result.mean_nll == pytest.approx(math.log(vocab))


def test_positions_follow_left_padding():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask, 2).tolist() == [[1, 2], [3, 4]]


def test_batched_left_padded_step_matches_unpadded(tiny_artifact):
    session, _ = create_session(tiny_artifact("qwen2"))
    decoder = OnnxDecoder(session)
    ids = np.array([[5, 6, 7, 8]])
    alone, _ = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
    padded_ids = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    padded_mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    batch, _ = decoder.step(padded_ids, padded_mask, decoder.empty_past(2))
    np.testing.assert_allclose(batch[0, -1], alone[0, -1], rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_greedy_is_deterministic(tiny_artifact):
    session, _ = create_session(tiny_artifact("gemma3_text"))
    decoder = OnnxDecoder(session)
    a = generate(decoder, [3, 4, 5], 10, sampling=SamplingConfig(do_sample=True, top_k=20, seed=3))
    b = generate(decoder, [3, 4, 5], 10, sampling=SamplingConfig(do_sample=True, top_k=20, seed=3))
    assert a.new_tokens == b.new_tokens
    g1, g2 = generate(decoder, [3, 4, 5], 10), generate(decoder, [3, 4, 5], 10)
    assert g1.new_tokens == g2.new_tokens and len(g1.new_tokens) == 10
    stopped = generate(decoder, [3, 4, 5], 10, eos_token_ids={g1.new_tokens[2]})
    assert stopped.new_tokens == g1.new_tokens[: g1.new_tokens.index(g1.new_tokens[2]) + 1]
