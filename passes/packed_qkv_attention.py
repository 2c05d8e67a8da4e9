"""Feed ``GroupQueryAttention`` the packed q/k/v matmul output and let it apply the rotary itself.

After ``GroupQueryAttentionPass`` and ``PackMatMulNBitsPass`` each layer's attention is

    Split(qkv, [H·D, Hkv·D, Hkv·D]) → RotaryEmbedding(q), RotaryEmbedding(k), v
        → GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, attention_bias=m)

which is four kernels per layer around the attention (one Split, two rotations) that the kernel
can do itself: given the packed ``query`` [B, S, (H + 2·Hkv)·D] and empty key/value it splits
the heads, and with ``do_rotary=1`` it rotates q and k from ``cos_cache`` / ``sin_cache``. On
CUDA the whole step is then one fused kernel (unpack, rotate q and k, append k and v to the
shared cache).

Why: measured with ONNX Runtime's profiler on an H100 (SmolLM2 GPTQ int4, cuda profile, decode
after 512 tokens), the Split and RotaryEmbedding nodes took 944 + 904 µs of each 13.6 ms step:
the gap to the genai builder's 10.3 ms graph, which packs q/k/v into its attention the same way.
On the CPU EP it bought nothing at 128 / 512 tokens and cost 8 % at 2048, so the lowering runs it
for the cuda profile only (``Target.attention_takes_packed_qkv``).

Rewrite rule, per ``com.microsoft.GroupQueryAttention`` whose key and value are given:

    GroupQueryAttention(RotaryEmbedding(Split₀(p), pos, cos, sin), RotaryEmbedding(Split₁(p), pos,
                        cos, sin), Split₂(p), past_k, past_v, seqlens_k, total, …, attention_bias)
      → GroupQueryAttention(p, ∅, ∅, past_k, past_v, seqlens_k, total, cos, sin, ∅,
                            attention_bias; do_rotary=1, rotary_interleaved=0)

where each ``Splitᵢ(p)`` may go through an ``Add`` of a constant bias (Qwen2), all three or none:
those become one ``Add(p, concat(biases))``; and, without the rotations (OPT: learned positions),
``GroupQueryAttention(Split₀(p), Split₁(p), Split₂(p), …) → GroupQueryAttention(p, ∅, ∅, …)``.
The Split must be on the last axis with sizes
``[H·D, Hkv·D, Hkv·D]`` in q, k, v order and its outputs read by nothing else; both rotations
non-interleaved, full-width, with the same ``position_ids`` and tables.

Positions: the kernel rotates token i of a call at ``past length + i`` (from ``seqlens_k``), not
at the graph's ``position_ids``, as in the genai builder's graphs. RoPE scores depend only on
position differences, so logits are unchanged for contiguous positions, left padding included
(the padded row's keys are masked by ``attention_bias``); a caller's non-contiguous
``position_ids`` are ignored on this profile. GQA's own ``position_ids`` input (9) is not used:
with it, ONNX Runtime 1.32's CPU kernel gave wrong logits (0.59 off) for the decode step after a
left-padded batched prefill (``tests/test_ort_fusions.py``), and right without it.

Precondition: dead nodes removed (``RemoveUnusedNodesPass``): a Split output still read by a dead
node counts as shared, and the attention is left unfused. Postcondition (``ensures``): every graph
output is still computed, and no rewritten attention still reads a ``RotaryEmbedding`` or
``Split`` output. Attentions that do not match are left as
they were (``packed_qkv_left_unfused`` in the manifest's ``fusions``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, outputs_computed
from aqexport.passes._linear_sites import new_initializer
from aqexport.passes._result import StatsPassResult

__all__ = ["PackedQkvAttentionPass"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"


def _ms_producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == _MS else None


def _rotation(value: ir.Value | None) -> ir.Node | None:
    """The non-interleaved, full-width ``RotaryEmbedding`` that makes ``value``."""
    node = _ms_producer(value, "RotaryEmbedding")
    if node is None or len(node.inputs) != 4 or len(node.outputs[0].uses()) != 1:
        return None
    if node.attributes.get_int("interleaved", 0) or node.attributes.get_int("rotary_embedding_dim", 0):
        return None
    return node


def _biased(value: ir.Value) -> tuple[ir.Value, np.ndarray | None]:
    """``Add(x, b)`` with a constant 1-D ``b`` read once (Qwen2's q/k/v bias) → ``(x, b)``."""
    add = value.producer()
    if add is None or add.op_type != "Add" or add.domain != "" or len(value.uses()) != 1:
        return value, None
    for side in (0, 1):
        bias = add.inputs[1 - side].const_value if add.inputs[1 - side] is not None else None
        if bias is not None and len(bias.shape) == 1:
            return add.inputs[side], bias.numpy()
    return value, None


def _qkv_split(values: list[ir.Value | None], widths: list[int]) -> ir.Value | None:
    """The packed tensor when ``values`` are exactly the three outputs of one last-axis Split
    with sizes ``widths``, each read once."""
    split = values[0].producer() if values[0] is not None else None
    if split is None or split.op_type != "Split" or split.domain != "" or len(split.outputs) != 3:
        return None
    if list(split.outputs) != values or any(len(value.uses()) != 1 for value in values):
        return None
    axis = split.attributes.get_int("axis", 0)
    shape = split.inputs[0].shape or values[0].shape  # the output of a split has its input's rank
    rank = len(shape) if shape is not None else None
    sizes = split.inputs[1].const_value if len(split.inputs) > 1 and split.inputs[1] is not None else None
    if axis != -1 and (rank is None or axis != rank - 1) or sizes is None:
        return None
    return split.inputs[0] if [int(x) for x in sizes.numpy().reshape(-1)] == widths else None


class PackedQkvAttentionPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> StatsPassResult:
        fused, rotary, skipped = [], 0, []
        for node in list(model.graph):
            if node.op_type != "GroupQueryAttention" or node.domain != _MS:
                continue
            outcome = self._rewrite(node)
            if isinstance(outcome, str):
                skipped.append(f"{node.name}: {outcome}")
                continue
            fused.append(node.name)
            rotary += outcome
        logger.info("packed_qkv_attention: %d packed (%d with rotary), %d left", len(fused), rotary, len(skipped))
        return StatsPassResult(
            model,
            modified=bool(fused),
            stats={"packed": len(fused), "rotary_in_attention": rotary, "skipped": len(skipped)},
            manifest={"fusions": {"packed_qkv_attention": len(fused), "packed_qkv_left_unfused": skipped}},
        )

    @staticmethod
    def _rewrite(node: ir.Node) -> int | str:
        """Rewrites ``node`` in place: 1 if it now rotates, 0 if packed without rotary, or why not."""
        inputs = list(node.inputs) + [None] * (11 - len(node.inputs))
        query, key, value, past_key = inputs[:4]
        if key is None or value is None or any(x is not None for x in inputs[7:10]):
            return "already packed or rotating"
        if node.attributes.get_int("do_rotary", 0):
            return "already rotating"
        heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
        head_dim = past_key.shape[-1] if past_key is not None and past_key.shape is not None else None
        if not isinstance(head_dim, int) or not heads or not kv_heads:
            return "head size not static"
        rotations = _rotation(query), _rotation(key)
        tables: list[ir.Value | None] = [None, None, None]
        if all(rotations):
            q_rot, k_rot = rotations
            if any(a is not b for a, b in zip(q_rot.inputs[1:], k_rot.inputs[1:])):
                return "q and k rotate with different positions or tables"
            tables = list(q_rot.inputs[1:])  # position_ids (unused, see the module's docstring), cos, sin
            query, key = q_rot.inputs[0], k_rot.inputs[0]
        elif any(rotations):
            return "only one of q and k is a fused rotation"
        unbiased = [_biased(x) for x in (query, key, value)]
        biases = [bias for _, bias in unbiased]
        if any(bias is None for bias in biases) and any(bias is not None for bias in biases):
            return "only some of q/k/v add a bias"
        widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        packed = _qkv_split([x for x, _ in unbiased], widths)
        if packed is None:
            return "q/k/v are not one packed matmul's split"
        if biases[0] is not None:  # one Add of the concatenated biases on the packed tensor
            if [bias.size for bias in biases] != widths:
                return "q/k/v biases do not match their widths"
            graph = node.graph
            name = f"{node.name}/packed_qkv_bias"
            packed_bias = new_initializer(graph, name, np.concatenate(biases))
            add = ir.node("Add", [packed, packed_bias], name=f"{node.name}/PackedBias")
            graph.insert_before(node, add)
            packed = add.outputs[0]
        _, cos, sin = tables
        new_inputs = list(node.inputs) + [None] * (11 - len(node.inputs))
        new_inputs[0:3] = [packed, None, None]
        new_inputs[7:9] = [cos, sin]
        node.resize_inputs(len(new_inputs))
        for index, input_value in enumerate(new_inputs):
            node.replace_input_with(index, input_value)
        if cos is None:
            return 0
        node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)
        node.attributes["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", 0)
        return 1

    def ensures(self, model: ir.Model) -> None:
        outputs_computed(model.graph, type(self).__name__)
        for node in model.graph:
            if node.op_type != "GroupQueryAttention" or node.domain != _MS or node.inputs[1] is not None:
                continue
            query = node.inputs[0]
            producer = query.producer() if query is not None else None
            if producer is not None and producer.op_type in ("RotaryEmbedding", "Split"):
                raise PostconditionFailed(f"'{node.name}' reads a packed query through {producer.op_type}", BUG_FIX)
