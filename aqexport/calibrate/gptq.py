"""GPTQ (Frantar et al., 2023): error-compensating rounding, for the LM head and, as the
``gptq`` rounding method, for every linear of a calibrated block.

Two variants share one column loop. The LM head (``gptq_quantize``) derives each group's range
from the error-updated weights when the group's first column is reached. Inside a block
(``GptqRounding``) the ranges are the ones the recipe already froze (the learned clipping of
omniquant / affinequant, plain min/max for rtn), so GPTQ only chooses the codes on that grid:
the transform and the clipping stay what training optimised, and the rounding compensates.

Why the head gets its own data-aware quantizer: it is the largest matrix of a small model
(SmolLM2: 49152 × 576, 14 MB at 4 bits), so a 4-bit head is what lets a decode step stream as
few bytes as the onnxruntime-genai builder's artifact does. Round-to-nearest at 4 bits costs
too much there: on SmolLM2 (head alone quantized, 6×512 WikiText-2 test tokens, fp 26.96)
RTN in groups of 32 gives 29.2 (symmetric) / 29.9 (asymmetric), GPTQ with the same groups 27.4.

GPTQ quantizes one input column at a time and spreads that column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian ``H = XᵀX`` of the layer's inputs,
so the *output* error ``‖X(W − Ŵ)ᵀ‖`` is what is minimised, not the weight error. Ranges are
computed per group when the group's first column is reached, from the error-updated weights
(the "static groups = False" variant of the reference code), with the quantizer every other
method uses, so the codes, scales and zero points lower exactly like an RTN plan's.

The work is ``O(rows · columns²)`` in float64 (SmolLM2's head: about 5 s on two cores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from aqexport.calibrate.plan import BlockPlan, LinearPlan
from aqexport.calibrate.quantizer import QuantScheme, quantize_params
from aqexport.calibrate.rounding import Rounding

__all__ = ["GptqRounding", "gptq_codes", "gptq_quantize", "input_hessian"]

#: Dampening added to H's diagonal, as a fraction of its mean: the reference code's default.
DAMPENING = 0.01
#: Columns updated together before the lazy update of the rest (the reference code's 128).
LAZY_BLOCK = 128


def input_hessian(inputs: torch.Tensor) -> torch.Tensor:
    """``XᵀX / n`` in float64 over every row of ``inputs`` [..., columns]."""
    flat = inputs.reshape(-1, inputs.shape[-1]).double()
    return flat.T @ flat / flat.shape[0]


def _inverse_cholesky(hessian: torch.Tensor, dampening: float = DAMPENING) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹`` after dampening; dead inputs (zero variance) get 1."""
    hessian = hessian.clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian += dampening * torch.diag(hessian).mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


#: ``(column, the error-updated columns of its group) -> (scale, zero)`` [rows, 1] each, called
#: at the first column of every group.
GroupRange = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _gptq_loop(work: torch.Tensor, inverse: torch.Tensor, scheme: QuantScheme, group_range: GroupRange) -> torch.Tensor:
    """The column loop: quantize each column with its group's range, push the error onto the
    columns not yet done (lazily, ``LAZY_BLOCK`` at a time). ``work`` is consumed."""
    rows, columns = work.shape
    group = scheme.group_size or columns
    codes = torch.empty(rows, columns, dtype=torch.int32)
    for start in range(0, columns, LAZY_BLOCK):
        stop = min(start + LAZY_BLOCK, columns)
        block = work[:, start:stop].clone()
        errors = torch.zeros_like(block)
        block_inverse = inverse[start:stop, start:stop]
        for offset in range(stop - start):
            column = start + offset
            if column % group == 0:  # the group's error-updated columns; it may run past this block
                current = block[:, offset : offset + group]
                if current.shape[1] < group:
                    current = torch.cat([current, work[:, stop : stop + group - current.shape[1]]], dim=1)
                scale, zero = group_range(column, current)
            values = block[:, offset : offset + 1]
            code = (torch.round(values / scale) + zero).clamp(scheme.qmin, scheme.qmax)
            codes[:, column] = code[:, 0].int()
            error = (values - (code - zero) * scale) / block_inverse[offset, offset]
            block[:, offset:] -= error @ block_inverse[offset : offset + 1, offset:]
            errors[:, offset : offset + 1] = error
        work[:, stop:] -= errors @ inverse[start:stop, stop:]
    return codes


def _code_dtype(scheme: QuantScheme) -> torch.dtype:
    return torch.int8 if scheme.symmetric else torch.uint8


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme) -> LinearPlan:
    """Codes, scales and zero points of ``weight`` [out, in] for ``scheme`` (grouped along ``in``)."""
    if scheme.group_size is None:
        raise ValueError("GPTQ here quantizes in groups; give the scheme a group_size")
    rows, columns = weight.shape
    scales = torch.empty(rows, scheme.num_groups(columns), dtype=torch.float64)
    zeros = torch.empty_like(scales)
    column_scheme = QuantScheme(scheme.bits, None, scheme.symmetric)

    def group_range(column: int, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = quantize_params(current, column_scheme)
        scales[:, column // scheme.group_size], zeros[:, column // scheme.group_size] = scale[:, 0, 0], zero[:, 0, 0]
        return scale.reshape(rows, 1), zero.reshape(rows, 1)

    codes = _gptq_loop(weight.detach().double().clone(), _inverse_cholesky(hessian.double()), scheme, group_range)
    return LinearPlan(scheme, codes.to(_code_dtype(scheme)), scales.float(), zeros.float())


@torch.no_grad()
def gptq_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    scale: torch.Tensor,
    zero: torch.Tensor,
    dampening: float = DAMPENING,
) -> torch.Tensor:
    """Codes of ``weight`` [out, in] on a fixed grid (``scale``, ``zero`` [out, groups])."""
    group = scheme.group_size or weight.shape[1]
    scale, zero = scale.double(), zero.double()

    def group_range(column: int, _current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = column // group
        return scale[:, index : index + 1], zero[:, index : index + 1]

    inverse = _inverse_cholesky(hessian.double(), dampening)
    return _gptq_loop(weight.detach().double().clone(), inverse, scheme, group_range).to(_code_dtype(scheme))


@dataclass(frozen=True)
class GptqRounding(Rounding):
    """GPTQ on the frozen grid of every planned linear, weighted by the inputs it sees."""

    name: str = "gptq"
    dampening: float = DAMPENING

    @property
    def needs_hessians(self) -> bool:
        return True

    def refine(self, plan: BlockPlan, weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor]) -> None:
        for name, entry in plan.linears.items():
            if entry.outlier is not None:
                continue  # an LLM.int8 split's float columns would absorb error that never reaches the output
            entry.codes = gptq_codes(
                weights[name], hessians[name], entry.scheme, entry.scale, entry.zero, self.dampening
            )
