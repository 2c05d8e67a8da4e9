"""Round-to-nearest weight quantization: the baseline every other recipe must beat.

Applies ``fake_quantize`` in place to the weight of every ``nn.Linear`` of the model except the
LM head (found through ``get_output_embeddings``, not by name), so it works for any decoder
family without a table of layer names. The LM head is left in float here because the paper
protocols (and ALGORITHMS.md §5) keep it so; quantizing it is a lowering choice.
"""

from __future__ import annotations

import torch
from torch import nn

from aqexport.calibrate.quantizer import QuantScheme, fake_quantize

__all__ = ["quantizable_linears", "rtn_fake_quantize_"]


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head
    }


@torch.no_grad()
def rtn_fake_quantize_(model: nn.Module, scheme: QuantScheme) -> dict[str, float]:
    """Quantize-dequantize every linear weight in place; return each one's relative error."""
    errors = {}
    for name, linear in quantizable_linears(model).items():
        original = linear.weight.detach().clone()
        linear.weight.copy_(fake_quantize(original.float(), scheme).to(original.dtype))
        errors[name] = float((linear.weight - original).norm() / original.norm().clamp(min=1e-12))
    return errors
