"""Replace every planned linear's float weight with ``com.microsoft.MatMulNBits``.

The pass takes linears by module path (``QuantPlan.linears()`` plus, where configured, the LM
head from ``aqexport.calibrate.edges``), not the plan itself, because the head is quantized
outside the plan and lowers the same way.

The codes, scales and zero points come from the QuantPlan as they are: nothing is recomputed, so
the graph dequantizes to exactly the weights the PyTorch fake-quant model used
(``(q − z)·Δ``, checked in tests against ``LinearPlan.dequantize``).

Rewrite rules, per linear in the plan (weight found by its stable name):

1. ``MatMul(x, W)`` or ``Gemm(x, W[, C])`` becomes ``MatMulNBits(x, B, scales, zero_points)``
   with ``K = in``, ``N = out``; a Gemm's bias becomes an ``Add`` after it.
2. Bit width: 4-bit codes as 4-bit; 2- and 3-bit codes are stored in the 4-bit container
   (exact: the codes and zero points fit, only the file is larger than it could be); 5–8-bit
   codes as 8-bit. Symmetric (signed) codes are offset by ``2^(b−1)`` with that zero point.
3. Block size: the plan's group size, which must be a power of two ≥ 16 (MatMulNBits' rule);
   per-output-channel plans use block 128 with the row's scale and zero point repeated in every
   block, which is the same arithmetic. A ragged last block (SmolLM2: 576 = 4.5 × 128) is
   padded with the zero-point code, which dequantizes to 0 and does not touch the result.
4. A bias the plan changed (out / q·k transforms, shifts) replaces the graph's bias with a new
   initializer (biases can be shared between linears after the exporter's deduplication); a
   linear that had no bias in the graph gets an ``Add``.
5. ``accuracy_level`` is the target's (``Target.accuracy_level_for(bits)``: configured, or auto,
   4 for 8-bit weights and 0 otherwise; the rule and its reason live there). Linears that get
   a level > 0 quantize their input to int8 per block at run time; they are listed in the
   manifest's ``quantization.integer_activation_linears``.
6. A static LLM.int8 split adds its float part: ``Gather(x̂, O, axis=−1) · W_Oᵀ`` (the plan's
   original columns; the codes there are zero), summed onto the MatMulNBits output.
7. ``target.weight_format == "qdq"``: the portable form, ``DequantizeLinear → MatMul`` with int4/uint4
   (2–4-bit codes) or int8/uint8 codes in the ONNX layout ``[in, out]``, blocked along ``in``
   (``block_size``, opset 21; where the group does not divide ``in``, smaller blocks that do,
   each carrying its group's scale: ``_dividing_block``) or per output column. Standard ops only, for EPs without the
   contrib op. ONNX Runtime's CPU EP fuses the pair back into MatMulNBits with its session's
   ``session.qdq_matmulnbits_accuracy_level`` (default 4: int8 activations), so the runtime
   sets that to the artifact's declared accuracy level. ``"qdq8"`` is the same with 2–4-bit codes
   stored in int8/uint8: ONNX Runtime's ORT format (``model.ort``, what mobile runtimes load) has
   no 4-bit tensor type in 1.32, so the npu profile trades twice the weight bytes for a
   loadable ``.ort`` (same codes, same numerics).

Precondition (``requires``): ``StableNamesPass`` ran (weights carry module paths) and every
planned linear's float weight is a ``MatMul``/``Gemm`` input in the graph; for ``MatMulNBits``,
every group size is a power of two ≥ 16. Postcondition (``ensures``): no planned float weight
is a ``MatMul``/``Gemm`` input any more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from aqexport.passes._contract import PreconditionFailed, float_weights_replaced
from aqexport.passes._linear_sites import LinearSite, find_linear, new_initializer, take_over
from aqexport.passes._packing import pack_nibbles
from aqexport.passes._result import StatsPassResult
from aqexport.target import Target

if TYPE_CHECKING:
    from aqexport.calibrate.plan import LinearPlan

__all__ = ["QuantizeWeightsPass", "lazy_packed_codes", "pack_matmul_nbits"]

logger = logging.getLogger(__name__)

PER_CHANNEL_BLOCK = 128
WEIGHT_FORMATS = ("matmul_nbits", "qdq", "qdq8")


def _block_size(entry: LinearPlan, name: str) -> int:
    group = entry.scheme.group_size
    if group is None:
        return PER_CHANNEL_BLOCK
    if group < 16 or group & (group - 1):
        raise PreconditionFailed(
            f"'{name}' is quantized in groups of {group}; MatMulNBits needs a power of two ≥ 16",
            "use a group size of 16, 32, 64, 128 or 256",
        )
    return group


def _blocked(entry: LinearPlan, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(codes [N, K], scales [N, blocks], zero [N, blocks], bits)`` in MatMulNBits' terms:
    unsigned codes (symmetric ones offset by ``2^(b−1)``), per-channel rows repeated per block,
    ``bits`` the container (4 or 8)."""
    scheme = entry.scheme
    codes = entry.codes.numpy().astype(np.int32)
    scale = entry.scale.float().numpy()
    zero = entry.zero.float().numpy().astype(np.int32)
    if scheme.symmetric:
        codes = codes + 2 ** (scheme.bits - 1)
        zero = zero + 2 ** (scheme.bits - 1)
    n, k = codes.shape
    blocks = -(-k // block_size)
    if scheme.group_size is None:
        scale = np.repeat(scale.reshape(n, 1), blocks, axis=1)
        zero = np.repeat(zero.reshape(n, 1), blocks, axis=1)
    return codes, scale.astype(np.float32), zero, 4 if scheme.bits <= 4 else 8


def _packed_codes(codes: np.ndarray, zero: np.ndarray, block_size: int, bits: int) -> np.ndarray:
    """``B [N, blocks, blob]``: a ragged last block padded with the zero-point code."""
    n, k = codes.shape
    blocks = zero.shape[1]
    padded = np.repeat(zero, block_size, axis=1)[:, : blocks * block_size].copy()
    padded[:, :k] = codes
    padded = padded.astype(np.uint8)
    packed = pack_nibbles(padded) if bits == 4 else padded
    return packed.reshape(n, blocks, block_size * bits // 8)


def _zero_points(zero: np.ndarray, bits: int) -> np.ndarray | None:
    if np.all(zero == 2 ** (bits - 1)):  # MatMulNBits's default: no tensor to store or stream
        return None
    return pack_nibbles(zero) if bits == 4 else zero.astype(np.uint8)


def pack_matmul_nbits(entry: LinearPlan, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """``(B [N, blocks, blob], scales [N, blocks], zero_points [N, ·], bits)`` for MatMulNBits;
    ``zero_points`` is None where every one is the default ``2^(bits−1)`` (symmetric codes)."""
    codes, scales, zero, bits = _blocked(entry, block_size)
    return _packed_codes(codes, zero, block_size, bits), scales, _zero_points(zero, bits), bits


def lazy_packed_codes(linears: Mapping[str, LinearPlan], path: str, block_size: int) -> ir.LazyTensor:
    """``B`` of ``linears[path]``, packed only when something reads it: the artifact's writer,
    which streams it into the external data. Holding every packed matrix from lowering to
    writing would hold the whole quantized model (a 7B model: 3.4 GiB); read this way, a plan
    filed block by block (``aqexport.calibrate.plan``) is read back one block at a time, in
    the graph's order, and each matrix is freed once written."""
    entry = linears[path]
    n, k = entry.codes.shape
    bits = 4 if entry.scheme.bits <= 4 else 8
    blocks = -(-k // block_size)

    def pack() -> ir.Tensor:
        codes, _, zero, _ = _blocked(linears[path], block_size)
        return ir.tensor(_packed_codes(codes, zero, block_size, bits))

    return ir.LazyTensor(pack, ir.DataType.UINT8, ir.Shape([n, blocks, block_size * bits // 8]))


def _dividing_block(k: int, group_size: int) -> int:
    """The block size a ``DequantizeLinear`` uses for groups of ``group_size`` along ``k`` inputs:
    the group size where it divides ``k``, else the largest block dividing both (SmolLM2's 576
    inputs in groups of 128: blocks of 64, each group's scale on two of them, the last half-group
    on one). The same values either way; ONNX allows a ragged last block, but QNN's NPU compiler
    leaves such a weight on the CPU (measured with onnxruntime-qnn: every linear whose input
    size is not a multiple of its group)."""
    return group_size if k % group_size == 0 else math.gcd(k, group_size)


def _dequantize_linear_matmul(
    graph: ir.Graph, path: str, entry: LinearPlan, x: ir.Value, base: str, min_container: int = 4
) -> list[ir.Node]:
    """``DequantizeLinear(codes [in, out]) → MatMul`` (rule 7): blocked along ``in`` for group
    plans (opset 21 ``block_size``, in blocks that divide ``in``), per column otherwise."""
    scheme = entry.scheme
    codes, scale, zero = entry.codes.numpy().T, entry.scale.float().numpy().T, entry.zero.float().numpy().T
    container = max(4 if scheme.bits <= 4 else 8, min_container)
    if scheme.symmetric:
        kind = ir.DataType.INT4 if container == 4 else ir.DataType.INT8
        codes, zero = codes.astype(np.int8), zero.astype(np.int8)
    else:
        kind = ir.DataType.UINT4 if container == 4 else ir.DataType.UINT8
        codes, zero = codes.astype(np.uint8), zero.astype(np.uint8)
    attributes = {"axis": 1}
    if scheme.group_size is not None:
        block = _dividing_block(codes.shape[0], scheme.group_size)
        if block != scheme.group_size:  # each group's scale and zero point on each of its blocks
            group_of_block = np.arange(codes.shape[0] // block) * block // scheme.group_size
            scale, zero = scale[group_of_block], zero[group_of_block]
        attributes = {"axis": 0, "block_size": block}
    else:
        scale, zero = scale.reshape(-1), zero.reshape(-1)
    inputs = [
        new_initializer(graph, f"{path}.weight_Q{container}", codes, kind),
        new_initializer(graph, f"{path}.weight_scales", scale.astype(np.float32)),
        new_initializer(graph, f"{path}.weight_zero_points", zero, kind),
    ]
    dequantize = ir.node("DequantizeLinear", inputs, attributes, name=f"{base}/DequantizeLinear")
    matmul = ir.node("MatMul", [x, dequantize.outputs[0]], name=f"{base}/MatMul")
    return [dequantize, matmul]


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """``linears``: planned linears by module path. ``target``: the weight format and the
    accuracy-level rule (default: ``Target()``, MatMulNBits at the auto level)."""

    def __init__(self, linears: Mapping[str, LinearPlan], target: Target | None = None) -> None:
        super().__init__()
        self.linears = linears  # a plan's are read block by block as they are walked: not copied
        self.target = target or Target()
        if self.target.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {self.target.weight_format!r}")

    def requires(self, model: ir.Model) -> None:
        for path, entry in self.linears.items():
            if find_linear(model.graph, f"{path}.weight") is None:
                raise PreconditionFailed(
                    f"the planned linear '{path}' is not a MatMul/Gemm on '{path}.weight' in the graph",
                    "run StableNamesPass first, and lower a plan made for this model",
                )
            if self.target.weight_format == "matmul_nbits":
                _block_size(entry, path)

    def ensures(self, model: ir.Model) -> None:
        float_weights_replaced(model.graph, self.linears)

    def call(self, model: ir.Model) -> StatsPassResult:
        graph = model.graph
        integer_activations: list[str] = []  # linears whose MatMulNBits runs at accuracy_level > 0
        for path, entry in self.linears.items():
            if self._replace(graph, path, entry, find_linear(graph, f"{path}.weight")):
                integer_activations.append(path)
        weight_format = self.target.weight_format
        if self.linears and weight_format == "matmul_nbits" and "com.microsoft" not in model.opset_imports:
            model.opset_imports["com.microsoft"] = 1
        logger.info("quantize_weights: %d linears as %s", len(self.linears), weight_format)
        return StatsPassResult(
            model,
            modified=bool(self.linears),
            stats={
                "linears": len(self.linears),
                "weight_format": weight_format,
                "integer_activations": len(integer_activations),
            },
            manifest={"quantization": {"integer_activation_linears": integer_activations}},
        )

    def _replace(self, graph: ir.Graph, path: str, entry: LinearPlan, site: LinearSite) -> bool:
        """Lower one linear; returns whether its MatMulNBits quantizes activations (level > 0)."""
        base = site.node.name.rsplit("/", 1)[0]
        integer_activations = False
        if self.target.weight_format in ("qdq", "qdq8"):
            container = 8 if self.target.weight_format == "qdq8" else 4
            nodes = _dequantize_linear_matmul(graph, path, entry, site.input, base, container)
        else:
            nodes = [self._matmul_nbits(graph, path, entry, site.input, base)]
            integer_activations = nodes[0].attributes.get_int("accuracy_level", 0) > 0
        output = nodes[-1].outputs[0]
        if entry.outlier_weight is not None and len(entry.outlier.channels):
            output = self._outlier_columns(graph, path, entry, site.input, output, base, nodes)
        bias = self._bias(graph, path, entry, site)
        if site.node.op_type == "Gemm" or (bias is not None and site.bias_node is None):
            if bias is not None:
                add = ir.node("Add", [output, bias], name=f"{base}/Add")
                nodes.append(add)
                output = add.outputs[0]
        elif bias is not None:
            site.bias_node.replace_input_with(site.bias_index, bias)
        graph.insert_before(site.node, nodes)
        final = site.output if site.node.op_type == "Gemm" or site.bias_node is None else site.node.outputs[0]
        take_over(final, output)  # it may be a graph output (the LM head)
        graph.remove(site.node, safe=True)
        return integer_activations

    def _matmul_nbits(self, graph: ir.Graph, path: str, entry: LinearPlan, x: ir.Value, base: str) -> ir.Node:
        block_size = _block_size(entry, path)
        _, scales, zero, bits = _blocked(entry, block_size)
        zero_points = _zero_points(zero, bits)
        n, k = entry.codes.shape
        attributes = {"K": k, "N": n, "bits": bits, "block_size": block_size}
        level = self.target.accuracy_level_for(bits)
        if level:
            attributes["accuracy_level"] = level
        inputs = [
            x,
            new_initializer(graph, f"{path}.weight_Q{bits}", lazy_packed_codes(self.linears, path, block_size)),
            new_initializer(graph, f"{path}.weight_scales", scales),
        ]
        if zero_points is not None:
            inputs.append(new_initializer(graph, f"{path}.weight_zero_points", zero_points))
        return ir.node("MatMulNBits", inputs, attributes, domain="com.microsoft", name=f"{base}/MatMulNBits")

    @staticmethod
    def _outlier_columns(graph, path, entry: LinearPlan, x: ir.Value, int8: ir.Value, base: str, nodes) -> ir.Value:
        channels = new_initializer(graph, f"{path}.outlier_channels", entry.outlier.channels.numpy().astype(np.int64))
        weight = new_initializer(graph, f"{path}.outlier_weight", entry.outlier_weight.float().numpy().T)
        gather = ir.node("Gather", [x, channels], {"axis": -1}, name=f"{base}/Gather_outliers")
        matmul = ir.node("MatMul", [gather.outputs[0], weight], name=f"{base}/MatMul_outliers")
        add = ir.node("Add", [int8, matmul.outputs[0]], name=f"{base}/Add_outliers")
        nodes.extend([gather, matmul, add])
        return add.outputs[0]

    @staticmethod
    def _bias(graph: ir.Graph, path: str, entry: LinearPlan, site: LinearSite) -> ir.Value | None:
        if entry.bias is not None:
            return new_initializer(graph, f"{path}.bias_planned", entry.bias.float().numpy())
        if site.bias_node is not None:
            return site.bias_node.inputs[site.bias_index]
        return None
