"""The per-linear, quantization-aware section of ``aqexport diff``.

A generic graph diff says "initializer ``model.layers.3.mlp.down_proj.weight_Q4`` changed"; what a
user comparing two quantized builds needs is *how*: did the scheme change (bits, block size,
symmetry, accuracy level), how far did the dequantized weights move (SQNR), did the scales drift,
did the LLM.int8 outlier set change, which norms absorbed a transform. :func:`compare_linears`
answers that, per linear, keyed by Hugging Face module path.

**Finding linears.** A linear is one weight matrix the model multiplies by, in one of the forms our
passes (and ONNX Runtime's tools) write:

* ``matmul_nbits``: ``com.microsoft.MatMulNBits`` (``QuantizeWeightsPass``);
* ``qdq``: ``DequantizeLinear(codes) → MatMul`` / ``Gemm`` (the portable and mobile forms);
* ``float``: ``MatMul`` / ``Gemm`` on a float initializer named ``….weight`` (or ``….weight_folded``);
* ``gather_block_quantized`` (and ``qdq`` / ``float`` ``Gather``): the embedding table, reported in
  its own section; the LM head is a linear and is also summarised in its own section.

**Names.** ``StableNamesPass`` puts the module path in every weight's initializer name and
``QuantizeWeightsPass`` keeps it (``<path>.weight_Q4`` / ``_scales`` / ``_zero_points``), so the
weight's initializer name is the first source of a linear's name, the node name
(``/model/layers.0/self_attn/q_proj/MatMulNBits``) the fallback. The onnxruntime-genai builder
names weights ``<path>.MatMul.weight_Q4`` with ``attn`` for Hugging Face's ``self_attn``; those are
mapped to module paths (``model.layers.0.attn.o_proj.MatMul.weight_Q4`` →
``model.layers.0.self_attn.o_proj``). Embeddings are named by their node
(``/model/embed_tokens/…``), because a tied table may read the LM head's initializer.

**Packed linears.** ``PackMatMulNBitsPass`` merges q/k/v (and gate/up) into one
``<scope>/packed/MatMulNBits`` on ``<scope>.packed_weight`` / ``_scales`` / ``_zero_points``, followed
by ``<scope>/packed/Split`` with the widths in ``<scope>.packed_split``. We **split them back per
linear**: every tensor of MatMulNBits leads with the output axis, so member ``i`` is rows
``[Σ N_<i, Σ N_≤i)`` of each, bit for bit its own codes, scales and zero points. Reporting per linear
keeps one name space for every artifact (a packed cpu build, an unpacked QDQ mobile build and a
float graph all report ``model.layers.0.self_attn.q_proj``), so their weights can be compared and
a scale drift pinned to the linear that moved; the packing itself is reported as the ``packed``
field (a layout change). Member names come from the manifest's ``fusions.packed_matmul_nbits``
(the packed nodes' names, in order); without a manifest, a three-way ``self_attn`` pack is named
``q_proj, k_proj, v_proj`` and a two-way ``mlp`` pack ``gate_proj, up_proj`` (the graph order the
pass packs them in), anything else ``<scope>.packed.<i>``. Widths come from the Split outputs'
static shapes, else from the split initializer. The builder's ``qkv_proj`` feeding
``GroupQueryAttention`` is split the same way by its ``num_heads`` / ``kv_num_heads``.

**Dequantization** follows ONNX Runtime's definitions exactly (checked against ONNX Runtime in
``tests/diff/test_linears.py``): :func:`dequantize_matmul_nbits`, :func:`dequantize_linear`,
:func:`dequantize_gather_block_quantized`. A static LLM.int8 split's float columns
(``Gather_outliers`` → ``MatMul_outliers`` → ``Add_outliers``) are added into the dequantized
weight: the weights compared are the ones the linear multiplies by.

**Memory.** One linear at a time: its tensors are read (``GraphSide.read``), compared, dropped; the
dequantized weights are produced and compared in chunks of output rows, so the peak is one
linear's stored tensors on each side plus a few MiB, never a side's weights. A packed group's
three tensors are kept while its members are compared. "Unchanged" means byte-identical stored
tensors (the member's rows for a packed linear) and an identical scheme; equal digests
(``GraphSide.digest``, already computed or from a golden description) short-cut the reading.

**Per side** (``"a"`` / ``"b"`` of an entry): ``format``; ``bits`` (stored width: MatMulNBits'
``bits``, a QDQ code type's width, so 4-bit codes in ``qdq8``'s uint8 read 8 while ``plan`` says 4);
``block_size``; ``granularity`` (``blocked`` / ``per_channel`` / ``per_tensor``); ``symmetric`` (every
zero point, stored or default, at the midpoint: ``2^(bits−1)`` unsigned, 0 signed); ``accuracy_level``;
``dtype`` (storage type); ``k`` / ``n``; ``packed`` (+ ``packed_with``, ``rows``); ``activations``
(the ``ActivationQuant`` quantizer in front: ``static`` when its scale is a constant, ``dynamic``
when computed per token, None without one); ``outlier_mode`` / ``outlier_channels`` (LLM.int8:
static channel list from the ``Gather_outliers`` indices, None for a dynamic split); ``plan`` /
``input_transform`` (the manifest's ``quantization.linears`` entry); ``node`` and ``initializers``
(informational, never a change). ``changes`` lists every scheme field that differs
(``"bits 4 -> 8"``) and, within one format, which stored tensors differ (``"scales changed"``).

**Serialisation.** Everything returned is plain JSON; an infinite SQNR (identical weights) or
relative change is the string ``"inf"`` (JSON has no infinity, and ``null`` means "not compared").
A golden-description side has no weights: formats, schemes and digest equality only.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from aqexport.diff.side import GraphSide

__all__ = [
    "compare_linears",
    "dequantize_gather_block_quantized",
    "dequantize_linear",
    "dequantize_matmul_nbits",
    "unpack_bits",
    "unpack_codes",
]

MS_DOMAIN = "com.microsoft"
CHUNK_ELEMENTS = 1 << 18  # dequantized elements per side per step: 1 MiB of float32
INF = "inf"

_WEIGHT_NAME = re.compile(r"(?P<builder>\.MatMul)?\.weight(_Q\d+|_folded)?(_\d+)?$")
_PACKED_NAME = re.compile(r"\.packed_weight(_\d+)?$")
_FOLDED_NORM = re.compile(r"^(?P<norm>.+)\.(?P<kind>weight|bias)_folded(_\d+)?$")
_FOUR_BIT = (ir.DataType.INT4, ir.DataType.UINT4)
_SIGNED = (ir.DataType.INT4, ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32)
_CONVENTIONAL_PACKS = {("self_attn", 3): ("q_proj", "k_proj", "v_proj"), ("mlp", 2): ("gate_proj", "up_proj")}
_SCHEME_KEYS = (
    "format",
    "bits",
    "block_size",
    "granularity",
    "symmetric",
    "accuracy_level",
    "dtype",
    "k",
    "n",
    "packed",
    "activations",
    "outlier_mode",
    "plan",
    "input_transform",
)


# --------------------------------------------------------------------------------------------
# Dequantizers: numpy mirrors of ONNX Runtime's kernels (tests compare them with ORT itself)
# --------------------------------------------------------------------------------------------


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 ``[..., bytes]`` → uint8 ``[..., count]``: ``8 // bits`` codes per byte, the lowest
    bits first (element ``2i`` in the low nibble at 4 bits), as every ORT blocked kernel packs."""
    if bits not in (2, 4, 8):
        raise ValueError(f"{bits}-bit codes are not packed whole into bytes")
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :count]
    per_byte = 8 // bits
    codes = np.empty((*packed.shape[:-1], packed.shape[-1] * per_byte), dtype=np.uint8)
    for position in range(per_byte):  # strided writes: no [..., bytes, per_byte] temporary
        codes[..., position::per_byte] = (packed >> (position * bits)) & ((1 << bits) - 1)
    return codes[..., :count]


def unpack_codes(array: np.ndarray, dtype: ir.DataType | None, shape: tuple[int, ...]) -> np.ndarray:
    """An integer tensor as one value per element, whichever way it was read: ONNX int4/uint4
    arrive packed two per byte over the flattened tensor (``GraphSide.read`` of external data)
    or as ``ml_dtypes`` int4 (in-memory tensors); int4 is sign-extended."""
    if dtype in _FOUR_BIT and array.dtype == np.uint8:
        count = int(np.prod(shape, dtype=np.int64))
        codes = unpack_bits(array.reshape(-1), 4, count)
        if dtype == ir.DataType.INT4:
            return (codes.astype(np.int8) << 4 >> 4).reshape(shape)
        return codes.reshape(shape)
    if dtype in _FOUR_BIT:
        return array.astype(np.int8 if dtype == ir.DataType.INT4 else np.uint8).reshape(shape)
    return array.reshape(shape)


def _scaled(integers: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``integers · scale`` in the scale's float type, returned as float32 (ORT's output type is
    the scale's; float16 results are rounded there)."""
    result = integers.astype(np.float32) * scale.astype(np.float32)
    return _rounded_like(result, scale)


def _rounded_like(result: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if scale.dtype == np.float16:
        return result.astype(np.float16).astype(np.float32)
    return result


def _block_codes(b: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits codes ``[N, blocks, blob]`` → float32 ``[N, blocks, block_size]`` (exact:
    codes are small integers), unpacked straight into floats."""
    if bits == 8:
        return b.astype(np.float32)
    if bits == 4:
        codes = np.empty((*b.shape[:-1], b.shape[-1] * 2), dtype=np.float32)
        codes[..., 0::2] = b & 0x0F
        codes[..., 1::2] = b >> 4
        return codes
    return unpack_bits(b, bits, b.shape[-1] * (8 // bits)).astype(np.float32)


def dequantize_matmul_nbits(
    b: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    k: int,
    bits: int,
    block_size: int,
    g_idx: np.ndarray | None = None,
) -> np.ndarray:
    """``com.microsoft.MatMulNBits``'s ``B`` as float32 ``[N, K]``: ``B`` ``[N, blocks, blob]``
    (codes packed low bits first), ``scales`` ``[N, blocks]``, ``zero_points`` packed uint8
    ``[N, ceil(blocks·bits/8)]`` or float ``[N, blocks]``, default ``2^(bits−1)``; the block of
    column ``k`` is ``k // block_size`` or ``g_idx[k]``. ``W = (q − z) · s``."""
    n = b.shape[0]
    blocks = -(-k // block_size)
    scales = scales.reshape(n, blocks)
    if zero_points is None:
        zero = np.full((n, blocks), 1 << (bits - 1), dtype=np.float32)
    elif np.issubdtype(zero_points.dtype, np.floating):
        zero = zero_points.reshape(n, blocks).astype(np.float32)
    else:
        zero = unpack_bits(zero_points.reshape(n, -1), bits, blocks).astype(np.float32)
    codes = _block_codes(b.reshape(n, blocks, -1), bits)
    if g_idx is not None:  # act-order: each column names its block
        index = np.asarray(g_idx, dtype=np.int64).reshape(-1)
        codes = codes.reshape(n, -1)[:, :k]
        return _rounded_like((codes - zero[:, index]) * scales[:, index].astype(np.float32), scales)
    codes -= zero[..., None]
    codes *= scales.astype(np.float32)[..., None]
    return _rounded_like(codes, scales).reshape(n, -1)[:, :k]


def _expand(parameter: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """A DequantizeLinear scale or zero point broadcast to the input's shape: per tensor
    (one element), per axis (1-D along ``axis``) or blocked (same rank, ``block_size`` along ``axis``)."""
    if parameter.size == 1 and block_size == 0:
        return parameter.reshape(())
    axis = axis % len(shape)
    if block_size == 0:
        view = [1] * len(shape)
        view[axis] = -1
        return parameter.reshape(view)
    repeated = np.repeat(parameter, block_size, axis=axis)
    return repeated if repeated.shape[axis] == shape[axis] else np.take(repeated, np.arange(shape[axis]), axis=axis)


def dequantize_linear(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, *, axis: int = 1, block_size: int = 0
) -> np.ndarray:
    """ONNX ``DequantizeLinear`` (opset 21) on integer codes: ``y = (x − zero_point) · scale``,
    per tensor, per axis or blocked along ``axis``; float32 out (the scale's type's rounding)."""
    x = np.asarray(x)
    scale = np.asarray(scale)
    s = _expand(scale, x.shape, axis, block_size)
    if x.dtype.itemsize > 2:  # int32 codes: subtract exactly in integers
        z = 0 if zero_point is None else _expand(np.asarray(zero_point), x.shape, axis, block_size).astype(np.int64)
        return _scaled(x.astype(np.int64) - z, s)
    y = x.astype(np.float32)  # 8/16-bit codes and their differences are exact in float32
    if zero_point is not None:
        y -= _expand(np.asarray(zero_point), x.shape, axis, block_size).astype(np.float32)
    y *= s.astype(np.float32)
    return _rounded_like(y, scale)


def dequantize_gather_block_quantized(
    data: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    *,
    bits: int,
    block_size: int,
    quantize_axis: int,
    data_type: ir.DataType = ir.DataType.UINT8,
) -> np.ndarray:
    """``com.microsoft.GatherBlockQuantized``'s whole table as float32. uint8 ``data`` follows
    MatMulNBits' storage: codes packed along the last axis, zero points packed the same way,
    default ``2^(bits−1)``; int4/uint4 ``data`` (unpacked by :func:`unpack_codes`) defaults to 0."""
    if data_type == ir.DataType.UINT8:
        per_byte = 8 // bits
        codes = unpack_bits(data, bits, data.shape[-1] * per_byte)
        if zero_points is None:
            zero = np.full(scales.shape, 1 << (bits - 1), dtype=np.int16)
        else:
            zero = unpack_bits(zero_points, bits, scales.shape[-1]).reshape(scales.shape)
    else:
        codes, zero = data, zero_points
    return dequantize_linear(codes, scales, zero, axis=quantize_axis, block_size=block_size)


# --------------------------------------------------------------------------------------------
# What one side holds: its linears and embeddings, found in the graph
# --------------------------------------------------------------------------------------------


@dataclass
class Linear:
    """One linear (or embedding table) of one side: where its tensors are and how they are read.

    ``tensors`` by role (``weight``: codes or float weight; ``scales``; ``zero_points``;
    ``g_idx``). ``rows`` is the member's slice of a packed MatMulNBits' output axis."""

    name: str
    format: str
    node: ir.Node
    tensors: dict[str, ir.Value]
    k: int | None
    n: int | None
    attrs: dict[str, Any] = field(default_factory=dict)
    rows: tuple[int, int] | None = None
    packed_with: list[str] | None = None
    outlier_channels: ir.Value | None = None
    outlier_weight: ir.Value | None = None
    outlier_mode: str | None = None
    activations: str | None = None
    tied_to: str | None = None


@dataclass
class _Inventory:
    linears: OrderedDict[str, Linear]
    embeddings: OrderedDict[str, Linear]


def _shape(value: ir.Value) -> tuple[int | None, ...] | None:
    shape = value.shape if value.shape is not None else getattr(value.const_value, "shape", None)
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


def _dtype(value: ir.Value) -> ir.DataType | None:
    if value.dtype is not None:
        return value.dtype
    tensor = value.const_value
    return tensor.dtype if tensor is not None else None


def _is_constant(side: GraphSide, value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None or (value.name or "") in side.initializers:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _initializer(side: GraphSide, value: ir.Value | None) -> ir.Value | None:
    """``value`` when it is an initializer this side can read or digest."""
    if value is None or not value.name or side.initializers.get(value.name) is not value:
        return None
    return value


def _path_from_node(name: str | None) -> str | None:
    """``/model/layers.0/self_attn/q_proj/MatMulNBits`` → ``model.layers.0.self_attn.q_proj``."""
    if not name or not name.startswith("/"):
        return None
    parts = name.strip("/").split("/")[:-1]
    return ".".join(parts) or None


def _path_from_weight(name: str | None) -> str | None:
    """The module path in a weight's initializer name (ours or the genai builder's)."""
    match = _WEIGHT_NAME.search(name or "")
    if match is None or match.start() == 0:
        return None
    path = name[: match.start()]
    if match.group("builder"):
        path = re.sub(r"(^|\.)attn\.", r"\1self_attn.", path)
    return path


def _linear_name(weight: ir.Value, node: ir.Node) -> str:
    return _path_from_weight(weight.name) or _path_from_node(node.name) or weight.name or node.name or "?"


def _inventory(side: GraphSide) -> _Inventory:
    """Every linear and embedding of the side, in graph order."""
    linears: OrderedDict[str, Linear] = OrderedDict()
    embeddings: OrderedDict[str, Linear] = OrderedDict()
    for node in ir.traversal.RecursiveGraphIterator(side.model.graph):
        for found in _linears_at(side, node):
            linears.setdefault(found.name, found)
        embedding = _embedding_at(side, node)
        if embedding is not None:
            embeddings.setdefault(embedding.name, embedding)
    _mark_tied(linears, embeddings)
    return _Inventory(linears, embeddings)


def _linears_at(side: GraphSide, node: ir.Node) -> list[Linear]:
    if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
        return _matmul_nbits(side, node)
    if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
        found = _qdq_or_float(side, node)
        return [] if found is None else [found]
    return []


def _annotate(side: GraphSide, linear: Linear, x: ir.Value | None, output: ir.Value) -> Linear:
    """Outlier split and activation quantizer around the linear (input ``x``, output ``output``)."""
    linear.activations, linear.outlier_mode = _activations(side, x)
    linear.outlier_channels, linear.outlier_weight = _outlier_columns(side, output)
    if linear.outlier_channels is not None and linear.outlier_mode is None:
        linear.outlier_mode = "static"
    return linear


def _matmul_nbits(side: GraphSide, node: ir.Node) -> list[Linear]:
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    weight = _initializer(side, inputs[1])
    if weight is None or _initializer(side, inputs[2]) is None:
        return []
    tensors = {"weight": weight, "scales": inputs[2]}
    for role, value in (("zero_points", inputs[3]), ("g_idx", inputs[4])):
        if _initializer(side, value) is not None:
            tensors[role] = value
    attrs = {
        "bits": node.attributes.get_int("bits", 4),
        "block_size": node.attributes.get_int("block_size", 0),
        "accuracy_level": node.attributes.get_int("accuracy_level", 0),
    }
    k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
    members = _packed_members(side, node, weight, n)
    if members is None:
        linear = Linear(_linear_name(weight, node), "matmul_nbits", node, tensors, k, n, attrs)
        return [_annotate(side, linear, node.inputs[0], node.outputs[0])]
    names = [name for name, _, _ in members]
    found = []
    for name, (start, stop), output in members:
        linear = Linear(name, "matmul_nbits", node, tensors, k, stop - start, attrs, (start, stop), names)
        found.append(_annotate(side, linear, node.inputs[0], output))
    return found


def _packed_members(
    side: GraphSide, node: ir.Node, weight: ir.Value, n: int
) -> list[tuple[str, tuple[int, int], ir.Value]] | None:
    """``(name, rows, output)`` per linear packed into this MatMulNBits, or None if it is one linear."""
    consumers = list(node.outputs[0].consumers())
    if len(consumers) != 1:
        return None
    consumer = consumers[0]
    if consumer.op_type == "Split" and (_PACKED_NAME.search(weight.name or "") or "/packed/" in (node.name or "")):
        widths = _split_widths(side, consumer)
        if widths is None or sum(widths) != n:
            return None
        names = _packed_names(side, node, weight, len(widths))
        return _rows(names, widths, list(consumer.outputs))
    if consumer.op_type == "GroupQueryAttention" and _builder_qkv(consumer, node):
        widths = _qkv_widths(consumer, n)
        base = _linear_name(weight, node)
        if widths is None or not base.endswith("qkv_proj"):
            return None
        names = [base[: -len("qkv_proj")] + part for part in ("q_proj", "k_proj", "v_proj")]
        return _rows(names, widths, [node.outputs[0]] * 3)
    return None


def _rows(names: list[str], widths: list[int], outputs: list[ir.Value]):
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(int).tolist()
    return [(name, (offsets[i], offsets[i + 1]), outputs[i]) for i, name in enumerate(names)]


def _split_widths(side: GraphSide, split: ir.Node) -> list[int] | None:
    """The Split's output widths: the outputs' static last dimensions, else its split input."""
    dims = [(_shape(out) or (None,))[-1] for out in split.outputs]
    if all(isinstance(d, int) for d in dims):
        return [int(d) for d in dims]
    sizes = _initializer(side, split.inputs[1] if len(split.inputs) > 1 else None)
    if sizes is None or (side.is_description and isinstance(sizes.const_value, ir.ExternalTensor)):
        return None  # a description stores small integer initializers such as these by value
    return [int(v) for v in side.read(sizes).reshape(-1)]


def _packed_names(side: GraphSide, node: ir.Node, weight: ir.Value, count: int) -> list[str]:
    """Member module paths: the manifest's packed groups, else the Llama-family convention."""
    base = (node.name or "").rsplit("/", 2)[0]
    groups = ((side.manifest or {}).get("fusions") or {}).get("packed_matmul_nbits") or []
    for group in groups:
        if len(group) == count and base and all(name.startswith(base + "/") for name in group):
            names = [_path_from_node(name) for name in group]
            if all(names):
                return names
    stem = _PACKED_NAME.split(weight.name or "")[0] if _PACKED_NAME.search(weight.name or "") else None
    stem = stem or _path_from_node(base + "/x") or "packed"
    conventional = _CONVENTIONAL_PACKS.get((stem.rsplit(".", 1)[-1], count))
    if conventional:
        return [f"{stem}.{part}" for part in conventional]
    return [f"{stem}.packed.{i}" for i in range(count)]


def _builder_qkv(gqa: ir.Node, node: ir.Node) -> bool:
    """The genai builder's packed q/k/v: the MatMulNBits output is GQA's query, key/value empty."""
    inputs = list(gqa.inputs) + [None] * 3
    return inputs[0] is node.outputs[0] and inputs[1] is None and inputs[2] is None


def _qkv_widths(gqa: ir.Node, n: int) -> list[int] | None:
    heads, kv_heads = gqa.attributes.get_int("num_heads", 0), gqa.attributes.get_int("kv_num_heads", 0)
    total = heads + 2 * kv_heads
    if heads <= 0 or kv_heads <= 0 or n % total:
        return None
    head = n // total
    return [heads * head, kv_heads * head, kv_heads * head]


def _qdq_or_float(side: GraphSide, node: ir.Node) -> Linear | None:
    """A MatMul/Gemm whose weight is ``DequantizeLinear(codes)`` or a float ``….weight`` initializer."""
    if "/AffineInverse/" in (node.name or "") or (node.name or "").endswith("_outliers"):
        return None
    b = node.inputs[1]
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
    out_axis = 0 if transposed else 1
    producer = b.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        linear = _qdq(side, producer, node, out_axis)
    else:
        weight = _initializer(side, b)
        dtype = _dtype(b) if weight is not None else None
        if weight is None or dtype is None or not dtype.is_floating_point() or _path_from_weight(b.name) is None:
            return None
        shape = _shape(weight) or (None, None)
        if len(shape) != 2:
            return None
        k, n = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        linear = Linear(_linear_name(weight, node), "float", node, {"weight": weight}, k, n, {"out_axis": out_axis})
        linear.attrs["dtype"] = dtype.name.lower()
    if linear is None:
        return None
    return _annotate(side, linear, node.inputs[0], node.outputs[0])


def _qdq_attrs(side: GraphSide, dq: ir.Node, out_axis: int) -> dict[str, Any] | None:
    codes = _initializer(side, dq.inputs[0])
    scale = dq.inputs[1] if len(dq.inputs) > 1 else None
    if codes is None or _initializer(side, scale) is None:
        return None
    dtype = _dtype(codes)
    block = dq.attributes.get_int("block_size", 0)
    scale_shape = _shape(scale) or ()
    per_tensor = int(np.prod([d or 1 for d in scale_shape])) == 1 and block == 0
    return {
        "bits": dtype.bitwidth if dtype is not None else None,
        "signed": dtype in _SIGNED,
        "code_type": dtype,
        "axis": dq.attributes.get_int("axis", 1),
        "block_size": block or None,
        "granularity": "per_tensor" if per_tensor else ("blocked" if block else "per_channel"),
        "out_axis": out_axis,
    }


def _qdq(side: GraphSide, dq: ir.Node, node: ir.Node, out_axis: int) -> Linear | None:
    attrs = _qdq_attrs(side, dq, out_axis)
    if attrs is None:
        return None
    codes = dq.inputs[0]
    tensors = {"weight": codes, "scales": dq.inputs[1]}
    if len(dq.inputs) > 2 and _initializer(side, dq.inputs[2]) is not None:
        tensors["zero_points"] = dq.inputs[2]
    shape = _shape(codes) or (None, None)
    if len(shape) != 2:
        return None
    k, n = (shape[1], shape[0]) if out_axis == 0 else (shape[0], shape[1])
    return Linear(_linear_name(codes, dq), "qdq", node, tensors, k, n, attrs)


def _embedding_at(side: GraphSide, node: ir.Node) -> Linear | None:
    """A table lookup: ``GatherBlockQuantized``, or ``Gather(axis 0)`` of a float or
    ``DequantizeLinear`` table named ``….weight``. Named after the node (tables may be tied)."""
    if node.op_type == "GatherBlockQuantized" and node.domain == MS_DOMAIN:
        return _gather_block_quantized(side, node)
    if node.op_type != "Gather" or node.attributes.get_int("axis", 0) != 0 or node.inputs[0] is None:
        return None
    table = node.inputs[0]
    producer = table.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        linear = _qdq(side, producer, node, 0)
        if linear is not None:
            linear.name = _path_from_node(node.name) or linear.name
        return linear
    weight = _initializer(side, table)
    dtype = _dtype(table) if weight is not None else None
    shape = _shape(table) if weight is not None else None
    if dtype is None or not dtype.is_floating_point() or shape is None or len(shape) != 2:
        return None
    if _path_from_weight(table.name) is None:
        return None
    name = _path_from_node(node.name) or _path_from_weight(table.name)
    linear = Linear(name, "float", node, {"weight": weight}, shape[1], shape[0], {"out_axis": 0})
    linear.attrs["dtype"] = dtype.name.lower()
    return linear


def _through_reshape(side: GraphSide, value: ir.Value | None) -> ir.Value | None:
    """The initializer behind ``value``, looking through one Reshape (the builder's tied table)."""
    if _initializer(side, value) is not None:
        return value
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Reshape":
        return _initializer(side, producer.inputs[0])
    return None


def _gather_block_quantized(side: GraphSide, node: ir.Node) -> Linear | None:
    inputs = list(node.inputs) + [None] * 4
    data = _through_reshape(side, inputs[0])
    if data is None or _initializer(side, inputs[2]) is None:
        return None
    tensors = {"weight": data, "scales": inputs[2]}
    if _initializer(side, inputs[3]) is not None:
        tensors["zero_points"] = inputs[3]
    dtype = _dtype(data)
    data_shape = _shape(inputs[0]) or _shape(data) or ()
    bits = node.attributes.get_int("bits", 4)
    rows = data_shape[0] if data_shape else None
    cols = None
    if len(data_shape) == 2 and data_shape[1] is not None:
        cols = data_shape[1] * (8 // bits) if dtype == ir.DataType.UINT8 else data_shape[1]
    attrs = {
        "bits": bits if dtype == ir.DataType.UINT8 else (dtype.bitwidth if dtype is not None else None),
        "block_size": node.attributes.get_int("block_size", 128),
        "quantize_axis": node.attributes.get_int("quantize_axis", 1),
        "gather_axis": node.attributes.get_int("gather_axis", 0),
        "code_type": dtype,
        "table_shape": data_shape,
    }
    name = _path_from_node(node.name) or _path_from_weight(data.name) or data.name
    return Linear(name, "gather_block_quantized", node, tensors, cols, rows, attrs)


def _mark_tied(linears: OrderedDict[str, Linear], embeddings: OrderedDict[str, Linear]) -> None:
    """An embedding that reads a linear's stored weight (the builder ties the LM head)."""
    by_weight = {id(linear.tensors["weight"]): name for name, linear in linears.items()}
    for embedding in embeddings.values():
        embedding.tied_to = by_weight.get(id(embedding.tensors["weight"]))


def _activations(side: GraphSide, x: ir.Value | None) -> tuple[str | None, str | None]:
    """``(activations, outlier_mode)`` of the quantizer ``ActivationQuantPass`` put before a
    linear: static when its scale is a constant, dynamic when computed per token; an LLM.int8
    ``Where_outliers`` is static when its channel mask is a constant."""
    producer = x.producer() if x is not None else None
    if producer is None or "/ActivationQuant/" not in (producer.name or ""):
        return None, None
    outlier_mode = None
    if producer.op_type == "Where":
        outlier_mode = "static" if _is_constant(side, producer.inputs[0]) else "dynamic"
        branch = producer.inputs[2] if len(producer.inputs) > 2 else None
        producer = branch.producer() if branch is not None else None
        if producer is None:
            return None, outlier_mode
    scale = producer.inputs[1] if producer.op_type in ("DequantizeLinear", "Mul") and len(producer.inputs) > 1 else None
    return ("static" if _is_constant(side, scale) else "dynamic"), outlier_mode


def _outlier_columns(side: GraphSide, output: ir.Value) -> tuple[ir.Value | None, ir.Value | None]:
    """``(channels, float columns)`` of a static LLM.int8 split: ``Add_outliers(out,
    MatMul_outliers(Gather_outliers(x, channels), W_O))`` after the linear."""
    for consumer in output.consumers():
        if consumer.op_type != "Add" or not (consumer.name or "").endswith("Add_outliers"):
            continue
        other = consumer.inputs[1] if consumer.inputs[0] is output else consumer.inputs[0]
        matmul = other.producer() if other is not None else None
        if matmul is None or matmul.op_type != "MatMul":
            continue
        gather = matmul.inputs[0].producer() if matmul.inputs[0] is not None else None
        if gather is None or gather.op_type != "Gather":
            continue
        channels, weight = _initializer(side, gather.inputs[1]), _initializer(side, matmul.inputs[1])
        if channels is not None and weight is not None:
            return channels, weight
    return None, None


# --------------------------------------------------------------------------------------------
# Reading one linear's tensors (once), and dequantizing it in chunks of output rows
# --------------------------------------------------------------------------------------------


class _SideReader:
    """Reads one side's tensors; keeps a packed group's few tensors while its members are compared."""

    def __init__(self, side: GraphSide) -> None:
        self.side = side
        self._kept: OrderedDict[str, np.ndarray] = OrderedDict()

    def read(self, value: ir.Value, keep: bool) -> np.ndarray:
        name = value.name or ""
        if name in self._kept:
            return self._kept[name]
        array = self.side.read(value)
        array = unpack_codes(array, _dtype(value), tuple(_shape(value) or array.shape))
        if keep:
            self._kept[name] = array
            while len(self._kept) > 4:
                self._kept.popitem(last=False)
        return array


class _Arrays:
    """One linear's stored tensors on one side, read on first use; a packed member's rows only."""

    def __init__(self, linear: Linear, reader: _SideReader | None) -> None:
        self.linear = linear
        self.reader = reader
        self._cache: dict[str, np.ndarray | None] = {}

    @property
    def readable(self) -> bool:
        return self.reader is not None

    def get(self, role: str) -> np.ndarray | None:
        if role not in self._cache:
            self._cache[role] = self._load(role)
        return self._cache[role]

    def _load(self, role: str) -> np.ndarray | None:
        linear = self.linear
        value = {"outlier_channels": linear.outlier_channels, "outlier_weight": linear.outlier_weight}.get(
            role, linear.tensors.get(role)
        )
        if value is None or self.reader is None:
            return None
        array = self.reader.read(value, keep=linear.rows is not None)
        if linear.rows is not None and role in ("weight", "scales", "zero_points"):
            total = linear.node.attributes.get_int("N", 0)
            start, stop = linear.rows
            rows = array if array.ndim > 1 and array.shape[0] == total else array.reshape(total, -1)
            array = rows[start:stop]  # the stored layout, so members compare with unpacked linears
        return array


def _table_codes(linear: Linear, arrays: _Arrays) -> np.ndarray:
    """A GatherBlockQuantized table as stored, in its node's shape (the builder reshapes a tied head)."""
    data = arrays.get("weight")
    shape = linear.attrs.get("table_shape")
    if shape and all(isinstance(d, int) for d in shape) and data.size == int(np.prod(shape)):
        return data.reshape(shape)
    return data.reshape(linear.n, -1)


def _dequantize_rows(linear: Linear, arrays: _Arrays, start: int, stop: int) -> np.ndarray:
    """Output rows ``[start, stop)`` of the weight the linear multiplies by, float32 ``[rows, K]``."""
    a = linear.attrs
    if linear.format == "matmul_nbits":
        zero = arrays.get("zero_points")
        weight = dequantize_matmul_nbits(
            arrays.get("weight")[start:stop],
            arrays.get("scales").reshape(linear.n, -1)[start:stop],
            None if zero is None else zero.reshape(linear.n, -1)[start:stop],
            k=linear.k,
            bits=a["bits"],
            block_size=a["block_size"],
            g_idx=arrays.get("g_idx"),
        )
    elif linear.format == "gather_block_quantized":
        weight = _gbq_rows(linear, arrays, start, stop)
    elif linear.format == "qdq":
        weight = _qdq_rows(linear, arrays, start, stop)
    else:
        part = np.take(arrays.get("weight"), np.arange(start, stop), axis=a["out_axis"])
        weight = np.moveaxis(part, a["out_axis"], 0).astype(np.float32)
    return _with_outliers(weight, arrays, start, stop)


def _gbq_rows(linear: Linear, arrays: _Arrays, start: int, stop: int) -> np.ndarray:
    a = linear.attrs
    zero = arrays.get("zero_points")
    data, scales = _table_codes(linear, arrays), arrays.get("scales")
    rows = slice(start, stop) if _alignment(linear) else slice(None)  # else: one chunk, all rows
    return dequantize_gather_block_quantized(
        data[rows],
        scales[rows],
        None if zero is None else zero[rows],
        bits=a["bits"],
        block_size=a["block_size"],
        quantize_axis=a["quantize_axis"],
        data_type=a["code_type"],
    )


def _qdq_rows(linear: Linear, arrays: _Arrays, start: int, stop: int) -> np.ndarray:
    """DequantizeLinear on the output columns ``[start, stop)``: codes sliced along the output
    axis, and the scale / zero point with them where they vary along it."""
    a = linear.attrs
    out_axis, axis, block = a["out_axis"], a["axis"] % 2, a["block_size"] or 0
    codes = np.take(arrays.get("weight"), np.arange(start, stop), axis=out_axis)

    def part(parameter: np.ndarray | None) -> np.ndarray | None:
        if parameter is None or parameter.size == 1:
            return parameter
        if parameter.ndim == 1:
            return parameter[start:stop] if axis == out_axis else parameter
        if axis == out_axis:  # blocked along the output axis: chunks are block-aligned
            return np.take(parameter, np.arange(start // block, -(-stop // block)), axis=out_axis)
        return np.take(parameter, np.arange(start, stop), axis=out_axis)

    scales, zero = part(arrays.get("scales")), part(arrays.get("zero_points"))
    weight = dequantize_linear(codes, scales, zero, axis=axis, block_size=block)
    return np.moveaxis(weight, out_axis, 0)


def _with_outliers(weight: np.ndarray, arrays: _Arrays, start: int, stop: int) -> np.ndarray:
    """Add a static LLM.int8 split's float columns ``W_O`` (``[|O|, N]``) at input channels ``O``."""
    channels, columns = arrays.get("outlier_channels"), arrays.get("outlier_weight")
    if channels is None or columns is None:
        return weight
    channels = channels.reshape(-1).astype(np.int64)
    weight[:, channels] += columns.reshape(len(channels), -1)[:, start:stop].T.astype(np.float32)
    return weight


def _alignment(linear: Linear) -> int | None:
    """Row multiple a chunk must start at (blocks that run along the output axis); None: the
    whole weight in one piece (a table quantized along its rows)."""
    a = linear.attrs
    if linear.format == "qdq" and a["block_size"] and a["axis"] % 2 == a["out_axis"]:
        return a["block_size"]
    if linear.format == "gather_block_quantized" and a["quantize_axis"] % 2 == 0:
        return None
    return 1


def _chunks(*linears: Linear) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``CHUNK_ELEMENTS`` dequantized values, aligned for every side."""
    n, k = linears[0].n, max(linears[0].k or 1, 1)
    aligns = [_alignment(linear) for linear in linears]
    if None in aligns:
        yield 0, n
        return
    align = math.lcm(*aligns)
    step = max(align, (CHUNK_ELEMENTS // k) // align * align)
    for start in range(0, n, step):
        yield start, min(start + step, n)


# --------------------------------------------------------------------------------------------
# Schemes, equality and drift
# --------------------------------------------------------------------------------------------


def _zero_points(linear: Linear, arrays: _Arrays) -> np.ndarray | None:
    """Zero points unpacked to the scales' shape, defaults filled in; None if not readable."""
    scales = arrays.get("scales")
    if scales is None:
        return None
    zero = arrays.get("zero_points")
    a = linear.attrs
    if linear.format == "matmul_nbits":
        scales = scales.reshape(linear.n, -1)
        if zero is None:
            return np.full(scales.shape, 1 << (a["bits"] - 1), dtype=np.int32)
        if np.issubdtype(zero.dtype, np.floating):
            return zero.reshape(scales.shape)
        return unpack_bits(zero.reshape(linear.n, -1), a["bits"], scales.shape[1]).astype(np.int32)
    if linear.format == "gather_block_quantized" and a["code_type"] == ir.DataType.UINT8:
        if zero is None:
            return np.full(scales.shape, 1 << (a["bits"] - 1), dtype=np.int32)
        return unpack_bits(zero, a["bits"], scales.shape[-1]).reshape(scales.shape).astype(np.int32)
    if zero is None:
        return np.zeros(scales.shape, dtype=np.int32)
    return zero.reshape(scales.shape).astype(np.int32)


def _midpoint(linear: Linear) -> int:
    """The zero point of symmetric codes: ``2^(bits−1)`` for unsigned storage, 0 for signed."""
    a = linear.attrs
    if linear.format == "qdq":
        return 0 if a["signed"] else 1 << (a["bits"] - 1)
    if linear.format == "gather_block_quantized" and a["code_type"] != ir.DataType.UINT8:
        return 0 if a["code_type"] == ir.DataType.INT4 else 1 << (a["bits"] - 1)
    return 1 << (a["bits"] - 1)


def _default_zero(linear: Linear) -> int:
    """The zero point a format assumes when none is stored."""
    a = linear.attrs
    if linear.format == "matmul_nbits":
        return 1 << (a["bits"] - 1)
    if linear.format == "gather_block_quantized" and a["code_type"] == ir.DataType.UINT8:
        return 1 << (a["bits"] - 1)
    return 0


def _symmetric(linear: Linear, arrays: _Arrays) -> bool | None:
    """Zero points all equal to the midpoint of the code range (absent ones: the default)."""
    if linear.format == "float":
        return None
    if "zero_points" not in linear.tensors:
        return _default_zero(linear) == _midpoint(linear)
    if not arrays.readable:
        return None
    return bool(np.all(_zero_points(linear, arrays) == _midpoint(linear)))


def _outlier_list(arrays: _Arrays) -> list[int] | None:
    channels = arrays.get("outlier_channels")
    return None if channels is None else sorted(int(c) for c in channels.reshape(-1))


def _plan(side: GraphSide, name: str) -> dict[str, Any]:
    linears = ((side.manifest or {}).get("quantization") or {}).get("linears") or {}
    return linears.get(name) or {}


def _storage_type(linear: Linear) -> str | None:
    """The element type the codes are stored in (``uint8`` for MatMulNBits' packed blobs)."""
    dtype = linear.attrs.get("code_type") or _dtype(linear.tensors["weight"])
    return dtype.name.lower() if dtype is not None else None


def _scheme(side: GraphSide, linear: Linear, arrays: _Arrays) -> dict[str, Any]:
    """What the report shows for one side of one linear (plain JSON)."""
    a = linear.attrs
    plan = _plan(side, linear.name)
    scheme = {
        "format": linear.format,
        "bits": a.get("bits"),
        "block_size": a.get("block_size"),
        "granularity": a.get("granularity", "blocked" if linear.format != "float" else None),
        "symmetric": _symmetric(linear, arrays),
        "accuracy_level": a.get("accuracy_level"),
        "dtype": a.get("dtype") or _storage_type(linear),
        "k": linear.k,
        "n": linear.n,
        "packed": linear.packed_with is not None,
        "activations": linear.activations,
        "outlier_mode": linear.outlier_mode,
        "plan": plan.get("weight"),
        "input_transform": plan.get("input_transform"),
        "outlier_channels": _outlier_list(arrays) if arrays.readable else None,
        "node": linear.node.name,
        "initializers": {role: value.name for role, value in linear.tensors.items()},
    }
    if linear.packed_with is not None:
        scheme["packed_with"] = list(linear.packed_with)
        scheme["rows"] = list(linear.rows)
    if linear.tied_to is not None:
        scheme["tied_to"] = linear.tied_to
    return scheme


def _roles(linear: Linear) -> dict[str, ir.Value]:
    roles = dict(linear.tensors)
    if linear.outlier_channels is not None:
        roles["outlier_channels"] = linear.outlier_channels
        roles["outlier_weight"] = linear.outlier_weight
    return roles


def _data_changes(a: GraphSide, la: Linear, xa: _Arrays, b: GraphSide, lb: Linear, xb: _Arrays) -> list[str]:
    """The roles whose stored tensors differ (``["scales", …]``); [] when byte-identical. Equal
    digests decide without reading; against a description a packed member counts as changed
    when its group's tensor changed (the digest covers the whole group)."""
    roles_a, roles_b = _roles(la), _roles(lb)
    changed = []
    for role in sorted(set(roles_a) | set(roles_b)):
        va, vb = roles_a.get(role), roles_b.get(role)
        if va is None or vb is None:
            changed.append(role)
            continue
        digest_a, digest_b = a.known_digest(va), b.known_digest(vb)
        if digest_a is not None and digest_b is not None and digest_a == digest_b and la.rows == lb.rows:
            continue
        if not (xa.readable and xb.readable):
            if digest_a is None or digest_b is None:  # a description against an artifact
                digest_a, digest_b = a.digest(va), b.digest(vb)
            if digest_a != digest_b or la.rows != lb.rows:
                changed.append(role)
            continue
        if la.rows is None and lb.rows is None and role not in xa._cache and role not in xb._cache:
            if not _streams_equal(a, va, b, vb):  # whole tensors: compared in chunks from the files,
                changed.append(role)  # so an unchanged LM head is never held twice in memory
            continue
        array_a, array_b = xa.get(role), xb.get(role)
        if array_a.dtype != array_b.dtype or array_a.shape != array_b.shape or not np.array_equal(array_a, array_b):
            changed.append(role)
    return changed


def _streams_equal(a: GraphSide, va: ir.Value, b: GraphSide, vb: ir.Value) -> bool:
    if va.dtype != vb.dtype or _shape(va) != _shape(vb):
        return False
    for chunk_a, chunk_b in itertools.zip_longest(a.chunks(va), b.chunks(vb)):
        if chunk_a is None or chunk_b is None or not np.array_equal(chunk_a, chunk_b):
            return False
    return True


def _finite(value: float) -> float | str:
    if math.isinf(value):
        return INF if value > 0 else "-inf"
    return float(value)


def _sum_squares(x: np.ndarray) -> float:
    """Σx² of a float32 ``[rows, K]`` chunk: row sums in float32 (pairwise-exact enough), the
    total in float64; no float64 copy of the chunk."""
    return float(np.einsum("ij,ij->i", x, x).sum(dtype=np.float64))


def _weight_stats(la: Linear, xa: _Arrays, lb: Linear, xb: _Arrays) -> dict[str, Any] | None:
    """Max-abs difference, ‖Δ‖/‖W_a‖ and SQNR (dB, B against A) of the dequantized weights."""
    if la.n != lb.n or la.k != lb.k or la.n is None or la.k is None:
        return None
    power_a = noise = max_abs = 0.0
    for start, stop in _chunks(la, lb):
        wa = _dequantize_rows(la, xa, start, stop)
        delta = np.subtract(_dequantize_rows(lb, xb, start, stop), wa)
        power_a += _sum_squares(wa)
        noise += _sum_squares(delta)
        max_abs = max(max_abs, float(np.abs(delta, out=delta).max(initial=0.0)))
    if noise == 0.0:
        return {"max_abs": 0.0, "rel_error": 0.0, "sqnr_db": INF}
    rel = math.sqrt(noise / power_a) if power_a else math.inf
    sqnr = 10.0 * math.log10(power_a / noise) if power_a else -math.inf
    return {"max_abs": max_abs, "rel_error": _finite(rel), "sqnr_db": _finite(sqnr)}


def _same_layout(sa: dict[str, Any], sb: dict[str, Any], la: Linear, lb: Linear) -> bool:
    keys = ("format", "bits", "block_size", "granularity", "k", "n")
    same_axes = la.attrs.get("axis") == lb.attrs.get("axis") and la.attrs.get("out_axis") == lb.attrs.get("out_axis")
    return all(sa[key] == sb[key] for key in keys) and same_axes and sa["format"] != "float"


def _scale_drift(la: Linear, xa: _Arrays, lb: Linear, xb: _Arrays) -> dict[str, Any] | None:
    """Relative change of every scale (|s_b − s_a| / |s_a|; a zero scale that stays zero counts
    as no change) and the fraction of zero points that changed, under one shared scheme."""
    scales_a, scales_b = xa.get("scales"), xb.get("scales")
    if scales_a is None or scales_b is None or scales_a.size != scales_b.size:
        return None
    sa = scales_a.astype(np.float64).reshape(-1)
    sb = scales_b.astype(np.float64).reshape(-1)
    delta = np.abs(sb - sa)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(sa != 0, delta / np.abs(sa), np.where(delta == 0, 0.0, np.inf))
    za, zb = _zero_points(la, xa), _zero_points(lb, xb)
    zero_changed = float(np.mean(za.reshape(-1) != zb.reshape(-1))) if za.size == zb.size and za.size else 0.0
    return {
        "max_rel_change": _finite(float(rel.max(initial=0.0))),
        "mean_rel_change": _finite(float(rel.mean())) if rel.size else 0.0,
        "zero_points_changed": zero_changed,
    }


def _outlier_delta(sa: dict[str, Any] | None, sb: dict[str, Any] | None) -> dict[str, Any] | None:
    """Channels added / removed between two static splits (no split counts as no channels);
    None where neither side splits, lists None where a dynamic split has no fixed set."""
    modes = (sa or {}).get("outlier_mode"), (sb or {}).get("outlier_mode")
    if modes == (None, None):
        return None
    if "dynamic" in modes or any(
        mode == "static" and side.get("outlier_channels") is None for mode, side in zip(modes, (sa, sb))
    ):  # a dynamic split, or a description side that cannot read its channel set
        return {"added": None, "removed": None}
    set_a = set((sa or {}).get("outlier_channels") or [])
    set_b = set((sb or {}).get("outlier_channels") or [])
    return {"added": sorted(set_b - set_a), "removed": sorted(set_a - set_b)}


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{k}={_show(v)}" for k, v in value.items())
    return str(value)


def _scheme_changes(sa: dict[str, Any], sb: dict[str, Any]) -> list[str]:
    def differs(key: str) -> bool:  # symmetry unknown on a description side is not a change
        return sa[key] != sb[key] and not (key == "symmetric" and None in (sa[key], sb[key]))

    changes = [f"{key} {_show(sa[key])} -> {_show(sb[key])}" for key in _SCHEME_KEYS if differs(key)]
    delta = _outlier_delta(sa, sb)
    if delta and delta["added"] is not None and (delta["added"] or delta["removed"]):
        changes.append(f"outlier channels +{len(delta['added'])} -{len(delta['removed'])}")
    return changes


_ROLE_WORDS = {
    "weight": "codes",
    "scales": "scales",
    "zero_points": "zero points",
    "g_idx": "g_idx",
    "outlier_channels": "outlier channels",
    "outlier_weight": "outlier weights",
}


_Readers = tuple["_SideReader | None", "_SideReader | None"]


def _compare(name: str, a: GraphSide, la: Linear | None, b: GraphSide, lb: Linear | None, readers: _Readers) -> dict:
    """One linear's report entry."""
    xa = _Arrays(la, readers[0]) if la is not None else None
    xb = _Arrays(lb, readers[1]) if lb is not None else None
    sa = _scheme(a, la, xa) if la is not None else None
    sb = _scheme(b, lb, xb) if lb is not None else None
    entry: dict[str, Any] = {"name": name, "status": None, "a": sa, "b": sb, "changes": []}
    entry.update({"weights": None, "scales": None, "outliers": _outlier_delta(sa, sb)})
    if la is None or lb is None:
        entry["status"] = "only_b" if la is None else "only_a"
        return entry
    changes = _scheme_changes(sa, sb)
    data = _data_changes(a, la, xa, b, lb, xb)
    if la.format == lb.format:  # across formats every stored tensor differs: the weights say how much
        word = "weight" if la.format == "float" else "codes"
        changes += [f"{_ROLE_WORDS.get(role, role) if role != 'weight' else word} changed" for role in data]
    entry["changes"] = changes
    entry["status"] = "changed" if changes else "unchanged"
    if not (xa.readable and xb.readable):
        return entry
    if not changes:
        entry["weights"] = {"max_abs": 0.0, "rel_error": 0.0, "sqnr_db": INF}
        return entry
    try:
        entry["weights"] = _weight_stats(la, xa, lb, xb)
        if _same_layout(sa, sb, la, lb):
            entry["scales"] = _scale_drift(la, xa, lb, xb)
    except ValueError as error:  # a layout this module cannot dequantize (e.g. 3-bit MatMulNBits)
        entry["note"] = f"weights not compared: {error}"
    return entry


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _natural(path: str) -> list:
    """Sort key: ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _folded_norms(side: GraphSide) -> dict[str, list[ir.Value]]:
    """Norms whose weight/bias ``FoldAffinePass`` replaced by ``<norm>.weight_folded`` /
    ``.bias_folded`` (a linear's ``.weight_folded``, from ``FloatWeightsPass``, is not a norm)."""
    folded: dict[str, list[ir.Value]] = {}
    for name, value in side.initializers.items():
        match = _FOLDED_NORM.match(name)
        if match is None or any(node.op_type in ("MatMul", "Gemm") and idx == 1 for node, idx in value.uses()):
            continue
        folded.setdefault(match.group("norm"), []).append(value)
    return folded


def _affine_inverse_nodes(side: GraphSide) -> list[str]:
    return [
        node.name
        for node in ir.traversal.RecursiveGraphIterator(side.model.graph)
        if "/AffineInverse/" in (node.name or "")
    ]


def _per_transform(side: GraphSide) -> dict[str, dict[str, Any]]:
    return ((side.report or {}).get("transforms") or {}).get("per_transform") or {}


def _folded_changed(a: GraphSide, va: list[ir.Value], b: GraphSide, vb: list[ir.Value]) -> bool | None:
    """Whether the folded norm values differ (digest equality; both sides folded)."""
    if not va or not vb:
        return None
    names_a = sorted(va, key=lambda v: v.name or "")
    names_b = sorted(vb, key=lambda v: v.name or "")
    if len(names_a) != len(names_b):
        return True
    return any(a.digest(x) != b.digest(y) for x, y in zip(names_a, names_b))


def _transform_form(side: GraphSide) -> dict[str, Any] | None:
    """The transform recorded by the build: the configured form, the recipe's, and how the
    per-norm transforms were placed (counts)."""
    config = (((side.manifest or {}).get("config") or {}).get("quantization") or {}).get("transform")
    recipe = (((side.report or {}).get("calibration") or {}).get("recipe")) or {}
    per = _per_transform(side)
    if config is None and not recipe.get("transform") and not per:
        return None
    return {
        "config": config,
        "recipe": recipe.get("transform"),
        "norm_form": recipe.get("norm_form"),
        "forms": dict(sorted(Counter(str(r.get("form")) for r in per.values()).items())),
        "placements": dict(sorted(Counter(str(r.get("placement")) for r in per.values()).items())),
    }


def _compare_transforms(a: GraphSide, b: GraphSide) -> dict[str, Any]:
    folded_a, folded_b = _folded_norms(a), _folded_norms(b)
    nodes_a, nodes_b = _affine_inverse_nodes(a), _affine_inverse_nodes(b)

    def explicit(nodes: list[str]) -> set[str]:
        return {_path_from_node(name.split("/AffineInverse/")[0] + "/x") or name for name in nodes}

    explicit_a, explicit_b = explicit(nodes_a), explicit(nodes_b)
    per_a, per_b = _per_transform(a), _per_transform(b)
    norms = set(folded_a) | set(folded_b) | explicit_a | explicit_b | set(per_a) | set(per_b)
    folded = []
    for norm in sorted(norms, key=_natural):
        folded.append(
            {
                "norm": norm,
                "a": norm in folded_a,
                "b": norm in folded_b,
                "explicit_a": norm in explicit_a,
                "explicit_b": norm in explicit_b,
                "form": {"a": (per_a.get(norm) or {}).get("form"), "b": (per_b.get(norm) or {}).get("form")},
                "placement": {
                    "a": (per_a.get(norm) or {}).get("placement"),
                    "b": (per_b.get(norm) or {}).get("placement"),
                },
                "values_changed": _folded_changed(a, folded_a.get(norm, []), b, folded_b.get(norm, [])),
            }
        )
    set_a, set_b = set(nodes_a), set(nodes_b)
    return {
        "folded": folded,
        "affine_inverse_nodes": {
            "only_a": [n for n in nodes_a if n not in set_b],
            "only_b": [n for n in nodes_b if n not in set_a],
            "common": len(set_a & set_b),
        },
        "form": {"a": _transform_form(a), "b": _transform_form(b)},
    }


# --------------------------------------------------------------------------------------------
# The section
# --------------------------------------------------------------------------------------------


def _merge_order(names_a: list[str], names_b: list[str]) -> list[str]:
    """A's graph order, each B-only name placed after the name that precedes it in B."""
    merged = list(names_a)
    known = set(merged)
    previous: str | None = None
    for name in names_b:
        if name not in known:
            position = merged.index(previous) + 1 if previous is not None else 0
            merged.insert(position, name)
            known.add(name)
        previous = name
    return merged


def _head_section(entries: list[dict]) -> dict[str, Any]:
    """The LM head's formats (it is also in ``linears``)."""
    heads = [entry for entry in entries if entry["name"] == "lm_head" or entry["name"].endswith(".lm_head")]
    if not heads:
        return {"name": None, "a": None, "b": None, "status": None}
    entry = heads[-1]
    return {"name": entry["name"], "a": entry["a"], "b": entry["b"], "status": entry["status"]}


def _embedding_section(a: GraphSide, ia: _Inventory, b: GraphSide, ib: _Inventory, readers: _Readers) -> dict[str, Any]:
    """The (first) embedding table of each side, compared like a linear whose rows are tokens."""
    la = next(iter(ia.embeddings.values()), None)
    lb = next(iter(ib.embeddings.values()), None)
    if la is None and lb is None:
        return {"name": None, "a": None, "b": None, "status": None, "changes": [], "weights": None, "scales": None}
    if la is not None and lb is not None and la.name != lb.name:
        lb = ib.embeddings.get(la.name, lb)
    name = (la or lb).name
    entry = _compare(name, a, la, b, lb, readers)
    entry.pop("outliers", None)
    return entry


def _summary(entries: list[dict]) -> dict[str, Any]:
    counts = Counter(entry["status"] for entry in entries)
    numeric = [
        (entry["weights"]["sqnr_db"], entry["name"])
        for entry in entries
        if entry["weights"] is not None and entry["status"] == "changed"
    ]
    finite = [(value, name) for value, name in numeric if not isinstance(value, str)]
    if finite:
        worst = min(finite)
        min_sqnr, at = worst[0], worst[1]
    elif any(entry["weights"] is not None for entry in entries):
        min_sqnr, at = INF, None
    else:
        min_sqnr, at = None, None
    summary = {status: counts.get(status, 0) for status in ("changed", "unchanged", "only_a", "only_b")}
    summary.update({"min_sqnr_db": min_sqnr, "min_sqnr_linear": at})
    return summary


def compare_linears(a: GraphSide, b: GraphSide) -> dict[str, Any]:
    """The per-linear section of ``aqexport diff``: formats and schemes on each side, the
    changes, dequantized-weight error (SQNR of B against A), scale / zero-point drift, LLM.int8
    outlier channels, folded transforms, and the embedding and LM head, as plain JSON."""
    ia, ib = _inventory(a), _inventory(b)
    readers = (
        None if a.is_description else _SideReader(a),
        None if b.is_description else _SideReader(b),
    )
    names = _merge_order(list(ia.linears), list(ib.linears))
    entries = [_compare(name, a, ia.linears.get(name), b, ib.linears.get(name), readers) for name in names]
    return {
        "linears": entries,
        "transforms": _compare_transforms(a, b),
        "embedding": _embedding_section(a, ia, b, ib, readers),
        "lm_head": _head_section(entries),
        "summary": _summary(entries),
    }
