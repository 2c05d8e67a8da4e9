"""Let a tied model's embedding read the LM head's quantized table instead of its own copy.

A model that ties its embedding to its LM head (SmolLM2, Llama 3.2 1B/3B, Qwen2.5 0.5–3B,
Gemma 3) has one ``vocab × hidden`` matrix; quantized separately it is stored twice, and on a
small model that is the largest share of the artifact (SmolLM2 at int4: head 16.9 MiB plus
embedding 15.9 MiB of a ~94 MiB mobile artifact). ``MatMulNBits`` stores the head as
``B [N = vocab, blocks, blob]`` uint8 codes with ``scales [vocab, blocks]``: read as a 3-D table
quantized along its last axis in blocks of ``block_size``, ``B`` is what ``GatherBlockQuantized``
takes, with the scales viewed as ``[vocab, blocks, 1]``.

Rewrite rule, per (embedding path, head path):

    Gather(<embedding>.weight, ids, axis=0)
    → Reshape(GatherBlockQuantized(<head B>, ids, Reshape(<head scales>, [vocab, blocks, 1])[, zero points];
                                   gather_axis=0, quantize_axis=2, block_size, bits), [0, …, 0, -1])
      [→ Slice(…, 0, hidden, axis=-1)]

* ``B`` itself is never reshaped. The onnxruntime-genai builder's ``shared_embeddings`` reshapes
  ``B`` to 2-D instead; ONNX Runtime's optimizer folds that ``Reshape`` of a constant into a
  second copy of the table (in memory at every session start, and in the saved ``model.ort``:
  measured on the tiny Llama). Folding the scales' ``Reshape`` copies only the scales (an
  eighth of the 4-bit table at blocks of 32). ``MatMulNBits`` accepts 2-D scales only, so they
  are stored in its layout.
* Zero points: 8-bit ones are viewed as ``[vocab, blocks, 1]`` too; 4-bit ones are packed two
  blocks to a byte for ``MatMulNBits``, so the lookup gets its own copy with one block per byte
  (``blocks`` bytes a row: small beside the table). A symmetric head stores none.
* The ``Slice`` drops the padding ``MatMulNBits`` puts on a row whose hidden size is not a
  whole number of blocks (int8 head on SmolLM2: 576 → 640).
* Each 3-D row holds exactly one block per block index, so ONNX Runtime's CUDA kernel, which
  finds blocks by flat element index, sees no ragged rows.

The rows it returns are the head's dequantized rows, which calibration installed as the PyTorch
embedding (``aqexport.calibrate.edges.tie_embedding``), so the fake-quant reference is unchanged.

Precondition (``requires``): the embedding's float table is used only by ``Gather(axis 0)`` with
ids of known rank, and the head is one ``MatMulNBits`` with constant ``B`` / ``scales`` / zero
points (``QuantizeWeightsPass`` ran). Postcondition (``ensures``): the float table is no longer
used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import PreconditionFailed
from aqexport.passes._linear_sites import check_tables_unused, new_initializer, table_lookups, take_over
from aqexport.passes._result import StatsPassResult

__all__ = ["TiedEmbeddingPass"]

logger = logging.getLogger(__name__)


def _head_node(graph: ir.Graph, head: str) -> ir.Node | None:
    """The ``MatMulNBits`` whose ``B`` is the head's codes (``<head>.weight_Q4`` / ``_Q8``)."""
    for bits in (4, 8):
        codes = graph.initializers.get(f"{head}.weight_Q{bits}")
        if codes is None:
            continue
        users = [node for node, index in codes.uses() if node.op_type == "MatMulNBits" and index == 1]
        if len(users) == 1:
            return users[0]
    return None


def _attribute(node: ir.Node, name: str) -> int:
    return node.attributes[name].value


def _const(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    return new_initializer(graph, name, np.asarray(values, np.int64))


class TiedEmbeddingPass(ir.passes.InPlacePass):
    """``ties``: ``{embedding module path: LM head module path}``."""

    def __init__(self, ties: Mapping[str, str]) -> None:
        super().__init__()
        self.ties = dict(ties)

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        for embedding, head in self.ties.items():
            gathers = table_lookups(graph, embedding)
            if gathers is None or any(gather.inputs[1].shape is None for gather in gathers):
                raise PreconditionFailed(
                    f"'{embedding}.weight' is not used only as a Gather table of ids with a known rank",
                    "run StableNamesPass first and untie the LM head from the embedding",
                )
            node = _head_node(graph, head)
            weights = [] if node is None else [value for value in node.inputs[1:4] if value is not None]
            if node is None or any(value.const_value is None for value in weights):
                raise PreconditionFailed(
                    f"the LM head '{head}' is not one MatMulNBits with constant weights",
                    "quantize the head (quantization.lm_head: int4 or int8) with weight_format: matmul_nbits",
                )

    def ensures(self, model: ir.Model) -> None:
        check_tables_unused(model, self.ties)

    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        lookups = 0
        for embedding, head in self.ties.items():
            lookups += self._replace(graph, embedding, head, table_lookups(graph, embedding))
        if lookups and "com.microsoft" not in model.opset_imports:
            model.opset_imports["com.microsoft"] = 1
        logger.info("tied_embedding: %d lookups read the LM head's table", lookups)
        return StatsPassResult(model, modified=lookups > 0, stats={"ties": len(self.ties), "lookups": lookups})

    @staticmethod
    def _replace(graph: ir.Graph, embedding: str, head: str, gathers: list[ir.Node]) -> int:
        node = _head_node(graph, head)
        codes, scales = node.inputs[1], node.inputs[2]
        zero_points = [node.inputs[3]] if len(node.inputs) > 3 and node.inputs[3] is not None else []
        vocab, blocks, _ = codes.const_value.shape
        bits, block_size, hidden = (_attribute(node, name) for name in ("bits", "block_size", "K"))
        per_block = _const(graph, f"{embedding}.tied_block_shape", [vocab, blocks, 1])
        lookup_inputs = [codes, None, ir.node("Reshape", [scales, per_block], name=f"/{embedding}/TiedScales")]
        if zero_points and bits == 4:  # packed two blocks a byte for MatMulNBits: one a byte here
            packed = zero_points[0].const_value.numpy()
            unpacked = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(vocab, -1)[:, :blocks]
            lookup_inputs.append(new_initializer(graph, f"{embedding}.tied_zero_points", unpacked[..., None]))
        elif zero_points:
            zero = ir.node("Reshape", [zero_points[0], per_block], name=f"/{embedding}/TiedZeroPoints")
            lookup_inputs.append(zero)
        prelude = [value for value in lookup_inputs if isinstance(value, ir.Node)]
        lookup_inputs = [value.outputs[0] if isinstance(value, ir.Node) else value for value in lookup_inputs]
        attributes = {"gather_axis": 0, "quantize_axis": 2, "block_size": block_size, "bits": bits}
        padded = blocks * block_size != hidden
        if padded:
            bounds = [
                _const(graph, f"{embedding}.tied_slice_{name}", [value])
                for name, value in (("start", 0), ("end", hidden), ("axis", -1))
            ]
        graph.insert_before(gathers[0], prelude)
        for gather in gathers:
            base = gather.name.rsplit("/", 1)[0]
            ids = gather.inputs[1]
            lookup_inputs[1] = ids
            lookup = ir.node(
                "GatherBlockQuantized",
                list(lookup_inputs),
                attributes,
                domain="com.microsoft",
                name=f"{base}/GatherBlockQuantized",
            )
            row_shape = _const(graph, f"{embedding}.tied_row_shape", [0] * len(ids.shape) + [-1])
            nodes = [lookup, ir.node("Reshape", [lookup.outputs[0], row_shape], name=f"{base}/TiedRows")]
            if padded:
                nodes.append(ir.node("Slice", [nodes[-1].outputs[0], *bounds], name=f"{base}/TiedSlice"))
            for step in nodes:  # float rows throughout; contrib ops have no ONNX type inference
                step.outputs[0].type = gather.outputs[0].type
            graph.insert_before(gather, nodes)
            take_over(gather.outputs[0], nodes[-1].outputs[0])
            graph.remove(gather, safe=True)
        return len(gathers)
