"""Run an npu (static-shape) step graph, and its prefill graph, behind the same ``step``
interface as ``OnnxDecoder``.

The npu contract (``aqexport.capture.StaticStepWrapper``): T new tokens per call against a
cache of fixed ``C`` slots, an additive ``attention_bias`` [1, 1, T, C + T] over those slots
and the new tokens, and ``present.*`` holding only the new tokens' keys/values. The step graph
has T = 1; an artifact may have a prefill graph (``prefill.onnx``, ``aqexport.prefill_graph``)
with T = P, through which a prompt runs P tokens per call, the last chunk padded (its padded
rows attend causally like real ones, so no row is all masked, and their outputs are dropped).
The host side of the contract lives here: keep the cache, write each new key/value into the
next slot, mask the empty slots. ``step`` takes and returns the *filled* part of the cache
([1, H, T, D], as the dynamic contract does), so generation, perplexity and the parity checks
run unchanged on either kind of artifact.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from aqexport.runtime.decoder import OnnxDecoder
from aqexport.runtime.kv_buffer import KvSlots

__all__ = ["PREFILL_FILE", "StaticDecoder", "decoder_for", "is_static_session"]

#: The prefill graph's file name in an npu artifact, beside ``model.onnx`` (the step graph).
PREFILL_FILE = "prefill.onnx"


def is_static_session(session: ort.InferenceSession) -> bool:
    return "attention_bias" in {meta.name for meta in session.get_inputs()}


class StaticDecoder(OnnxDecoder):
    """``prefill``: the artifact's prefill graph's session, or ``None`` (a prompt is fed one
    token per call)."""

    def __init__(self, session: ort.InferenceSession, prefill: ort.InferenceSession | None = None) -> None:
        super().__init__(session, kv_cache="growing")  # its own slots; the step graph returns new keys only
        bias = next(meta for meta in session.get_inputs() if meta.name == "attention_bias")
        self.context = int(bias.shape[-1]) - 1
        self._bias_dtype = np.float32 if bias.type == "tensor(float)" else np.float16
        self._slots = KvSlots(capacity=self.context)
        self.prefill = prefill
        self.prefill_tokens = 1 if prefill is None else int(prefill.get_inputs()[0].shape[1])

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[np.ndarray],
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if input_ids.shape[0] != 1 or not np.all(attention_mask == 1):
            raise ValueError("a static (npu) artifact runs batch 1 without padding")
        filled, count = past[0].shape[2], input_ids.shape[1]
        if filled + count > self.context:
            raise ValueError(
                f"{filled} cached + {count} new tokens exceed the artifact's static context of "
                f"{self.context} (target.max_context)"
            )
        if position_ids is None:
            position_ids = np.arange(filled, filled + count)[None]
        cache = self._slots.buffers_for(past, filled + count)
        logits, offset = [], 0
        while offset < count:
            # the prefill graph while more than one token is left; the step graph for a single one
            width = self.prefill_tokens if count - offset > 1 else 1
            used = min(width, count - offset)
            session = self.session if width == 1 else self.prefill
            logits.append(self._call(session, width, used, filled + offset, input_ids, position_ids, offset, cache))
            offset += used
        return np.concatenate(logits, axis=1), self._slots.hand_back(cache, filled + count)

    def _call(
        self,
        session: ort.InferenceSession,
        width: int,
        used: int,
        length: int,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        offset: int,
        cache: list[np.ndarray],
    ) -> np.ndarray:
        """One call of ``session`` (``width`` tokens per call) on the ``used`` tokens from
        ``offset``, after ``length`` filled slots; writes their keys/values, returns their logits."""
        ids = np.zeros((1, width), np.int64)
        ids[:, :used] = input_ids[:, offset : offset + used]
        positions = np.full((1, width), position_ids[0, offset + used - 1], np.int64)  # padding: a real position
        positions[:, :used] = position_ids[:, offset : offset + used]
        masked = np.finfo(self._bias_dtype).min
        bias = np.zeros((1, 1, width, self.context + width), self._bias_dtype)
        bias[..., length : self.context] = masked  # empty slots
        bias[0, 0, :, self.context :] = np.where(np.tri(width, dtype=bool), 0, masked)  # causal among the new
        feeds = {"input_ids": ids, "position_ids": positions, "attention_bias": bias}
        named = dict(zip(self.output_names, session.run(None, {**feeds, **dict(zip(self.past_names, cache))})))
        for slots, name in zip(cache, self.present_names):
            slots[:, :, length : length + used] = named[name][:, :, :used]
        return named["logits"][:, :used]


def decoder_for(
    session: ort.InferenceSession,
    head_dim: int | None = None,
    kv_cache: str | None = None,
    prefill: ort.InferenceSession | None = None,
) -> OnnxDecoder:
    """The decoder that follows ``session``'s contract: static (npu) or dynamic. ``head_dim`` /
    ``kv_cache``: for graphs that do not declare them (``OnnxDecoder``); ``prefill``: a static
    artifact's prefill graph (``prefill_session``)."""
    if is_static_session(session):
        return StaticDecoder(session, prefill)
    return OnnxDecoder(session, head_dim, kv_cache)
