"""Round-to-nearest quantization of the model's two ends: the token embedding and the LM head.

Neither sits inside a decoder block, so block-wise calibration never sees them, yet in a small
model they are most of the bytes (SmolLM2-135M: 2 × 49152 × 576 of its 135 M parameters once
untied), so an int4 artifact without them cannot get below about 0.57× the fp32 one.

They are quantized here, after calibration and outside the QuantPlan, because they are cheap
(no training), independent of the recipe, and a plan stays reusable for builds that keep them in
float. Both are quantized along the hidden axis, in groups: for the head that is the reduction
axis (``MatMulNBits``), for the embedding the axis ``GatherBlockQuantized`` dequantizes a row
along. The PyTorch model gets the dequantized weights, so it stays the fake-quant reference
the artifact is verified against.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from aqexport.calibrate.plan import LinearPlan
from aqexport.calibrate.quantizer import QuantScheme, quantize_codes, quantize_params

__all__ = ["EDGE_SCHEMES", "EdgeFormat", "quantize_embedding", "quantize_lm_head"]

EdgeFormat = Literal["float", "int8", "int4"]

#: Group 128 for both widths: MatMulNBits and GatherBlockQuantized both take blocks, and a
#: per-row range over 49152 vocabulary rows × 576 hidden would put one outlier's range on all.
EDGE_SCHEMES: dict[str, QuantScheme] = {"int8": QuantScheme(8, 128), "int4": QuantScheme(4, 128)}


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


@torch.no_grad()
def _quantize_in_place(weight: torch.Tensor, scheme: QuantScheme) -> LinearPlan:
    """Codes of ``weight`` [rows, hidden] grouped along hidden; ``weight`` becomes their dequantized value."""
    source = weight.detach().float()
    scale, zero = quantize_params(source, scheme)
    entry = LinearPlan(scheme, quantize_codes(source, scheme, scale, zero), scale.squeeze(-1), zero.squeeze(-1))
    weight.copy_(entry.dequantize().to(weight.dtype))
    return entry


def quantize_lm_head(model: nn.Module, fmt: EdgeFormat) -> dict[str, LinearPlan]:
    """``{module path: plan}`` for the LM head (empty for ``float``); the head must be untied."""
    head = model.get_output_embeddings()
    if fmt == "float" or head is None:
        return {}
    if head.weight is model.get_input_embeddings().weight:
        raise ValueError("untie the LM head from the embedding before quantizing it")
    return {_module_path(model, head): _quantize_in_place(head.weight, EDGE_SCHEMES[fmt])}


def quantize_embedding(model: nn.Module, fmt: EdgeFormat) -> dict[str, LinearPlan]:
    """``{module path: plan}`` for the token embedding (empty for ``float``)."""
    if fmt == "float":
        return {}
    embedding = model.get_input_embeddings()
    return {_module_path(model, embedding): _quantize_in_place(embedding.weight, EDGE_SCHEMES[fmt])}
