"""A decoder step on an artifact's ONNX session, following the artifact's I/O contract.

Reads the KV layout (layers, KV heads, head size, dtype) from the session's own input
metadata, so it runs any artifact that follows the contract, whatever produced it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

__all__ = ["OnnxDecoder", "positions_from_mask"]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class _PastSpec:
    name: str
    heads: int
    head_dim: int
    dtype: type


class OnnxDecoder:
    """``head_dim`` is needed only for graphs whose KV inputs leave it symbolic (the genai model
    builder's ``kv_cache_dim``); it is read from the metadata otherwise."""

    def __init__(self, session: ort.InferenceSession, head_dim: int | None = None) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        past: dict[int, dict[str, _PastSpec]] = {}
        for meta in session.get_inputs():
            match = _PAST.match(meta.name)
            if match:
                layer, kind = int(match.group(1)), match.group(2)
                size = meta.shape[3] if isinstance(meta.shape[3], int) else head_dim
                if size is None:
                    raise ValueError(f"'{meta.name}' has a symbolic head size ({meta.shape[3]}): pass head_dim")
                past.setdefault(layer, {})[kind] = _PastSpec(
                    meta.name, int(meta.shape[1]), size, _NUMPY_DTYPES[meta.type]
                )
        self.past_specs = [past[i] for i in sorted(past)]
        self.num_layers = len(self.past_specs)
        self.has_position_ids = "position_ids" in self.input_names

    def empty_past(self, batch: int) -> list[np.ndarray]:
        arrays = []
        for layer in self.past_specs:
            for kind in ("key", "value"):
                spec = layer[kind]
                arrays.append(np.zeros((batch, spec.heads, 0, spec.head_dim), dtype=spec.dtype))
        return arrays

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[np.ndarray],
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: ``input_ids`` [B, S] after ``past`` -> logits [B, S, V] and present."""
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": attention_mask.astype(np.int64, copy=False),
        }
        if self.has_position_ids:
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask, input_ids.shape[1])
            feeds["position_ids"] = position_ids.astype(np.int64, copy=False)
        return self._run(feeds, past)

    def _run(self, feeds: dict[str, np.ndarray], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run with ``past`` (key, value per layer, in order) added to ``feeds``; logits and present."""
        names = [layer[kind].name for layer in self.past_specs for kind in ("key", "value")]
        named = dict(zip(self.output_names, self.session.run(None, {**feeds, **dict(zip(names, past))})))
        present = [named[f"present.{i}.{kind}"] for i in range(self.num_layers) for kind in ("key", "value")]
        return named["logits"], present


def positions_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the last ``new_tokens`` tokens, counting only attended ones (left padding)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -new_tokens:]
