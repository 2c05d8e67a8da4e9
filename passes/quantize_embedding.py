"""Replace a float embedding lookup with ``com.microsoft.GatherBlockQuantized``.

The kernel dequantizes only the gathered rows, so a 4-bit table costs an eighth of the bytes
and nothing per token beyond the rows read; the portable alternative,
``DequantizeLinear → Gather``, would dequantize all 49152 rows on every step.

Rewrite rules, per embedding (weight found by its stable name ``<path>.weight``):

1. Every ``Gather(W, ids, axis=0)`` becomes
   ``GatherBlockQuantized(codes, ids, scales, zero_points)`` with ``gather_axis = 0``,
   ``quantize_axis = 1`` (the hidden axis the codes were grouped along), the plan's group size
   as ``block_size`` and 4 or 8 ``bits`` (uint8 storage, two codes per byte at 4 bits).
   Where the hidden size is not a multiple of the group size (SmolLM2: 576 = 4.5 × 128) or the
   blocks per row are odd, the same groups are re-laid out losslessly on a smaller power-of-two
   block that divides the row into an even number of blocks (576 → 18 blocks of 32, each
   original scale and zero point repeated): ONNX Runtime's CPU kernel accepts a ragged last
   block, but its CUDA kernel indexes blocks and packed zero points by *flat* element index, so
   a ragged row shifts every later row's scales (measured: perplexity 1610 instead of 29 on an
   H100). The dequantized rows are bit-identical either way.
2. Codes, scales and zero points are the plan's (``aqexport.calibrate.edges``): the rows it
   returns are exactly the fake-quant model's embedding rows.

Precondition (``requires``): ``StableNamesPass`` ran; each table is used only by such Gathers
(the LM head was untied) and is planned as asymmetric 4/8-bit groups (an even width at 4 bits).
Postcondition (``ensures``): the float tables are no longer used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import PreconditionFailed
from aqexport.passes._linear_sites import check_tables_unused, new_initializer, table_lookups, take_over
from aqexport.passes._packing import pack_nibbles
from aqexport.passes._result import StatsPassResult

if TYPE_CHECKING:
    from aqexport.calibrate.plan import LinearPlan

__all__ = ["QuantizeEmbeddingPass"]

logger = logging.getLogger(__name__)


def _check_scheme(entry: LinearPlan, path: str) -> None:
    scheme = entry.scheme
    if scheme.symmetric or scheme.group_size is None or scheme.bits not in (4, 8):
        raise PreconditionFailed(
            f"the embedding '{path}' is planned as {scheme}; GatherBlockQuantized takes asymmetric 4/8-bit groups",
            "quantize the embedding with quantization.embedding: int4 or int8",
        )
    if scheme.bits == 4 and entry.codes.shape[1] % 2:
        raise PreconditionFailed(f"the embedding '{path}' has an odd hidden size", "keep it in float")


def uniform_block_size(width: int, group_size: int) -> int:
    """The largest power-of-two block (≥ 16) that tiles both the plan's groups and a row of
    ``width`` into an even number of blocks per row; ``group_size`` itself when it already does."""
    block = math.gcd(width, group_size)
    block = block & -block  # largest power of two dividing both
    while block > 16 and (width // block) % 2:
        block //= 2
    if width % block or (width // block) % 2 or block < 16:
        return group_size  # no such layout (odd or tiny widths): keep the plan's, CPU handles it
    return block


def _pack(entry: LinearPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    codes, zero = entry.codes.numpy(), entry.zero.numpy().astype(np.uint8)
    scale = entry.scale.float().numpy()
    group = entry.scheme.group_size
    block = uniform_block_size(codes.shape[1], group)
    if block != group:  # each group's scale and zero point repeated over its sub-blocks
        blocks = codes.shape[1] // block
        scale = np.repeat(scale, group // block, axis=1)[:, :blocks]
        zero = np.repeat(zero, group // block, axis=1)[:, :blocks]
    if entry.scheme.bits == 4:
        return pack_nibbles(codes), scale, pack_nibbles(zero), 4, block
    return codes.astype(np.uint8), scale, zero, 8, block


class QuantizeEmbeddingPass(ir.passes.InPlacePass):
    def __init__(self, embeddings: Mapping[str, LinearPlan]) -> None:
        super().__init__()
        self.embeddings = dict(embeddings)

    def requires(self, model: ir.Model) -> None:
        for path, entry in self.embeddings.items():
            if table_lookups(model.graph, path) is None:
                raise PreconditionFailed(
                    f"'{path}.weight' is not used only as a Gather table in the graph",
                    "run StableNamesPass first and untie the LM head from the embedding",
                )
            _check_scheme(entry, path)

    def ensures(self, model: ir.Model) -> None:
        check_tables_unused(model, self.embeddings)

    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        lookups = 0
        for path, entry in self.embeddings.items():
            lookups += self._replace(graph, path, entry, table_lookups(graph, path))
        if lookups and "com.microsoft" not in model.opset_imports:
            model.opset_imports["com.microsoft"] = 1
        logger.info("quantize_embedding: %d lookups to GatherBlockQuantized", lookups)
        stats = {"embeddings": len(self.embeddings), "lookups": lookups}
        return StatsPassResult(model, modified=lookups > 0, stats=stats)

    @staticmethod
    def _replace(graph: ir.Graph, path: str, entry: LinearPlan, gathers: list[ir.Node]) -> int:
        data, scales, zero_points, bits, block = _pack(entry)
        inputs = [
            new_initializer(graph, f"{path}.weight_Q{bits}", data),
            None,
            new_initializer(graph, f"{path}.weight_scales", scales),
            new_initializer(graph, f"{path}.weight_zero_points", zero_points),
        ]
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}
        for gather in gathers:
            inputs[1] = gather.inputs[1]
            base = gather.name.rsplit("/", 1)[0]
            node = ir.node(
                "GatherBlockQuantized",
                list(inputs),
                attributes,
                domain="com.microsoft",
                name=f"{base}/GatherBlockQuantized",
            )
            graph.insert_before(gather, [node])
            take_over(gather.outputs[0], node.outputs[0])
            graph.remove(gather, safe=True)
        return len(gathers)
