"""Recognise the exported rotary embedding ``x·cos + rotate_half(x)·sin`` and its angle source.

Current ``transformers`` computes the angles as ``position_ids[..., None].float() * inv_freq``
(a ``Mul``, not the ``MatMul`` + ``Transpose`` that onnxscript's cos/sin-cache rule expects), so
onnxscript's ``RotaryEmbedding`` fusion does not fire on our exports. This module reads the
pieces a fused kernel needs instead: the un-rotated input, the ``inv_freq`` constant, the
``attention_scaling`` factor (``cos * s``, 1 when absent) and the ``position_ids`` input, and
tabulates the kernel's ``cos_cache`` / ``sin_cache`` (``[max_positions, head_dim / 2]``).
Only the non-interleaved full rotation (Llama, Qwen2, Mistral, Gemma 3) is recognised; anything
else returns ``None`` and stays unfused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["Rotary", "match_rotary"]

_PASS_THROUGH = frozenset({"Cast", "Unsqueeze", "Reshape", "Expand"})


@dataclass(frozen=True)
class Rotary:
    """One rotary application: ``output = rotate(source)`` at ``position_ids``."""

    source: ir.Value
    inv_freq: np.ndarray
    scaling: float
    position_ids: ir.Value

    def caches(self, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
        angles = np.arange(max_positions, dtype=np.float32)[:, None] * self.inv_freq[None, :].astype(np.float32)
        return (np.cos(angles) * self.scaling).astype(np.float32), (np.sin(angles) * self.scaling).astype(np.float32)

    def same_angles(self, other: Rotary) -> bool:
        return (
            self.position_ids is other.position_ids
            and self.scaling == other.scaling
            and np.array_equal(self.inv_freq, other.inv_freq)
        )


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    return None if tensor is None else tensor.numpy()


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _strip(value: ir.Value | None) -> ir.Value | None:
    """Follow Unsqueeze / Cast / Reshape / Expand back to their data input."""
    while value is not None and (node := value.producer()) is not None and node.op_type in _PASS_THROUGH:
        value = node.inputs[0]
    return value


def _angles(table: ir.Value, function: str, graph: ir.Graph) -> tuple[np.ndarray, float, ir.Value] | None:
    """``Unsqueeze(Cos(Concat(f, f)) [* s])`` with ``f = position_ids · inv_freq``."""
    value, scaling = _strip(table), 1.0
    if (mul := _producer(value, "Mul")) is not None:
        factors = [_const(x) for x in mul.inputs]
        constant = next((i for i, f in enumerate(factors) if f is not None and f.size == 1), None)
        if constant is None:
            return None
        scaling, value = float(factors[constant].reshape(())), mul.inputs[1 - constant]
    trig = _producer(value, function)
    concat = _producer(trig.inputs[0], "Concat") if trig is not None else None
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None
    freqs = _producer(concat.inputs[0], "Mul")
    if freqs is None:
        return None
    for position_side in (0, 1):
        inv_freq = _const(freqs.inputs[1 - position_side])
        positions = _strip(freqs.inputs[position_side])
        if inv_freq is not None and positions in graph.inputs and positions.name == "position_ids":
            return inv_freq.reshape(-1), scaling, positions
    return None


def _rotate_half_source(value: ir.Value) -> ir.Value | None:
    """``Concat(-x[..., d/2:], x[..., :d/2])`` → ``x``."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2:
        return None
    neg, first = _producer(concat.inputs[0], "Neg"), _producer(concat.inputs[1], "Slice")
    second = _producer(neg.inputs[0], "Slice") if neg is not None else None
    if first is None or second is None or first.inputs[0] is not second.inputs[0]:
        return None
    source = first.inputs[0]
    head = source.shape[-1] if source.shape is not None else None
    if not isinstance(head, int) or head % 2:
        return None

    def bounds(node: ir.Node) -> tuple[int, int, int] | None:
        start, end, axes = (_const(x) for x in node.inputs[1:4]) if len(node.inputs) >= 4 else (None, None, None)
        steps = _const(node.inputs[4]) if len(node.inputs) > 4 else np.array([1])
        if start is None or end is None or axes is None or steps is None or steps.reshape(-1)[0] != 1:
            return None
        return int(start.reshape(-1)[0]), int(min(end.reshape(-1)[0], head)), int(axes.reshape(-1)[0]) % 4

    if bounds(first) != (0, head // 2, 3) or bounds(second) != (head // 2, head, 3):
        return None
    return source


def match_rotary(value: ir.Value, graph: ir.Graph) -> Rotary | None:
    """``value = Add(Mul(x, cos), Mul(rotate_half(x), sin))`` on a ``[B, H, S, D]`` tensor."""
    add = _producer(value, "Add")
    if add is None:
        return None
    products = [_producer(x, "Mul") for x in add.inputs]
    if any(p is None for p in products):
        return None
    for straight, rotated in (products, products[::-1]):
        for x_side in (0, 1):
            source, cos = straight.inputs[x_side], straight.inputs[1 - x_side]
            for half_side in (0, 1):
                if _rotate_half_source(rotated.inputs[half_side]) is not source:
                    continue
                cos_angles = _angles(cos, "Cos", graph)
                sin_angles = _angles(rotated.inputs[1 - half_side], "Sin", graph)
                if cos_angles is None or sin_angles is None:
                    return None
                rotary = Rotary(source, *cos_angles)
                if not rotary.same_angles(Rotary(source, *sin_angles)) or rotary.inv_freq.size * 2 != source.shape[-1]:
                    return None
                return rotary
    return None
