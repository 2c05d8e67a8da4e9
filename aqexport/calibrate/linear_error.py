"""Per-linear quantization error, for the report: what each linear's codes cost at its output,
beside what round-to-nearest of the untransformed weight would cost on the same input.

Both are relative output errors on real inputs, ``‖x (W − Ŵ)ᵀ‖ / ‖x Wᵀ‖`` over the tokens of a
few calibration windows run through the calibrated (fake-quant) model:

* ``plan``: ``x`` the input the linear gets in the quantized model, after its transform
  (``Qa((x − δ) A⁻¹)``, the input hook), ``W`` the transformed float weight the codes encode
  (``W'``, ``fold.FoldedWeights``), ``Ŵ`` the weight the fake-quant linear multiplies
  by (dequantized codes, a static LLM.int8 split's float columns);
* ``rtn``: ``x`` the same input before the transform, ``W`` the original float weight, ``Ŵ``
  its round-to-nearest in the same scheme (no transform, no clipping, no GPTQ): the baseline
  every method starts from.

Output, not weight, error: GPTQ and learned clipping *raise* the weight-space error to lower the
output error (on SmolLM2's default build every linear's relative weight error was above RTN's,
median 1.25×), so a weight-space figure would rank them backwards. Hooks compute each linear's
sums as it runs and keep nothing, so memory stays one linear's activations. Computed from the
plan, the float weights (``fold.FoldedWeights``: a block at a time) and the calibrated model, so
a build that reuses a plan reports it.
Linears with an LLM.int8 outlier split are left out: their input hook routes the outlier
channels around the quantized matmul, so ``x Ŵᵀ`` is not what the split linear computes.
"""

from __future__ import annotations

import torch
from torch import nn

from aqexport.calibrate.fold import FoldedWeights
from aqexport.calibrate.quantizer import fake_quantize

__all__ = ["linear_output_errors"]


class _Sums:
    """Squared error and squared reference norm, accumulated per linear over the windows."""

    def __init__(self) -> None:
        self.values = {"plan": [0.0, 0.0], "rtn": [0.0, 0.0]}
        self.tokens = 0

    def add(self, kind: str, reference: torch.Tensor, approximation: torch.Tensor) -> None:
        self.values[kind][0] += float((reference - approximation).double().square().sum())
        self.values[kind][1] += float(reference.double().square().sum())

    def relative(self) -> dict[str, float]:
        ratios = {kind: (error / norm) ** 0.5 if norm > 0 else 0.0 for kind, (error, norm) in self.values.items()}
        return {**ratios, "tokens": self.tokens}


@torch.no_grad()
def linear_output_errors(model: nn.Module, folded: FoldedWeights, windows: torch.Tensor) -> dict[str, dict[str, float]]:
    """``{linear path: {"plan": …, "rtn": …, "tokens": n}}`` for every linear of ``folded``'s plan
    in the calibrated ``model``, over ``windows`` [N, L] token ids."""
    plan = folded.plan
    sums: dict[str, _Sums] = {}
    handles = []
    for index, block_plan in plan.blocks.items():
        for name, entry in block_plan.linears.items():
            if entry.outlier is not None:  # LLM.int8: the hook splits x itself, no W' · x to compare with
                continue
            path = f"{plan.blocks_path}.{index}.{name}"
            module = model.get_submodule(path)
            sums[path] = _Sums()
            raw: list[torch.Tensor] = []

            def before(_module, args, raw=raw) -> None:
                raw.append(args[0])

            def after(module, args, raw=raw, path=path, scheme=entry.scheme) -> None:
                x = raw.pop().reshape(-1, args[0].shape[-1]).float()
                x_t = args[0].reshape(-1, args[0].shape[-1]).float()
                record = sums[path]
                record.add("plan", x_t @ folded.weight(path).T, x_t @ module.weight.float().T)
                weight = folded.original(path)
                record.add("rtn", x @ weight.T, x @ fake_quantize(weight, scheme).T)
                record.tokens += x.shape[0]

            # ``before`` sees the input ahead of the transform hook, ``after`` behind it
            handles.append(module.register_forward_pre_hook(before, prepend=True))
            handles.append(module.register_forward_pre_hook(after))
    try:
        for window in windows:
            model(window[None])
    finally:
        for handle in handles:
            handle.remove()
    return {path: record.relative() for path, record in sums.items()}
