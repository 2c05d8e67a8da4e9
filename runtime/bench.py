"""How fast an artifact runs on ONNX Runtime: prefill and decode throughput, time to first
token, peak memory, each over repeated runs (median, min, max).

* **Prefill** at each requested length: one forward of that many tokens from an empty cache,
  batch 1, logits included (they are part of what a caller waits for).
* **Time to first token**: prefill of the first requested length plus choosing the token.
* **Decode**: after a prefill of ``decode_context`` tokens, ``decode_tokens`` greedy steps of one
  token, with IO binding, driving the KV cache the way the artifact's contract says
  (``runtime/decoder.py``): for ``shared_buffer`` (the default of fused cpu/cuda artifacts and
  the genai builder's), one buffer per tensor preallocated for the whole run and bound as both
  past and present, as onnxruntime-genai does; for ``growing``, each step's ``present.*``
  OrtValues are bound as the next step's ``past_key_values.*`` (the session allocates and copies
  the cache every step). Only the last position's logits are read back. The tokens are returned
  so tests can check the bound loop decodes exactly what ``runtime.generate`` does.
* **Peak RSS**: the process's high-water mark (``getrusage``) after the runs, next to the RSS
  before the session was created, so a caller that imported other libraries can tell them apart.

Inputs are random token ids from a fixed seed: throughput does not depend on which tokens.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from aqexport.runtime.decoder import OnnxDecoder, bind_buffer
from aqexport.runtime.static_decoder import is_static_session

__all__ = ["BenchResult", "Spread", "bench_session", "current_rss_mib"]


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass
class BenchResult:
    prefill_tokens_per_second: dict[int, Spread]
    time_to_first_token_ms: Spread
    decode_tokens_per_second: Spread
    decode_context: int
    decode_tokens: int
    rss_before_session_mib: float
    peak_rss_mib: float
    session_seconds: float
    decoded_token_ids: list[int]
    kv_cache: str = "growing"

    def as_dict(self) -> dict:
        data = asdict(self)
        data["prefill_tokens_per_second"] = {
            str(length): asdict(spread) for length, spread in self.prefill_tokens_per_second.items()
        }
        return data


def current_rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _BoundDecoder:
    """Greedy decoding with IO binding on a decoder that follows the artifact contract."""

    def __init__(self, decoder: OnnxDecoder) -> None:
        self.decoder = decoder
        self.session = decoder.session
        self.past_names, self.present_names = decoder.past_names, decoder.present_names
        self.shared = decoder.kv_cache == "shared_buffer"

    def _run(self, ids: np.ndarray, length: int, past: list) -> tuple[np.ndarray, list]:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, length), dtype=np.int64))
        if self.decoder.has_position_ids:
            positions = np.arange(length - ids.shape[1], length, dtype=np.int64)[None]
            binding.bind_cpu_input("position_ids", positions)
        binding.bind_output("logits")
        if self.shared:
            for past_name, present_name, buffer in zip(self.past_names, self.present_names, past):
                bind_buffer(binding, past_name, present_name, buffer)
        else:
            for name, value in zip(self.past_names, past):
                if isinstance(value, ort.OrtValue):
                    binding.bind_ortvalue_input(name, value)
                else:
                    binding.bind_cpu_input(name, value)
            for name in self.present_names:
                binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[0, -1], past if self.shared else outputs[1:]

    def prefill(self, tokens: np.ndarray, capacity: int | None = None) -> tuple[int, list]:
        """``capacity``: positions the shared buffers must hold for the steps that follow."""
        past = self.decoder.empty_past(1, capacity or tokens.size if self.shared else 0)
        logits, present = self._run(tokens[None], tokens.size, past)
        return int(np.argmax(logits)), present

    def decode(self, first: int, present: list, context: int, steps: int) -> list[int]:
        """``steps`` one-token forwards after a prefill of ``context`` tokens that chose ``first``;
        returns ``first`` and every token chosen after it."""
        tokens = [first]
        for step in range(steps):
            logits, present = self._run(np.asarray([[tokens[-1]]], dtype=np.int64), context + step + 1, present)
            tokens.append(int(np.argmax(logits)))
        return tokens


def bench_session(
    session: ort.InferenceSession,
    prefill_lengths: Sequence[int] = (128, 512, 2048),
    decode_tokens: int = 64,
    decode_context: int = 128,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    vocab_size: int | None = None,
    rss_before_session_mib: float = 0.0,
    session_seconds: float = 0.0,
    head_dim: int | None = None,
    kv_cache: str | None = None,
) -> BenchResult:
    if is_static_session(session):
        raise ValueError(
            "bench measures the dynamic KV contract (prefill lengths, IO-bound decode); a static npu "
            "artifact runs one token per call: time it with 'aqexport run'"
        )
    decoder = OnnxDecoder(session, head_dim, kv_cache)
    bound = _BoundDecoder(decoder)
    vocab = vocab_size or 1000
    rng = np.random.default_rng(seed)
    prefill: dict[int, Spread] = {}
    first_token_ms: list[float] = []
    for index, length in enumerate(prefill_lengths):
        tokens = rng.integers(0, vocab, length, dtype=np.int64)
        rates = []
        for run in range(warmup + repeats):
            start = time.perf_counter()
            bound.prefill(tokens)
            seconds = time.perf_counter() - start
            if run >= warmup:
                rates.append(length / seconds)
                if index == 0:
                    first_token_ms.append(1000 * seconds)
        prefill[length] = Spread.of(rates)
    context = rng.integers(0, vocab, decode_context, dtype=np.int64)
    rates: list[float] = []
    decoded: list[int] = []
    for run in range(warmup + repeats):
        token, present = bound.prefill(context, decode_context + decode_tokens + 1)
        start = time.perf_counter()
        decoded = bound.decode(token, present, decode_context, decode_tokens)
        seconds = time.perf_counter() - start
        if run >= warmup:
            rates.append(decode_tokens / seconds)
    return BenchResult(
        prefill_tokens_per_second=prefill,
        time_to_first_token_ms=Spread.of(first_token_ms),
        decode_tokens_per_second=Spread.of(rates),
        decode_context=decode_context,
        decode_tokens=decode_tokens,
        rss_before_session_mib=rss_before_session_mib,
        peak_rss_mib=_peak_rss_mib(),
        session_seconds=session_seconds,
        decoded_token_ids=decoded,
        kv_cache=decoder.kv_cache,
    )
