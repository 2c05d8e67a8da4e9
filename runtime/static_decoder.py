"""Run an npu (static-shape) step graph behind the same ``step`` interface as ``OnnxDecoder``.

The npu contract (``aqexport.capture.StaticStepWrapper``): one token per call against a
cache of fixed ``C`` slots, an additive ``attention_bias`` [1, 1, 1, C + 1] over those slots
and the new token, and ``present.*`` holding only the new token's key/value. The host side of
that contract lives here: keep the cache, write each new key/value into the next slot, mask the
empty slots. ``step`` takes and returns the *filled* part of the cache ([1, H, T, D], as the
dynamic contract does), so generation, perplexity and the parity checks run unchanged on
either kind of artifact; a prompt is fed token by token.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from aqexport.runtime.decoder import OnnxDecoder
from aqexport.runtime.kv_buffer import KvSlots

__all__ = ["StaticDecoder", "decoder_for", "is_static_session"]


def is_static_session(session: ort.InferenceSession) -> bool:
    return "attention_bias" in {meta.name for meta in session.get_inputs()}


class StaticDecoder(OnnxDecoder):
    def __init__(self, session: ort.InferenceSession) -> None:
        super().__init__(session, kv_cache="growing")  # its own slots; the step graph returns new keys only
        bias = next(meta for meta in session.get_inputs() if meta.name == "attention_bias")
        self.context = int(bias.shape[-1]) - 1
        self._bias_dtype = np.float32 if bias.type == "tensor(float)" else np.float16
        self._slots = KvSlots(capacity=self.context)

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[np.ndarray],
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if input_ids.shape[0] != 1 or not np.all(attention_mask == 1):
            raise ValueError("a static (npu) artifact runs batch 1 without padding")
        filled = past[0].shape[2]
        if filled + input_ids.shape[1] > self.context:
            raise ValueError(
                f"{filled} cached + {input_ids.shape[1]} new tokens exceed the artifact's static context of "
                f"{self.context} (target.max_context)"
            )
        if position_ids is None:
            position_ids = np.arange(filled, filled + input_ids.shape[1])[None]
        cache = self._slots.buffers_for(past, filled + input_ids.shape[1])
        logits = []
        for offset in range(input_ids.shape[1]):
            length = filled + offset
            bias = np.zeros((1, 1, 1, self.context + 1), self._bias_dtype)
            bias[..., length : self.context] = np.finfo(self._bias_dtype).min
            feeds = {
                "input_ids": input_ids[:, offset : offset + 1].astype(np.int64, copy=False),
                "position_ids": position_ids[:, offset : offset + 1].astype(np.int64, copy=False),
                "attention_bias": bias,
            }
            step_logits, present = self._run(feeds, cache)
            logits.append(step_logits)
            for slots, new in zip(cache, present):
                slots[:, :, length : length + 1] = new
        return np.concatenate(logits, axis=1), self._slots.hand_back(cache, filled + input_ids.shape[1])


def decoder_for(session: ort.InferenceSession, head_dim: int | None = None, kv_cache: str | None = None) -> OnnxDecoder:
    """The decoder that follows ``session``'s contract: static (npu) or dynamic. ``head_dim`` /
    ``kv_cache``: for graphs that do not declare them (``OnnxDecoder``)."""
    return StaticDecoder(session) if is_static_session(session) else OnnxDecoder(session, head_dim, kv_cache)
