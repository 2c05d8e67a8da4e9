"""Quantization of the model's two ends: the token embedding and the LM head.

Neither sits inside a decoder block, so block-wise calibration never sees them, yet in a small
model they are most of the bytes (SmolLM2-135M: 2 × 49152 × 576 of its 135 M parameters once
untied), so an int4 artifact without them cannot get below about 0.57× the fp32 one.

They are quantized here, after calibration and outside the QuantPlan, because they need no
training, are independent of the recipe, and a plan stays reusable for builds that keep them in
float. Both are quantized along the hidden axis, in groups: for the head that is the reduction
axis (``MatMulNBits``), for the embedding the axis ``GatherBlockQuantized`` dequantizes a row
along. The PyTorch model gets the dequantized weights, so it stays the fake-quant reference
the artifact is verified against.

A model that ties its embedding to its head can keep one table (``embedding: tied``, or ``auto``,
the mobile default): the embedding then reads the head's quantized codes
(``aqexport.passes.TiedEmbeddingPass``), so its rows are the head's dequantized rows, GPTQ'd or
not, instead of an RTN copy. That is the onnxruntime-genai builder's ``shared_embeddings``.

The head is quantized with GPTQ on its inputs from the calibrated (fake-quant) model by default:
it is the matrix a decode step streams most of (SmolLM2: 28 MB at 8 bits), and at 4 bits RTN
costs too much quality there (see ``aqexport.calibrate.gptq``). The embedding is a lookup, has
no inputs to weigh errors by, and stays round-to-nearest.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from aqexport.calibrate.gptq import gptq_quantize
from aqexport.calibrate.plan import LinearPlan
from aqexport.calibrate.quantizer import QuantScheme, quantize_codes, quantize_params

__all__ = [
    "EMBEDDING_SCHEMES",
    "HEAD_SCHEMES",
    "EdgeFormat",
    "HeadMethod",
    "can_tie_embedding",
    "head_input_hessian",
    "quantize_embedding",
    "quantize_lm_head",
    "tie_embedding",
]

EdgeFormat = Literal["float", "int8", "int4"]
HeadMethod = Literal["gptq", "rtn"]

#: Group 128 for the embedding: ``GatherBlockQuantized`` takes blocks, and a per-row range over
#: 576 hidden values would put one outlier's range on all of them.
EMBEDDING_SCHEMES: dict[str, QuantScheme] = {"int8": QuantScheme(8, 128), "int4": QuantScheme(4, 128)}
#: The 4-bit head uses groups of 32 (GPTQ on SmolLM2's head: 27.85 at 32, 28.07 at 64) and is
#: symmetric: asymmetric was no better (27.78) and its zero points are one more tensor a decode
#: step reads. MatMulNBits's default zero point is the symmetric one, so none is stored.
HEAD_SCHEMES: dict[str, QuantScheme] = {"int8": QuantScheme(8, 128), "int4": QuantScheme(4, 32, symmetric=True)}


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


@torch.no_grad()
def _rtn(weight: torch.Tensor, scheme: QuantScheme) -> LinearPlan:
    source = weight.detach().float()
    scale, zero = quantize_params(source, scheme)
    return LinearPlan(scheme, quantize_codes(source, scheme, scale, zero), scale.squeeze(-1), zero.squeeze(-1))


@torch.no_grad()
def _install(weight: torch.Tensor, entry: LinearPlan) -> LinearPlan:
    """``weight`` becomes ``entry``'s dequantized value: the model turns into the fake-quant reference."""
    weight.copy_(entry.dequantize().to(weight.dtype))
    return entry


@torch.no_grad()
def head_input_hessian(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """``XᵀX / n`` of the LM head's inputs over ``windows`` [N, L] token ids (one window per call)."""
    head = model.get_output_embeddings()
    total = torch.zeros(head.in_features, head.in_features, dtype=torch.float64)
    count = 0

    def accumulate(_module: nn.Module, args: tuple) -> None:
        nonlocal count
        rows = args[0].reshape(-1, args[0].shape[-1]).double()
        total.add_(rows.T @ rows)
        count += rows.shape[0]

    handle = head.register_forward_pre_hook(accumulate)
    try:
        for window in windows:
            model(window[None])
    finally:
        handle.remove()
    return total / count


def quantize_lm_head(
    model: nn.Module, fmt: EdgeFormat, method: HeadMethod = "rtn", hessian: torch.Tensor | None = None
) -> dict[str, LinearPlan]:
    """``{module path: plan}`` for the LM head (empty for ``float``); the head must be untied.
    ``gptq`` needs ``hessian``, the head inputs' ``XᵀX`` (``head_input_hessian``)."""
    head = model.get_output_embeddings()
    if fmt == "float" or head is None:
        return {}
    if head.weight is model.get_input_embeddings().weight:
        raise ValueError("untie the LM head from the embedding before quantizing it")
    scheme = HEAD_SCHEMES[fmt]
    if method == "gptq":
        if hessian is None:
            raise ValueError("GPTQ needs the head inputs' Hessian")
        entry = gptq_quantize(head.weight, hessian, scheme)
    else:
        entry = _rtn(head.weight, scheme)
    return {_module_path(model, head): _install(head.weight, entry)}


def quantize_embedding(model: nn.Module, fmt: EdgeFormat) -> dict[str, LinearPlan]:
    """``{module path: plan}`` for the token embedding (empty for ``float``)."""
    if fmt == "float":
        return {}
    embedding = model.get_input_embeddings()
    entry = _rtn(embedding.weight, EMBEDDING_SCHEMES[fmt])
    return {_module_path(model, embedding): _install(embedding.weight, entry)}


def can_tie_embedding(model: nn.Module, untied: bool, head_format: EdgeFormat) -> str | None:
    """Why the embedding cannot read the head's table, or None when it can: the source model
    tied them (``untied``: ``capture.untie_lm_head`` split them at load), calibration left both
    equal, and the head is quantized. Call before ``quantize_lm_head`` overwrites the head."""
    if not untied:
        return "the model does not tie its embedding to its LM head (tie_word_embeddings is false)"
    if head_format == "float":
        return "the LM head stays float (quantization.lm_head: float), so it has no quantized table to share"
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight.shape != embedding.weight.shape or not torch.equal(head.weight, embedding.weight):
        return "calibration changed the LM head's weight, so it no longer equals the embedding"
    return None


@torch.no_grad()
def tie_embedding(model: nn.Module, lm_head: dict[str, LinearPlan]) -> dict[str, str]:
    """``{embedding path: head path}``; the PyTorch embedding becomes the head's dequantized
    table, the rows ``GatherBlockQuantized`` returns from the head's codes."""
    ((head_path, entry),) = lm_head.items()
    embedding = model.get_input_embeddings()
    _install(embedding.weight, entry)
    return {_module_path(model, embedding): head_path}
