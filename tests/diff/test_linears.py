"""``compare_linears``: numpy dequantizers against ONNX Runtime itself, and the report on tiny
synthetic graphs written the way our passes write them (names, packing, outlier split, folding)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from aqexport.diff.linears import (
    compare_linears,
    dequantize_gather_block_quantized,
    dequantize_linear,
    dequantize_matmul_nbits,
    unpack_codes,
)
from aqexport.diff.opening import open_side
from aqexport.diff.side import GraphSide, tensor_digest

MS = "com.microsoft"
K, N = 40, 6  # K = 2.5 blocks of 16: a ragged last block and an odd block count (zero-point padding)
Q_PROJ = "model.layers.0.self_attn.q_proj"


# ----------------------------------------------------------------------------- graph helpers


def _init(name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.tensor(np.ascontiguousarray(array), dtype=dtype, name=name)
    return ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))


def _input(name: str, shape: list, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))


def _model(nodes: list[ir.Node], inputs: list[ir.Value], initializers: list[ir.Value], outputs=None) -> ir.Model:
    outputs = outputs or [nodes[-1].outputs[0]]
    for index, value in enumerate(outputs):
        value.name = value.name or f"out{index}"
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": 21, MS: 1})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _side(model: ir.Model, label: str = "a", manifest: dict | None = None) -> GraphSide:
    return GraphSide(label=label, model=model, directory=None, onnx_path=None, manifest=manifest)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[..., n]`` packed low bits first along the last axis (zero padding)."""
    per = 8 // bits
    pad = (-codes.shape[-1]) % per
    codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), codes.dtype)], axis=-1).astype(np.uint8)
    packed = np.zeros((*codes.shape[:-1], codes.shape[-1] // per), np.uint8)
    for position in range(per):
        packed |= codes[..., position::per] << (position * bits)
    return packed


def _nbits_tensors(rng, n: int, k: int, bits: int, block: int, zero: str):
    """``(B, scales, zero_points)`` for MatMulNBits; the padding past ``k`` holds random codes."""
    blocks = -(-k // block)
    codes = rng.integers(0, 1 << bits, (n, blocks, block))
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    zeros = None
    if zero == "packed":
        zeros = _pack(rng.integers(0, 1 << bits, (n, blocks)), bits)
    elif zero == "float":
        zeros = rng.uniform(0, 1 << bits, (n, blocks)).astype(np.float32)
    return _pack(codes, bits), scales, zeros


def _matmul_nbits(path: str, x: ir.Value, b, scales, zeros, k: int, bits: int, block: int, level: int = 0):
    inits = [_init(f"{path}.weight_Q{bits}", b), _init(f"{path}.weight_scales", scales)]
    if zeros is not None:
        inits.append(_init(f"{path}.weight_zero_points", zeros))
    attributes = {"K": k, "N": b.shape[0], "bits": bits, "block_size": block}
    if level:
        attributes["accuracy_level"] = level
    name = "/" + path.replace(".layers.", "/layers.").replace(".", "/") + "/MatMulNBits"
    node = ir.node("MatMulNBits", [x, *inits], attributes, domain=MS, name=name)
    return node, inits


def _one_linear(b, scales, zeros, block: int = 16, bits: int = 4, k: int = K) -> ir.Model:
    x = _input("x", ["batch", k])
    node, inits = _matmul_nbits(Q_PROJ, x, b, scales, zeros, k, bits, block)
    return _model([node], [x], inits)


# ----------------------------------------------------------------------------- parity with ORT


@pytest.mark.parametrize(
    ("bits", "zero"),
    [(4, "packed"), (4, "none"), (4, "float"), (8, "packed"), (8, "none"), (2, "packed")],
)
def test_matmul_nbits_dequantizer_matches_onnxruntime(bits, zero):
    b, scales, zeros = _nbits_tensors(np.random.default_rng(bits), N, K, bits, 16, zero)
    x = _input("x", [K, K])
    node, inits = _matmul_nbits("w", x, b, scales, zeros, K, bits, 16)
    expected = _run(_model([node], [x], inits), {"x": np.eye(K, dtype=np.float32)}).T  # I·Wᵀ
    ours = dequantize_matmul_nbits(b, scales, zeros, k=K, bits=bits, block_size=16)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("dtype", "axis", "block", "scale_shape"),
    [
        (ir.DataType.INT4, 0, 16, (3, N)),  # blocked along K, ragged last block
        (ir.DataType.UINT4, 0, 16, (3, N)),
        (ir.DataType.UINT8, 1, 0, (N,)),  # per output channel
        (ir.DataType.INT8, 1, 0, ()),  # per tensor
        (ir.DataType.UINT8, 1, 2, (K, N // 2)),  # blocked along the output axis
    ],
)
def test_dequantize_linear_matches_onnxruntime(dtype, axis, block, scale_shape):
    rng = np.random.default_rng(7)
    low, high = {ir.DataType.INT4: (-8, 8), ir.DataType.UINT4: (0, 16)}.get(dtype, (0, 256))
    if dtype == ir.DataType.INT8:
        low, high = -128, 128
    numpy_type = np.int8 if dtype in (ir.DataType.INT4, ir.DataType.INT8) else np.uint8
    codes = rng.integers(low, high, (K, N)).astype(numpy_type)
    scales = rng.uniform(0.01, 0.1, scale_shape).astype(np.float32)
    zeros = rng.integers(low, high, scale_shape).astype(numpy_type)
    inits = [_init("codes", codes, dtype), _init("scales", scales), _init("zeros", zeros, dtype)]
    attributes = {"axis": axis, **({"block_size": block} if block else {})}
    node = ir.node("DequantizeLinear", inits, attributes)
    expected = _run(_model([node], [], inits), {})
    np.testing.assert_array_equal(dequantize_linear(codes, scales, zeros, axis=axis, block_size=block), expected)


@pytest.mark.parametrize(
    ("dtype", "bits", "zero"),
    [
        (ir.DataType.UINT8, 4, True),
        (ir.DataType.UINT8, 4, False),  # default zero point 8
        (ir.DataType.UINT8, 8, True),
        (ir.DataType.INT4, 4, True),
        (ir.DataType.UINT4, 4, False),  # default zero point 0
    ],
)
def test_gather_block_quantized_dequantizer_matches_onnxruntime(dtype, bits, zero):
    rng = np.random.default_rng(bits)
    rows, cols, block = 7, 80, 16  # 5 blocks per row: an odd count of packed zero points
    signed = dtype == ir.DataType.INT4
    codes = rng.integers(-8 if signed else 0, 8 if signed else 1 << bits, (rows, cols))
    zeros = rng.integers(-8 if signed else 0, 8 if signed else 1 << bits, (rows, cols // block))
    scales = rng.uniform(0.01, 0.1, (rows, cols // block)).astype(np.float32)
    if dtype == ir.DataType.UINT8:
        data, zero_points = _pack(codes, bits), _pack(zeros, bits)
    else:
        numpy_type = np.int8 if signed else np.uint8
        data, zero_points = codes.astype(numpy_type), zeros.astype(numpy_type)
    inits = [_init("data", data, dtype), _init("scales", scales)]
    inputs = [inits[0], _input("ids", [rows], ir.DataType.INT64), inits[1]]
    if zero:
        inits.append(_init("zeros", zero_points, dtype))
        inputs.append(inits[-1])
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}
    node = ir.node("GatherBlockQuantized", inputs, attributes, domain=MS)
    expected = _run(_model([node], [inputs[1]], inits), {"ids": np.arange(rows)})
    ours = dequantize_gather_block_quantized(
        data, scales, zero_points if zero else None, bits=bits, block_size=block, quantize_axis=1, data_type=dtype
    )
    np.testing.assert_array_equal(ours, expected)


def test_int4_codes_read_packed_or_unpacked_are_the_same():
    """External int4 data arrives packed two per byte over the flat tensor, in-memory as ml_dtypes."""
    codes = np.random.default_rng(0).integers(-8, 8, (5, 3)).astype(np.int8)  # odd element count
    tensor = ir.tensor(codes, dtype=ir.DataType.INT4)
    packed = np.frombuffer(tensor.tobytes(), dtype=np.uint8)
    np.testing.assert_array_equal(unpack_codes(packed, ir.DataType.INT4, (5, 3)), codes)
    np.testing.assert_array_equal(unpack_codes(tensor.numpy(), ir.DataType.INT4, (5, 3)), codes)


# ----------------------------------------------------------------------------- the report


def _entry(report: dict, name: str) -> dict:
    return next(entry for entry in report["linears"] if entry["name"] == name)


def test_one_changed_scale_is_reported_with_its_exact_drift():
    b, scales, zeros = _nbits_tensors(np.random.default_rng(1), N, K, 4, 16, "packed")
    changed = scales.copy()
    changed[2, 1] *= np.float32(1.25)
    report = compare_linears(_side(_one_linear(b, scales, zeros)), _side(_one_linear(b, changed, zeros), "b"))
    entry = _entry(report, Q_PROJ)
    assert entry["status"] == "changed" and entry["changes"] == ["scales changed"]
    drift = (float(changed[2, 1]) - float(scales[2, 1])) / float(scales[2, 1])
    assert entry["scales"]["max_rel_change"] == pytest.approx(drift, rel=1e-12)
    assert entry["scales"]["mean_rel_change"] == pytest.approx(drift / scales.size, rel=1e-12)
    assert entry["scales"]["zero_points_changed"] == 0.0
    w_a = dequantize_matmul_nbits(b, scales, zeros, k=K, bits=4, block_size=16).astype(np.float64)
    w_b = dequantize_matmul_nbits(b, changed, zeros, k=K, bits=4, block_size=16).astype(np.float64)
    sqnr = 10 * np.log10(np.sum(w_a**2) / np.sum((w_a - w_b) ** 2))
    assert entry["weights"]["sqnr_db"] == pytest.approx(sqnr, abs=1e-3)
    assert entry["weights"]["max_abs"] == pytest.approx(np.abs(w_a - w_b).max(), rel=1e-6)
    assert report["summary"]["changed"] == 1 and report["summary"]["min_sqnr_linear"] == Q_PROJ


def test_block_size_change_is_a_scheme_change():
    rng = np.random.default_rng(2)
    small = _nbits_tensors(rng, N, 64, 4, 16, "packed")
    large = _nbits_tensors(rng, N, 64, 4, 32, "none")
    model_a, model_b = _one_linear(*small, block=16, k=64), _one_linear(*large, block=32, k=64)
    entry = _entry(compare_linears(_side(model_a), _side(model_b, "b")), Q_PROJ)
    assert "block_size 16 -> 32" in entry["changes"] and "symmetric no -> yes" in entry["changes"]
    assert entry["a"]["block_size"] == 16 and entry["b"]["block_size"] == 32
    assert entry["scales"] is None  # no shared scheme to drift under
    assert isinstance(entry["weights"]["sqnr_db"], float)


def _outlier_model(channels: list[int]) -> ir.Model:
    """A static LLM.int8 split as the passes write it: a per-token quantizer behind
    ``Where_outliers`` with a constant mask, then ``Gather/MatMul/Add_outliers`` after the linear."""
    rng = np.random.default_rng(3)
    x = _input("x", ["batch", K])
    scope = "/model/layers.0/self_attn/q_proj"
    mask = np.zeros(K, np.bool_)
    mask[channels] = True
    mask_value = _init(f"{Q_PROJ}.input_outlier_mask", mask)
    quantizer = f"{scope}/ActivationQuant/OutlierSplit"
    peak = ir.node("ReduceMax", [x], {"keepdims": 1}, name=f"{quantizer}/ReduceMax_0")  # a per-token scale
    scaled = ir.node("Mul", [x, peak.outputs[0]], name=f"{quantizer}/Mul_1")
    where = ir.node("Where", [mask_value, x, scaled.outputs[0]], name=f"{quantizer}/Where_outliers")
    b, scales, zeros = _nbits_tensors(rng, N, K, 8, 16, "packed")
    linear, inits = _matmul_nbits(Q_PROJ, where.outputs[0], b, scales, zeros, K, 8, 16)
    indices = _init(f"{Q_PROJ}.outlier_channels", np.asarray(channels, np.int64))
    columns = _init(f"{Q_PROJ}.outlier_weight", np.ones((len(channels), N), np.float32))
    gather = ir.node("Gather", [where.outputs[0], indices], {"axis": -1}, name=f"{scope}/Gather_outliers")
    matmul = ir.node("MatMul", [gather.outputs[0], columns], name=f"{scope}/MatMul_outliers")
    add = ir.node("Add", [linear.outputs[0], matmul.outputs[0]], name=f"{scope}/Add_outliers")
    nodes = [peak, scaled, where, linear, gather, matmul, add]
    return _model(nodes, [x], [mask_value, *inits, indices, columns])


def test_an_added_outlier_channel_is_reported_exactly():
    report = compare_linears(_side(_outlier_model([3, 17])), _side(_outlier_model([3, 17, 29]), "b"))
    entry = _entry(report, Q_PROJ)
    assert entry["a"]["outlier_channels"] == [3, 17] and entry["b"]["outlier_channels"] == [3, 17, 29]
    assert entry["outliers"] == {"added": [29], "removed": []}
    assert entry["a"]["outlier_mode"] == "static" and entry["a"]["activations"] == "dynamic"
    assert "outlier channels +1 -0" in entry["changes"]
    # the float columns are part of the weight: channel 29 gained a column of ones
    assert entry["weights"]["max_abs"] == pytest.approx(1.0)


def _packed_model(manifest_names: bool) -> tuple[ir.Model, dict | None, dict[str, np.ndarray]]:
    """q/k/v packed the way ``PackMatMulNBitsPass`` writes them, plus an embedding and an LM head."""
    rng = np.random.default_rng(4)
    widths = {"q_proj": 6, "k_proj": 2, "v_proj": 2}
    parts = {name: _nbits_tensors(rng, n, K, 4, 16, "packed") for name, n in widths.items()}
    stem = "model.layers.0.self_attn"
    inits = [
        _init(f"{stem}.packed_weight", np.concatenate([p[0] for p in parts.values()])),
        _init(f"{stem}.packed_scales", np.concatenate([p[1] for p in parts.values()])),
        _init(f"{stem}.packed_zero_points", np.concatenate([p[2] for p in parts.values()])),
    ]
    split_sizes = _init(f"{stem}.packed_split", np.asarray(list(widths.values()), np.int64))
    ids = _input("input_ids", ["batch"], ir.DataType.INT64)
    table = _init("model.embed_tokens.weight", rng.standard_normal((11, K)).astype(np.float32))
    embed = ir.node("Gather", [table, ids], {"axis": 0}, name="/model/embed_tokens/Gather")
    packed = ir.node(
        "MatMulNBits",
        [embed.outputs[0], *inits],
        {"K": K, "N": 10, "bits": 4, "block_size": 16},
        domain=MS,
        name="/model/layers.0/self_attn/packed/MatMulNBits",
    )
    split = ir.node(
        "Split", [packed.outputs[0], split_sizes], {"axis": -1}, num_outputs=3, name=f"/{stem}/packed/Split"
    )
    head_weight = _init("lm_head.weight", rng.standard_normal((K, 13)).astype(np.float32))
    head = ir.node("MatMul", [embed.outputs[0], head_weight], name="/lm_head/MatMul")
    manifest = None
    if manifest_names:
        group = [f"/model/layers.0/self_attn/{name}/MatMulNBits" for name in widths]
        manifest = {"fusions": {"packed_matmul_nbits": [group]}}
    nodes, initializers = [embed, packed, split, head], [table, *inits, split_sizes, head_weight]
    return _model(nodes, [ids], initializers, [*split.outputs, head.outputs[0]]), manifest, parts


def test_identical_sides_report_nothing_changed(tmp_path):
    model, manifest, _ = _packed_model(True)
    report = compare_linears(_side(model, manifest=manifest), _side(model, "b", manifest))
    json.dumps(report, allow_nan=False)
    assert report["summary"] == {
        "changed": 0,
        "unchanged": 4,
        "only_a": 0,
        "only_b": 0,
        "min_sqnr_db": "inf",
        "min_sqnr_linear": None,
    }
    names = [entry["name"] for entry in report["linears"]]
    assert names == [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")] + ["lm_head"]
    assert report["embedding"]["status"] == "unchanged" and report["lm_head"]["a"]["format"] == "float"
    # the same graph saved with external data (int4 QDQ read back packed) against itself
    x = _input("x", ["batch", K])
    codes = np.random.default_rng(5).integers(-8, 8, (K, N)).astype(np.int8)
    inits = [
        _init(f"{Q_PROJ}.weight_Q4", codes, ir.DataType.INT4),
        _init(f"{Q_PROJ}.weight_scales", np.full((3, N), 0.05, np.float32)),
        _init(f"{Q_PROJ}.weight_zero_points", np.zeros((3, N), np.int8), ir.DataType.INT4),
    ]
    dq = ir.node("DequantizeLinear", inits, {"axis": 0, "block_size": 16}, name=f"/{Q_PROJ}/DequantizeLinear")
    matmul = ir.node("MatMul", [x, dq.outputs[0]], name=f"/{Q_PROJ}/MatMul")
    qdq = _model([dq, matmul], [x], inits)
    (tmp_path / "art").mkdir()
    ir.save(qdq, tmp_path / "art" / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
    on_disk = compare_linears(open_side(tmp_path / "art"), open_side(tmp_path / "art"))
    against_memory = compare_linears(_side(qdq), open_side(tmp_path / "art"))
    for result in (on_disk, against_memory):
        assert result["summary"]["changed"] == 0 and result["summary"]["unchanged"] == 1
        assert _entry(result, Q_PROJ)["a"]["symmetric"] is True


def test_packed_members_are_split_back_and_match_the_unpacked_linears():
    """A packed group against the same linears unpacked: each member's rows are its own linear."""
    packed_model, manifest, parts = _packed_model(False)  # names from the q/k/v convention
    x = _input("x", ["batch", K])
    nodes, inits = [], []
    for name, (b, scales, zeros) in parts.items():
        node, tensors = _matmul_nbits(f"model.layers.0.self_attn.{name}", x, b, scales, zeros, K, 4, 16)
        nodes.append(node)
        inits += tensors
    unpacked = _model(nodes, [x], inits, [node.outputs[0] for node in nodes])
    report = compare_linears(_side(packed_model, manifest=manifest), _side(unpacked, "b"))
    for name in ("q_proj", "k_proj", "v_proj"):
        entry = _entry(report, f"model.layers.0.self_attn.{name}")
        assert entry["changes"] == ["packed yes -> no"], entry["changes"]
        assert entry["weights"]["sqnr_db"] == "inf"
        assert entry["a"]["n"] == parts[name][0].shape[0]
    assert _entry(report, "lm_head")["status"] == "only_a"


def test_folded_and_explicit_transforms_are_reported_per_norm():
    def graph(fold: bool) -> ir.Model:
        x = _input("x", ["batch", K])
        norm_weight = _init("model.layers.0.input_layernorm.weight", np.ones(K, np.float32))
        folded = _init("model.layers.0.input_layernorm.weight_folded", np.full(K, 0.5, np.float32))
        inverse = _init("model.layers.0.input_layernorm.inverse", np.eye(K, dtype=np.float32))
        mul = ir.node("Mul", [x, folded if fold else norm_weight], name="/model/layers.0/input_layernorm/Mul")
        nodes, out = [mul], mul.outputs[0]
        if not fold:
            explicit = ir.node("MatMul", [out, inverse], name="/model/layers.0/input_layernorm/AffineInverse/MatMul")
            nodes.append(explicit)
        return _model(nodes, [x], [folded if fold else norm_weight, *([] if fold else [inverse])])

    report = compare_linears(_side(graph(False)), _side(graph(True), "b"))
    assert report["linears"] == []  # the explicit inverse is not a linear of the model
    assert report["transforms"]["folded"] == [
        {
            "norm": "model.layers.0.input_layernorm",
            "a": False,
            "b": True,
            "explicit_a": True,
            "explicit_b": False,
            "form": {"a": None, "b": None},
            "placement": {"a": None, "b": None},
            "values_changed": None,
        }
    ]
    assert report["transforms"]["affine_inverse_nodes"]["only_a"] == [
        "/model/layers.0/input_layernorm/AffineInverse/MatMul"
    ]


def test_a_description_side_is_compared_by_digest_without_reading():
    b, scales, zeros = _nbits_tensors(np.random.default_rng(6), N, K, 4, 16, "packed")
    artifact = _side(_one_linear(b, scales, zeros))
    model = _one_linear(b, scales, zeros)
    digests = {
        name: tensor_digest(value.const_value.numpy(), str(value.dtype), tuple(value.const_value.shape))
        for name, value in model.graph.initializers.items()
    }
    description = GraphSide("golden.json", model, None, None, description={}, _digests=digests)
    report = compare_linears(artifact, description)
    entry = _entry(report, Q_PROJ)
    assert entry["status"] == "unchanged" and entry["weights"] is None
    assert entry["b"]["symmetric"] is None  # zero points stored, values unknown
