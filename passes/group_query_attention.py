"""Replace ``MultiHeadAttention`` and the exported KV-cache plumbing with ``GroupQueryAttention``.

After ``OrtFusionsPass`` each layer's attention is a ``com.microsoft.MultiHeadAttention`` fed
by the full key/value: ``Concat(past, new) → Unsqueeze → Expand → Reshape → Transpose →
Reshape``, which copies the whole cache to every query head on every decode step. On
SmolLM2 that plumbing costs about as much as the matmuls. ``GroupQueryAttention`` takes the
past and the *new* key/value separately, shares each KV head between its query heads inside
the kernel and writes ``present`` itself.

The artifact's I/O contract does not change: ``attention_mask``, ``position_ids`` and
``past_key_values.*`` stay as they are, and ``present.*`` keep their names and layout
(B, kv_heads, past + seq, head_dim). The rewrite keeps the model's own additive mask as
GQA's ``attention_bias``, so left padding and sliding windows (Gemma 3) mean what they meant;
``seqlens_k`` is therefore ``total_sequence_length - 1`` for every row (the mask, not
``seqlens_k``, says which keys are padding), which is what the kernel's causal rule needs.

Rewrite rule, per ``MultiHeadAttention(q, k, v, attention_bias=m)`` whose key and value trace
back through layout ops (Reshape, Transpose, Expand, Unsqueeze) to
``present.i.key = Concat(past_key_values.i.key, k_new, axis=-2)`` (and the same for value):

    GroupQueryAttention(q, BSD(k_new), BSD(v_new), past_key_values.i.key,
                        past_key_values.i.value, seqlens_k, total_sequence_length,
                        attention_bias=m)  →  out, present.i.key, present.i.value

The same rewrite applies where ORT's fusion already took the cache into the attention (OPT):
``MultiHeadAttention(q, k_new, v_new, attention_bias=m, past_key=past_key_values.i.key,
past_value=past_key_values.i.value) → out, present.i.key, present.i.value`` with ``k_new`` /
``v_new`` already in [B, S, H·D]; its present outputs become GQA's.

where ``BSD(x)`` is the projection's own [B, S, H·D] output when ``x`` is just its split into
heads (else ``Reshape(Transpose(x))``, on the new tokens only), and ``num_heads`` /
``kv_num_heads`` / ``scale`` come from the matched nodes. An ``Expand`` of the mask that does not
change its shape is skipped (the kernel broadcasts).

Rotary: when ``max_positions`` is given and the query and the new key are both the exported
``x·cos + rotate_half(x)·sin`` with the same angles (``passes/_rotary.py``), the pair becomes
``com.microsoft.RotaryEmbedding(BSD(x), position_ids, cos_cache, sin_cache)`` on [B, S, H·D],
which removes the per-layer Transpose / Slice / Neg / Concat. The rotation is *not* moved into
GQA (``do_rotary``): the kernel then takes positions from ``seqlens_k`` (past length + i) and
ignores ``position_ids``. Because RoPE scores depend only on position differences, that still
gives the same logits for left-padded rows (the fused-vs-unfused test passes with it on all
four tiny families), but it silently drops any non-contiguous ``position_ids`` a caller passes,
and it bought nothing measurable: SmolLM2 RTN int4 at level 4 decoded at 218–244 tok/s with it
against 225–252 without, in alternating runs. So the contract's ``position_ids`` stay live.

Measured on SmolLM2 (fp32 graph 1608 → 553 nodes; int4 example config at accuracy level 4,
2 threads): decode 109.7 → 151.7 tok/s, prefill 128 1625 → 1625 tok/s, 512 1418 → 1475 tok/s.

Precondition (``requires``): graph inputs ``input_ids`` and ``attention_mask`` (the sequence
lengths are read from them); ``OrtFusionsPass`` ran (otherwise there is no
``MultiHeadAttention`` and nothing changes). Postcondition (``ensures``): each fused layer has
exactly one ``GroupQueryAttention``, which writes its ``present.i.key`` / ``present.i.value``,
and no ``MultiHeadAttention`` still in use reads that layer's cache; every graph output is still
computed. Attention nodes that do not match are left as they were (``attention_left_unfused`` in
the manifest's ``fusions``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, PreconditionFailed, outputs_computed
from aqexport.passes._linear_sites import new_initializer, take_over
from aqexport.passes._result import StatsPassResult
from aqexport.passes._rotary import Rotary, match_rotary

__all__ = ["GroupQueryAttentionPass"]

logger = logging.getLogger(__name__)

_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Expand", "Unsqueeze"})
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_MS = "com.microsoft"


def _cache_concat(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    """The ``Concat(past, new, axis=-2)`` that produces a ``present`` output, found by walking
    back through pure layout ops from an attention input."""
    node = value.producer()
    while node is not None and node.op_type in _LAYOUT_OPS and node.domain == "":
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        return None
    axis = node.attributes.get_int("axis", 0)
    past = node.inputs[0]
    if axis not in (-2, 2) or past is None or past not in graph.inputs or not _PAST.match(past.name or ""):
        return None
    if node.outputs[0] not in graph.outputs:
        return None
    return node


def _heads(value: ir.Value, head_dim: int) -> int | None:
    width = value.shape[-1] if value.shape is not None else None
    return width // head_dim if isinstance(width, int) and width % head_dim == 0 else None


def _is_head_transpose(node: ir.Node | None) -> bool:
    """``Transpose(perm=[0, 2, 1, 3])``: [B, S, H, D] ↔ [B, H, S, D]."""
    if node is None or node.op_type != "Transpose":
        return False
    return list(node.attributes.get_ints("perm", [])) == [0, 2, 1, 3]


def _merged_from(value: ir.Value | None) -> ir.Value | None:
    """``Reshape(Transpose(x, [0, 2, 1, 3]), [B, S, H·D])`` → ``x`` ([B, H, S, D])."""
    reshape = value.producer() if value is not None else None
    if reshape is None or reshape.op_type != "Reshape" or not _is_head_transpose(reshape.inputs[0].producer()):
        return None
    return reshape.inputs[0].producer().inputs[0]


def _split_from(value: ir.Value) -> ir.Value | None:
    """``Transpose(Reshape(z, [B, S, H, D]), [0, 2, 1, 3])`` → ``z`` ([B, S, H·D])."""
    transpose = value.producer()
    if not _is_head_transpose(transpose):
        return None
    split = transpose.inputs[0].producer()
    if split is None or split.op_type != "Reshape":
        return None
    source = split.inputs[0]
    return source if source.shape is not None and len(source.shape) == 3 else None


def _unexpanded(bias: ir.Value | None) -> ir.Value | None:
    """The mask before an ``Expand`` that does not change its shape. The exporter's expand
    target is computed from the rotated query's shape, which would keep the graph's own rotary
    alive after the kernel took it over."""
    expand = bias.producer() if bias is not None else None
    if expand is None or expand.op_type != "Expand":
        return bias
    source = expand.inputs[0]
    if source.shape is not None and bias.shape is not None and list(source.shape) == list(bias.shape):
        return source
    return bias


def _cache_layer(value: ir.Value | None) -> int | None:
    """The layer whose ``past_key_values.i.*`` a value is concatenated from, through layout ops
    (whether or not that concat still produces a graph output)."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in _LAYOUT_OPS and node.domain == "":
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    past = node.inputs[0] if node is not None and node.op_type == "Concat" and node.inputs else None
    match = _PAST.match(past.name or "") if past is not None and past.is_graph_input() else None
    return int(match.group(1)) if match else None


class GroupQueryAttentionPass(ir.passes.InPlacePass):
    """``max_positions``: rows of the rotary cos/sin tables (the model's context length). With it,
    a recognised rotary embedding becomes ``com.microsoft.RotaryEmbedding`` on [B, S, H·D];
    without it, the graph's own rotary stays."""

    def __init__(self, max_positions: int | None = None) -> None:
        super().__init__()
        self.max_positions = max_positions

    def requires(self, model: ir.Model) -> None:
        names = {value.name for value in model.graph.inputs}
        if not {"input_ids", "attention_mask"} <= names:
            raise PreconditionFailed(
                "GroupQueryAttentionPass needs input_ids and attention_mask inputs",
                "run it on a graph with the artifact's dynamic-cache inputs (not the mobile step graph)",
            )

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        outputs_computed(graph, type(self).__name__)
        outputs = set(graph.outputs)
        fused: dict[int, int] = {}
        for node in graph:
            if node.op_type == "GroupQueryAttention" and node.domain == _MS:
                past = node.inputs[3] if len(node.inputs) > 3 else None
                match = _PAST.match(past.name or "") if past is not None else None
                if match is not None:
                    layer = int(match.group(1))
                    fused[layer] = fused.get(layer, 0) + 1
                    if not all(value in outputs for value in node.outputs[1:]):
                        raise PostconditionFailed(
                            f"layer {layer}'s GroupQueryAttention does not write present", BUG_FIX
                        )
        if any(count != 1 for count in fused.values()):
            raise PostconditionFailed(f"GroupQueryAttention nodes per layer: {fused}", BUG_FIX)
        for node in graph:
            if node.op_type != "MultiHeadAttention" or node.domain != _MS or not len(node.outputs[0].uses()):
                continue
            layers = {_cache_layer(node.inputs[i]) for i in (1, 2) if len(node.inputs) > i}
            if layers & fused.keys():
                raise PostconditionFailed(f"'{node.name}' still reads a fused layer's cache", BUG_FIX)

    def call(self, model: ir.Model) -> StatsPassResult:
        rewriter = _Rewriter(model.graph, self.max_positions)
        rewriter.run()
        logger.info(
            "group_query_attention: %d fused (%d with rotary), %d skipped",
            len(rewriter.fused),
            len(rewriter.rotary_fused),
            len(rewriter.skipped),
        )
        return StatsPassResult(
            model,
            modified=bool(rewriter.fused),
            stats={
                "fused": len(rewriter.fused),
                "rotary_fused": len(rewriter.rotary_fused),
                "skipped": len(rewriter.skipped),
            },
            manifest={
                "fusions": {
                    "group_query_attention_layers": rewriter.fused,
                    "rotary_embedding_layers": rewriter.rotary_fused,
                    "attention_left_unfused": rewriter.skipped,
                }
            },
        )


@dataclass
class _Site:
    """One attention to rewrite: the new tokens' key/value (in [B, H, S, D] unless
    ``new_in_bsd``), the layer's cache inputs and the values that become GQA's ``present``."""

    layer: int
    key_new: ir.Value
    value_new: ir.Value
    new_in_bsd: bool
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    attention_bias: ir.Value | None = None
    num_heads: int = 0
    kv_heads: int = 0


class _Rewriter:
    """One run of the rewrite over one graph: what it fused, skipped and created (the shared
    rotary tables and BSD shape constant) lives here, never on the pass."""

    def __init__(self, graph: ir.Graph, max_positions: int | None) -> None:
        self.graph, self.max_positions = graph, max_positions
        self.fused: list[int] = []
        self.rotary_fused: list[int] = []
        self.skipped: list[str] = []
        self._caches: list[tuple[Rotary, ir.Value, ir.Value]] = []
        self._bsd_shape: ir.Value | None = None

    def run(self) -> None:
        graph = self.graph
        sites = [node for node in graph if node.op_type == "MultiHeadAttention" and node.domain == _MS]
        lengths: tuple[ir.Value, ir.Value] | None = None
        for node in sites:
            site = self._match(node, graph)
            if site is None:
                continue
            if lengths is None:
                lengths = self._sequence_lengths(graph, sites[0])
            self._rewrite(graph, node, site, *lengths)

    def _match(self, node: ir.Node, graph: ir.Graph) -> _Site | None:
        inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
        query, key, value, bias, padding, attention_bias, past_key, past_value = inputs[:8]
        if bias is not None or padding is not None:
            self.skipped.append(f"{node.name}: packed q/k/v bias or key padding mask")
            return None
        if past_key is not None or past_value is not None:
            site = self._match_past_inputs(node, key, value, past_key, past_value)
        else:
            site = self._match_concat(node, key, value, graph)
        if site is None:
            return None
        head_dim = site.past_key.shape[-1] if site.past_key.shape is not None else None
        num_heads = node.attributes.get_int("num_heads", 0)
        kv_heads = site.past_key.shape[1] if site.past_key.shape is not None else None
        if not (isinstance(head_dim, int) and isinstance(kv_heads, int) and num_heads and num_heads % kv_heads == 0):
            self.skipped.append(f"{node.name}: head counts not static")
            return None
        if query is None or _heads(query, head_dim) not in (None, num_heads):
            self.skipped.append(f"{node.name}: query width is not num_heads × head_dim")
            return None
        site.attention_bias, site.num_heads, site.kv_heads = _unexpanded(attention_bias), num_heads, kv_heads
        return site

    def _match_concat(self, node: ir.Node, key, value, graph: ir.Graph) -> _Site | None:
        """Key and value are the exported ``Concat(past, new)`` seen through layout ops."""
        key_cat = _cache_concat(key, graph) if key is not None else None
        value_cat = _cache_concat(value, graph) if value is not None else None
        if key_cat is None or value_cat is None:
            self.skipped.append(f"{node.name}: key/value are not the exported cache concat")
            return None
        layer = self._layer_of(node, key_cat.inputs[0], value_cat.inputs[0])
        if layer is None:
            return None
        return _Site(
            layer=layer,
            key_new=key_cat.inputs[1],
            value_new=value_cat.inputs[1],
            new_in_bsd=False,
            past_key=key_cat.inputs[0],
            past_value=value_cat.inputs[0],
            present_key=key_cat.outputs[0],
            present_value=value_cat.outputs[0],
        )

    def _match_past_inputs(self, node: ir.Node, key, value, past_key, past_value) -> _Site | None:
        """ORT's fusion already moved the cache into the attention (OPT): new key/value in
        [B, S, H·D], ``past_key`` / ``past_value`` the graph inputs, ``present`` its outputs."""
        outputs = self.graph.outputs
        if (
            key is None
            or value is None
            or key.shape is None
            or len(key.shape) != 3
            or past_key is None
            or past_value is None
            or not (past_key.is_graph_input() and past_value.is_graph_input())
            or len(node.outputs) < 3
            or not all(out in outputs for out in node.outputs[1:3])
        ):
            self.skipped.append(f"{node.name}: past inputs are not the graph's cache with present outputs")
            return None
        layer = self._layer_of(node, past_key, past_value)
        if layer is None:
            return None
        return _Site(
            layer=layer,
            key_new=key,
            value_new=value,
            new_in_bsd=True,
            past_key=past_key,
            past_value=past_value,
            present_key=node.outputs[1],
            present_value=node.outputs[2],
        )

    def _layer_of(self, node: ir.Node, past_key: ir.Value, past_value: ir.Value) -> int | None:
        layer_k, layer_v = (_PAST.match(value.name or "") for value in (past_key, past_value))
        if (
            layer_k is None
            or layer_v is None
            or layer_k.group(1) != layer_v.group(1)
            or (layer_k.group(2), layer_v.group(2)) != ("key", "value")
        ):
            self.skipped.append(f"{node.name}: key and value caches of different layers")
            return None
        return int(layer_k.group(1))

    @staticmethod
    def _sequence_lengths(graph: ir.Graph, before: ir.Node) -> tuple[ir.Value, ir.Value]:
        """``seqlens_k`` (int32 [batch], every row ``total - 1``) and ``total_sequence_length``
        (int32 scalar), from the attention mask's shape."""
        inputs = {value.name: value for value in graph.inputs}
        tape = ir.tape.Tape()
        mask_shape = tape.op("Shape", [inputs["attention_mask"]])
        total64 = tape.op("Gather", [mask_shape, new_initializer(graph, "gqa_one", np.array(1, np.int64))])
        total = tape.op("Cast", [total64], attributes={"to": ir.DataType.INT32})
        last = tape.op("Sub", [total, new_initializer(graph, "gqa_one_i32", np.array(1, np.int32))])
        batch = tape.op("Shape", [inputs["input_ids"]], attributes={"start": 0, "end": 1})
        seqlens = tape.op("Expand", [last, batch])
        total.name, seqlens.name = "gqa_total_sequence_length", "gqa_seqlens_k"
        graph.insert_before(before, tape.nodes)
        return seqlens, total

    def _rotary(self, query: ir.Value, key_new: ir.Value, graph: ir.Graph) -> tuple[Rotary, Rotary] | None:
        if self.max_positions is None:
            return None
        query_rotated = _merged_from(query)
        if query_rotated is None:
            return None
        pair = match_rotary(query_rotated, graph), match_rotary(key_new, graph)
        if pair[0] is None or pair[1] is None or not pair[0].same_angles(pair[1]):
            return None
        return pair

    def _cache_values(self, graph: ir.Graph, rotary: Rotary) -> tuple[ir.Value, ir.Value]:
        """One cos/sin table pair per distinct angle source (Gemma 3 has a local and a global one)."""
        for known, cos, sin in self._caches:
            if known.same_angles(rotary):
                return cos, sin
        cos_table, sin_table = rotary.caches(self.max_positions)
        index = len(self._caches)
        cos = new_initializer(graph, f"gqa_cos_cache_{index}", cos_table)
        sin = new_initializer(graph, f"gqa_sin_cache_{index}", sin_table)
        self._caches.append((rotary, cos, sin))
        return cos, sin

    def _rewrite(self, graph: ir.Graph, node: ir.Node, site: _Site, seqlens: ir.Value, total: ir.Value) -> None:
        num_heads, kv_heads, layer = site.num_heads, site.kv_heads, site.layer
        tape = ir.tape.Tape()

        def bsd(x: ir.Value) -> ir.Value:
            """[B, H, S, D] → [B, S, H·D]: the projection's own output when ``x`` is just its
            split into heads, else an explicit transpose + reshape (only the new tokens)."""
            if site.new_in_bsd:
                return x
            source = _split_from(x)
            if source is not None:
                return source
            if self._bsd_shape is None:
                self._bsd_shape = new_initializer(graph, "gqa_bsd_shape", np.array([0, 0, -1], np.int64))
            return tape.op("Reshape", [tape.op("Transpose", [x], attributes={"perm": [0, 2, 1, 3]}), self._bsd_shape])

        attributes = {"num_heads": num_heads, "kv_num_heads": kv_heads}
        scale = node.attributes.get("scale")
        if scale is not None:
            attributes["scale"] = scale.value
        query, key_new = node.inputs[0], site.key_new
        rotary = None if site.new_in_bsd else self._rotary(query, key_new, graph)
        if rotary is not None:
            cos, sin = self._cache_values(graph, rotary[0])

            def rotate(source: ir.Value, heads: int) -> ir.Value:
                return tape.op(
                    "RotaryEmbedding",
                    [bsd(source), rotary[0].position_ids, cos, sin],
                    attributes={"interleaved": 0, "num_heads": heads},
                    domain=_MS,
                )

            query, key_new = rotate(rotary[0].source, num_heads), rotate(rotary[1].source, kv_heads)
            self.rotary_fused.append(layer)
        else:
            key_new = bsd(key_new)
        out, present_key, present_value = tape.op_multi_out(
            "GroupQueryAttention",
            [
                query,
                key_new,
                bsd(site.value_new),
                site.past_key,
                site.past_value,
                seqlens,
                total,
                None,
                None,
                None,
                site.attention_bias,
            ],
            attributes=attributes,
            domain=_MS,
            num_outputs=3,
        )
        graph.insert_before(node, tape.nodes)
        tape.nodes[-1].name = f"/model/layers.{layer}/attn/GroupQueryAttention"
        take_over(node.outputs[0], out)
        # GQA's output has its query's shape; recorded, RemoveNoOpReshapesPass can drop the head merge after it
        out.shape = out.shape or node.inputs[0].shape
        take_over(site.present_key, present_key)
        take_over(site.present_value, present_value)
        self.fused.append(layer)
