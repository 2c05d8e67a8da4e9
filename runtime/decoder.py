"""A decoder step on an artifact's ONNX session, following the artifact's I/O contract.

Reads the KV layout (layers, KV heads, head size, dtype) from the session's own input
metadata, so it runs any artifact that follows the contract, whatever produced it.

Two KV contracts share one graph interface (``passes/shared_kv_buffer.py``): **growing**, where
``past`` holds exactly the past tokens and ``present`` comes back as a new, longer tensor; and
**shared_buffer** (the genai model builder's), where past and present are bound to the same
preallocated buffer and ``GroupQueryAttention`` writes the new tokens into it in place. The
artifact says which it supports in its metadata (``aqexport.kv_cache``); a builder model says so
in ``genai_config.json`` (``past_present_share_buffer``), which the caller passes as ``kv_cache``.
Both give the same logits; shared_buffer never copies the cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from aqexport.runtime.kv_buffer import KvSlots

__all__ = ["KV_CACHE_METADATA_KEY", "OnnxDecoder", "kv_contract", "positions_from_mask"]

#: Written by ``passes/shared_kv_buffer.py`` (the runtime does not import the passes).
KV_CACHE_METADATA_KEY = "aqexport.kv_cache"

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class _PastSpec:
    name: str
    heads: int
    head_dim: int
    dtype: type


def kv_contract(session: ort.InferenceSession) -> str:
    """``shared_buffer`` or ``growing``: what the artifact's metadata declares (growing if none)."""
    declared = session.get_modelmeta().custom_metadata_map.get(KV_CACHE_METADATA_KEY)
    return "shared_buffer" if declared == "shared_buffer" else "growing"


class OnnxDecoder:
    """``head_dim`` is needed only for graphs whose KV inputs leave it symbolic (the genai model
    builder's ``kv_cache_dim``); it is read from the metadata otherwise. ``kv_cache``:
    ``shared_buffer`` / ``growing``, by default what the model's metadata declares."""

    def __init__(self, session: ort.InferenceSession, head_dim: int | None = None, kv_cache: str | None = None) -> None:
        self.session = session
        self.kv_cache = kv_cache or kv_contract(session)
        self._slots = KvSlots()
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

    def empty_past(self, batch: int, positions: int = 0) -> list[np.ndarray]:
        """Zeroed past tensors of ``positions`` slots (0: an empty growing cache; more: shared
        buffers with room for that many positions)."""
        arrays = []
        for layer in self.past_specs:
            for kind in ("key", "value"):
                spec = layer[kind]
                arrays.append(np.zeros((batch, spec.heads, positions, spec.head_dim), dtype=spec.dtype))
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

    @property
    def past_names(self) -> list[str]:
        return [layer[kind].name for layer in self.past_specs for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def _run(self, feeds: dict[str, np.ndarray], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run with ``past`` (key, value per layer, in order) added to ``feeds``; logits and present."""
        if self.kv_cache == "shared_buffer":
            return self._run_shared(feeds, past)
        named = dict(zip(self.output_names, self.session.run(None, {**feeds, **dict(zip(self.past_names, past))})))
        return named["logits"], [named[name] for name in self.present_names]

    def _run_shared(self, feeds: dict[str, np.ndarray], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Past and present bound to one buffer per tensor: the kernel appends in place."""
        total = feeds["attention_mask"].shape[1]
        buffers = self._slots.buffers_for(past, total)
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits")
        for past_name, present_name, buffer in zip(self.past_names, self.present_names, buffers):
            bind_buffer(binding, past_name, present_name, buffer)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return logits, self._slots.hand_back(buffers, total)


def bind_buffer(binding: ort.IOBinding, past_name: str, present_name: str, buffer: np.ndarray) -> None:
    """Bind one preallocated ``buffer`` as both ``past_name`` and ``present_name`` (in place)."""
    shape, address = list(buffer.shape), buffer.ctypes.data
    binding.bind_input(past_name, "cpu", 0, buffer.dtype.type, shape, address)
    binding.bind_output(present_name, "cpu", 0, buffer.dtype.type, shape, address)


def positions_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """Positions of the last ``new_tokens`` tokens, counting only attended ones (left padding)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, -new_tokens:]
