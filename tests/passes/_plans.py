"""Smallest graphs and plans for the lowering-pass tests: one block, linears named ``layers.0.<x>``."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from aqexport.calibrate.plan import BlockPlan, LinearPlan, QuantPlan
from aqexport.calibrate.quantizer import QuantScheme, quantize_codes, quantize_params
from aqexport.calibrate.structure import BlockStructure


def float_input(name: str, shape) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))


def initializer(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(np.asarray(array, dtype=np.float32), name=name))


def model_of(nodes, inputs, outputs, initializers) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def run(model: ir.Model, **feeds: np.ndarray) -> np.ndarray:
    return run_all(model, **feeds)[0]


def run_all(model: ir.Model, **feeds: np.ndarray) -> list[np.ndarray]:
    """Every graph output, in order, from an ONNX Runtime CPU session on the model."""
    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    # ORT fuses DequantizeLinear → MatMul into MatMulNBits with int8 activations unless told not to
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def linear_plan(weight: torch.Tensor, scheme: QuantScheme, **extra) -> LinearPlan:
    scale, zero = quantize_params(weight, scheme)
    codes = quantize_codes(weight, scheme, scale, zero)
    return LinearPlan(scheme, codes, scale.squeeze(-1), zero.squeeze(-1), **extra)


def one_block_plan(linears: dict[str, LinearPlan], **block) -> QuantPlan:
    structure = BlockStructure((), None, tuple(linears))
    plan = QuantPlan({}, {}, blocks_path="layers")
    plan.blocks[0] = BlockPlan(0, linears, block.pop("norm_transforms", {}), None, structure, **block)
    return plan
