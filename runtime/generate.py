"""KV-cache generation on an ``OnnxDecoder``: one prefill, then one token per step.

Greedy by default (what parity checks compare); sampling with temperature / top-k / top-p
and a seed for reproducible demos. Timings are split into prefill and decode because they are
bound by different things (compute vs per-step overhead) and are reported separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from aqexport.runtime.decoder import OnnxDecoder

__all__ = ["GenerationResult", "SamplingConfig", "generate"]


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    new_tokens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.new_tokens) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def _choose(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    if not sampling.do_sample:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / max(sampling.temperature, 1e-6)
    if sampling.top_k > 0:
        kth = np.sort(scores)[-min(sampling.top_k, scores.size)]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))


def generate(
    decoder: OnnxDecoder,
    prompt_tokens: list[int],
    max_new_tokens: int,
    *,
    eos_token_ids: set[int] | frozenset[int] = frozenset(),
    sampling: SamplingConfig = SamplingConfig(),
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt_tokens`` (batch 1)."""
    result = GenerationResult(prompt_tokens=list(prompt_tokens))
    if max_new_tokens <= 0:
        return result
    rng = np.random.default_rng(sampling.seed)
    ids = np.asarray([prompt_tokens], dtype=np.int64)
    mask = np.ones_like(ids)
    start = time.perf_counter()
    logits, past = decoder.step(ids, mask, decoder.empty_past(1), np.arange(ids.shape[1])[None])
    token = _choose(logits[0, -1], sampling, rng)
    result.prefill_seconds = time.perf_counter() - start
    result.new_tokens.append(token)
    start = time.perf_counter()
    while len(result.new_tokens) < max_new_tokens and token not in eos_token_ids:
        position = mask.shape[1]
        mask = np.ones((1, position + 1), dtype=np.int64)
        logits, past = decoder.step(np.asarray([[token]], dtype=np.int64), mask, past, np.asarray([[position]]))
        token = _choose(logits[0, -1], sampling, rng)
        result.new_tokens.append(token)
    result.decode_seconds = time.perf_counter() - start
    return result
