"""Make a GroupQueryAttention graph run its KV cache in place: the genai model builder's contract.

onnxruntime-genai copies the whole cache every token unless ``search.past_present_share_buffer``
is true; then it preallocates each layer's ``past_key_values.i.*`` at ``[B, kv_heads,
max_length, head_dim]`` and binds the *same* buffer as ``present.i.*``, and
``GroupQueryAttention`` writes the new tokens' key/value into it at ``seqlens_k``
(ALGORITHMS.md §10: on SmolLM2 at a 512-token context that copy cost ~30 % of decode). The
kernel side needs nothing new: our GQA already takes ``seqlens_k`` / ``total_sequence_length``
from the attention mask (``GroupQueryAttentionPass``). What breaks is the exported graph's own
bookkeeping, which reads the *past length* off the cache tensor (``Shape(past_key_values.0.value)
[2]`` feeds the causal mask and the cache positions): with a shared buffer that is the buffer's
capacity, not the number of tokens in it.

The rewrite: every ``Shape`` of a ``past_key_values.*`` input is rebuilt from what the contract
says instead, dimension by dimension: batch from ``input_ids``, the KV heads and head size as
constants, and the past length as ``attention_mask``'s length minus ``input_ids``' length. Then
the cache inputs feed ``GroupQueryAttention`` only, and the graph computes the same thing for a
growing cache (the past holds exactly the past tokens) and for a shared buffer (it holds
``max_length`` slots), so one artifact serves both: ``metadata_props["aqexport.kv_cache"] =
"shared_buffer"`` tells runtimes it may share, ``genai_config.json`` tells onnxruntime-genai.

``required``: the user asked for the shared buffer (``target.kv_cache: shared_buffer``), so a
graph that cannot take it is an error; otherwise (``auto``) it keeps the growing contract and the
manifest's ``kv_cache`` section says why (e.g. an attention the GQA fusion did not match).

Precondition: ``input_ids`` and ``attention_mask`` inputs, and (when ``required``) every cache
input read only by ``GroupQueryAttention`` and ``Shape``. Postcondition: every cache input is
read by ``GroupQueryAttention`` only (as its past key or value).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed, PreconditionFailed, outputs_computed
from aqexport.passes._linear_sites import new_initializer, take_over
from aqexport.passes._result import StatsPassResult

__all__ = ["KV_CACHE_METADATA_KEY", "SharedKvBufferPass"]

logger = logging.getLogger(__name__)

#: ``model.metadata_props`` key whose value names the artifact's KV contract for runtimes.
KV_CACHE_METADATA_KEY = "aqexport.kv_cache"

_PAST = re.compile(r"past_key_values\.\d+\.(key|value)$")
_GQA_PAST_SLOTS = (3, 4)


def _cache_inputs(graph: ir.Graph) -> list[ir.Value]:
    return [value for value in graph.inputs if _PAST.match(value.name or "")]


def _is_gqa_past(node: ir.Node, index: int) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and index in _GQA_PAST_SLOTS


def _live_uses(graph: ir.Graph, value: ir.Value) -> list[tuple[ir.Node, int]]:
    """Uses by nodes whose results are still read: the fusions leave the replaced cache concats
    and attentions in place for the cleanup that follows."""
    outputs = set(graph.outputs)
    return [(node, index) for node, index in value.uses() if any(out.uses() or out in outputs for out in node.outputs)]


def _shared_buffer_blocker(graph: ir.Graph) -> str | None:
    """Why this graph cannot share its KV buffer, or ``None`` when it can."""
    names = {value.name for value in graph.inputs}
    if not {"input_ids", "attention_mask"} <= names:
        return "the graph has no input_ids / attention_mask inputs (not the dynamic-cache contract)"
    caches = _cache_inputs(graph)
    if not caches:
        return "the graph has no past_key_values inputs"
    for value in caches:
        shape = value.shape
        if shape is None or len(shape) != 4 or not all(isinstance(shape[i], int) for i in (1, 3)):
            return f"'{value.name}' has no static [B, kv_heads, S, head_dim] layout"
        for node, index in _live_uses(graph, value):
            if _is_gqa_past(node, index) or node.op_type == "Shape":
                continue
            return f"'{value.name}' is read by {node.op_type} '{node.name}' (an attention left unfused)"
    return None


class _ShapeRebuilder:
    """Builds the replacement of ``Shape(past, start, end)`` from the contract's other inputs,
    sharing the per-dimension values between all rewritten shapes."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.inputs = {value.name: value for value in graph.inputs}
        self._dims: dict[str, ir.Value] = {}

    def _batch(self, tape: ir.tape.Tape) -> ir.Value:
        if "batch" not in self._dims:
            self._dims["batch"] = tape.op("Shape", [self.inputs["input_ids"]], attributes={"start": 0, "end": 1})
        return self._dims["batch"]

    def _past_length(self, tape: ir.tape.Tape) -> ir.Value:
        if "past" not in self._dims:
            total = tape.op("Shape", [self.inputs["attention_mask"]], attributes={"start": 1, "end": 2})
            new = tape.op("Shape", [self.inputs["input_ids"]], attributes={"start": 1, "end": 2})
            self._dims["past"] = tape.op("Sub", [total, new])
            self._dims["past"].name = "kv_past_sequence_length"
        return self._dims["past"]

    def shape_of(self, node: ir.Node, cache: ir.Value, tape: ir.tape.Tape) -> ir.Value:
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", 4)
        start, end = (max(0, min(4, i + 4 if i < 0 else i)) for i in (start, end))
        pieces = []
        for dim in range(start, end):
            if dim == 0:
                pieces.append(self._batch(tape))
            elif dim == 2:
                pieces.append(self._past_length(tape))
            else:
                size = int(cache.shape[dim])
                key = f"kv_dim_{size}"
                if key not in self._dims:
                    self._dims[key] = new_initializer(self.graph, key, np.array([size], np.int64))
                pieces.append(self._dims[key])
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return new_initializer(self.graph, "kv_empty_shape", np.zeros(0, np.int64))
        return tape.op("Concat", pieces, attributes={"axis": 0})


class SharedKvBufferPass(ir.passes.InPlacePass):
    def __init__(self, required: bool = False) -> None:
        super().__init__()
        self.required = required

    def requires(self, model: ir.Model) -> None:
        if not self.required:
            return
        reason = _shared_buffer_blocker(model.graph)
        if reason is not None:
            raise PreconditionFailed(
                f"target.kv_cache: shared_buffer needs every layer's cache read by GroupQueryAttention only: {reason}",
                "use target.kv_cache: auto (falls back to the growing cache) or growing, or keep target.fuse on",
            )

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        outputs_computed(graph, type(self).__name__)
        if model.metadata_props.get(KV_CACHE_METADATA_KEY) != "shared_buffer":
            return
        for value in _cache_inputs(graph):
            for node, index in _live_uses(graph, value):
                if not _is_gqa_past(node, index):
                    raise PostconditionFailed(f"'{value.name}' is still read by {node.op_type} '{node.name}'", BUG_FIX)

    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        reason = _shared_buffer_blocker(graph)
        if reason is not None:
            logger.info("shared_kv_buffer: keeping the growing cache: %s", reason)
            model.metadata_props[KV_CACHE_METADATA_KEY] = "growing"
            return StatsPassResult(
                model,
                modified=False,
                stats={"shapes_rewritten": 0},
                manifest={"kv_cache": {"contract": "growing", "reason": reason}},
            )
        rebuilder = _ShapeRebuilder(graph)
        rewritten = 0
        for cache in _cache_inputs(graph):
            for node, _ in _live_uses(graph, cache):
                if node.op_type != "Shape":
                    continue
                tape = ir.tape.Tape()
                replacement = rebuilder.shape_of(node, cache, tape)
                old = node.outputs[0]
                if old.is_graph_output():  # keep the output's name on a value of its own
                    replacement = tape.op("Identity", [replacement])
                graph.insert_before(node, tape.nodes)
                if old.is_graph_output():
                    take_over(old, replacement)
                else:
                    ir.convenience.replace_all_uses_with(old, replacement)
                graph.remove(node, safe=True)
                rewritten += 1
        model.metadata_props[KV_CACHE_METADATA_KEY] = "shared_buffer"
        logger.info("shared_kv_buffer: %d cache shape reads rebuilt from the inputs", rewritten)
        return StatsPassResult(
            model,
            modified=True,
            stats={"shapes_rewritten": rewritten},
            manifest={
                "kv_cache": {
                    "contract": "shared_buffer",
                    "layers": len(_cache_inputs(graph)) // 2,
                    "past_length_from": "attention_mask length - input_ids length",
                }
            },
        )
