"""Block-by-block calibration (ALGORITHMS.md §5) shared by every recipe.

For each decoder block in order: fp targets ``y = F(x_fp)``; train the block's LWC and transform
parameters to minimise ``MSE(y, F_q(x_q))`` where ``x_q`` came out of the already-quantized
blocks; freeze the result into a ``BlockPlan`` (integer codes, scales, zero points, transforms in
float64); write the block's weights back as fake-quant weights *derived from that plan*;
propagate ``x_q`` and ``x_fp``. Deriving the written weights from the saved plan is what makes
resume exact: a resumed run rebuilds earlier blocks from the same plan entries, bit for bit.

Weight-only transforms, for a linear ``y = x Wᵀ`` fed by a norm group with transform ``A``:
the quantized weight is ``Q(W Aᵀ)`` and the activation becomes ``x A⁻¹``, so the fake-quant
weight is ``Q(W Aᵀ) A⁻ᵀ``. A diagonal ``A`` later folds into the norm; a dense one becomes an
explicit ``MatMul`` after the norm (lowering). The out transform ``B`` (one d×d block per KV
head) is exact: ``W_v ← B⁻ᵀ W_v``, ``b_v ← b_v B⁻¹``, ``W_o ← W_o Bᵀ`` (query heads share
their KV head's block).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from aqexport.calibrate.block_inputs import catch_block_inputs
from aqexport.calibrate.plan import BlockPlan, LinearPlan, QuantPlan
from aqexport.calibrate.quantizer import QuantScheme, fake_quantize, quantize_codes, quantize_params
from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.calibrate.structure import BlockStructure, decoder_blocks, discover_block
from aqexport.calibrate.transforms import (
    band_width,
    enforce_dominance_,
    gradual_mask,
    matrix_report,
)

__all__ = ["BlockParameters", "apply_block_plan", "apply_plan", "calibrate", "block_weights"]

logger = logging.getLogger(__name__)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _output(result):
    return result[0] if isinstance(result, tuple) else result


class BlockParameters(nn.Module):
    """Trainable state of one block: LWC logits per linear, transforms per group and for v→o."""

    def __init__(self, block: nn.Module, structure: BlockStructure, recipe: CalibrationRecipe) -> None:
        super().__init__()
        self.gamma = nn.ParameterDict()
        self.beta = nn.ParameterDict()
        self.norm = nn.ParameterDict()
        self.out: nn.Parameter | None = None
        if recipe.lwc:
            for name in structure.linears:
                weight = block.get_submodule(name).weight
                shape = (weight.shape[0], recipe.weight.num_groups(weight.shape[1]), 1)
                self.gamma[_key(name)] = nn.Parameter(torch.full(shape, 4.0))
                self.beta[_key(name)] = nn.Parameter(torch.full(shape, 4.0))
        if recipe.transform != "none":
            for group in structure.norm_groups:
                width = block.get_submodule(group.linears[0]).in_features
                self.norm[_key(group.norm)] = nn.Parameter(torch.eye(width))
            pair = structure.out_pair
            if pair is not None:
                self.out = nn.Parameter(torch.eye(pair.head_dim).repeat(pair.kv_heads, 1, 1))

    def transform_parameters(self) -> list[nn.Parameter]:
        return list(self.norm.values()) + ([self.out] if self.out is not None else [])

    def lwc_parameters(self) -> list[nn.Parameter]:
        return list(self.gamma.values()) + list(self.beta.values())


@dataclass
class _Masks:
    norm: dict[str, torch.Tensor] = field(default_factory=dict)
    out: torch.Tensor | None = None


def _masks(params: BlockParameters, recipe: CalibrationRecipe, epoch: int) -> _Masks:
    """Diagonal recipes keep the band at width 1 for good; dense ones widen it each epoch."""
    masks = _Masks()
    for key, matrix in params.norm.items():
        n = matrix.shape[-1]
        width = 1 if recipe.transform == "diagonal" else band_width(epoch, recipe.epochs, n)
        masks.norm[key] = gradual_mask(n, width, recipe.stability_factor)
    if params.out is not None:
        d = params.out.shape[-1]
        width = 1 if recipe.transform == "diagonal" else band_width(epoch, recipe.epochs, d)
        masks.out = gradual_mask(d, width, recipe.stability_factor)
    return masks


def _per_head(blocks: torch.Tensor, heads: int) -> torch.Tensor:
    return blocks.repeat_interleave(heads // blocks.shape[0], dim=0)


def _block_diag(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks.unbind(0))


def transformed_weights(
    block: nn.Module,
    structure: BlockStructure,
    norm_transforms: dict[str, torch.Tensor],
    out_transform: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``W Aᵀ`` (with the out transform applied) per linear, and the transformed v bias."""
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    pair = structure.out_pair
    for name in structure.linears:
        linear = block.get_submodule(name)
        weight = linear.weight.detach().to(dtype)
        if pair is not None and out_transform is not None:
            if name == pair.producer:
                inverse_t = torch.linalg.inv(out_transform.to(dtype)).transpose(-1, -2)
                weight = _block_diag(inverse_t) @ weight
                if linear.bias is not None:
                    bias = linear.bias.detach().to(dtype).reshape(pair.kv_heads, 1, pair.head_dim)
                    bias = bias @ torch.linalg.inv(out_transform.to(dtype))
                    biases[name] = bias.reshape(-1)
            elif name == pair.consumer:
                weight = weight @ _block_diag(_per_head(out_transform.to(dtype), pair.heads)).T
        group = structure.group_of(name)
        if group is not None and _key(group.norm) in norm_transforms:
            weight = weight @ norm_transforms[_key(group.norm)].to(dtype).T
        weights[name] = weight
    return weights, biases


def block_weights(
    block: nn.Module,
    structure: BlockStructure,
    params: BlockParameters,
    masks: _Masks,
    scheme: QuantScheme,
) -> dict[str, torch.Tensor]:
    """Differentiable fake-quant weights (and v bias) of the block, as functional_call overrides."""
    norm = {key: matrix * masks.norm[key] for key, matrix in params.norm.items()}
    out = params.out * masks.out if params.out is not None else None
    weights, biases = transformed_weights(block, structure, norm, out, torch.float32)
    overrides: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        key = _key(name)
        gamma, beta = params.gamma.get(key), params.beta.get(key)
        quantized = fake_quantize(weight, scheme, gamma, beta)
        group = structure.group_of(name)
        if group is not None and _key(group.norm) in norm:
            quantized = quantized @ torch.linalg.inv(norm[_key(group.norm)]).T
        overrides[f"{name}.weight"] = quantized
    for name, bias in biases.items():
        overrides[f"{name}.bias"] = bias
    return overrides


def _freeze(
    block: nn.Module,
    structure: BlockStructure,
    params: BlockParameters,
    recipe: CalibrationRecipe,
    index: int,
) -> BlockPlan:
    """Final transforms (last-epoch mask) in float64, codes/scales/zeros per linear."""
    masks = _masks(params, recipe, max(recipe.epochs - 1, 0))
    with torch.no_grad():
        norm = {k: (m * masks.norm[k]).double() for k, m in params.norm.items()}
        out = (params.out * masks.out).double() if params.out is not None else None
        weights, biases = transformed_weights(block, structure, norm, out, torch.float64)
        linears = {}
        for name, weight in weights.items():
            key = _key(name)
            gamma, beta = params.gamma.get(key), params.beta.get(key)
            weight = weight.float()
            scale, zero = quantize_params(
                weight,
                recipe.weight,
                None if gamma is None else gamma.detach(),
                None if beta is None else beta.detach(),
            )
            codes = quantize_codes(weight, recipe.weight, scale, zero)
            group = structure.group_of(name)
            linears[name] = LinearPlan(
                scheme=recipe.weight,
                codes=codes,
                scale=scale.squeeze(-1),
                zero=zero.squeeze(-1),
                input_transform=group.norm if group is not None and _key(group.norm) in norm else None,
                bias=biases.get(name),
            )
        transforms = {group.norm: norm[_key(group.norm)] for group in structure.norm_groups if _key(group.norm) in norm}
        reports = {name: matrix_report(matrix) for name, matrix in transforms.items()}
        if out is not None:
            reports["out"] = matrix_report(out)
    return BlockPlan(
        index=index,
        linears=linears,
        norm_transforms=transforms,
        out_transform=out,
        structure=structure,
        matrix_reports=reports,
    )


@torch.no_grad()
def apply_block_plan(block: nn.Module, plan: BlockPlan) -> None:
    """Write fake-quant weights from the plan: ``dequant(codes) · A⁻ᵀ`` (A⁻¹ in float64)."""
    for name, entry in plan.linears.items():
        linear = block.get_submodule(name)
        weight = entry.dequantize().double()
        if entry.input_transform is not None:
            weight = weight @ torch.linalg.inv(plan.norm_transforms[entry.input_transform]).T
        linear.weight.copy_(weight.to(linear.weight.dtype))
        if entry.bias is not None:
            linear.bias.copy_(entry.bias.to(linear.bias.dtype))


def apply_plan(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Turn a float model into the PyTorch fake-quant model of ``plan`` (in place)."""
    _, blocks = decoder_blocks(model)
    for index, block_plan in plan.blocks.items():
        apply_block_plan(blocks[index], block_plan)
    return model


def _train_block(
    block: nn.Module,
    structure: BlockStructure,
    recipe: CalibrationRecipe,
    x_q: torch.Tensor,
    y_fp: torch.Tensor,
    kwargs: dict,
    index: int,
) -> tuple[BlockParameters, list[float]]:
    params = BlockParameters(block, structure, recipe)
    losses: list[float] = []
    if not recipe.trains or recipe.epochs == 0:
        return params, losses
    groups = []
    if params.transform_parameters():
        groups.append({"params": params.transform_parameters(), "lr": recipe.lr_transform})
    if params.lwc_parameters():
        groups.append({"params": params.lwc_parameters(), "lr": recipe.lr_lwc})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe.seed * 100_003 + index)
    for param in block.parameters():
        param.requires_grad_(False)
    for epoch in range(recipe.epochs):
        masks = _masks(params, recipe, epoch)
        total = 0.0
        for sample in torch.randperm(x_q.shape[0], generator=generator).tolist():
            overrides = block_weights(block, structure, params, masks, recipe.weight)
            out = _output(functional_call(block, overrides, (x_q[sample : sample + 1],), kwargs))
            loss = torch.nn.functional.mse_loss(out, y_fp[sample : sample + 1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, matrix in params.norm.items():
                enforce_dominance_(matrix.data, masks.norm[key], recipe.dominance_margin)
            if params.out is not None:
                enforce_dominance_(params.out.data, masks.out, recipe.dominance_margin)
            total += loss.item()
        losses.append(total / x_q.shape[0])
        logger.debug("block %d epoch %d loss %.3e", index, epoch, losses[-1])
    return params, losses


@torch.no_grad()
def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return torch.cat([_output(block(hidden[i : i + 1], **kwargs)) for i in range(hidden.shape[0])])


def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    recipe: CalibrationRecipe,
    plan: QuantPlan,
    head_dim: int,
    kv_heads: int,
    on_block: Callable[[int, int], None] = lambda done, total: None,
) -> QuantPlan:
    """Calibrate ``model`` in place (its linears end up fake-quantized) and fill ``plan``.

    Blocks already in ``plan`` (a resumed run) are not retrained: their weights are rebuilt
    from the plan and the activations propagated through them.
    """
    blocks_path, blocks = decoder_blocks(model)
    plan.blocks_path = blocks_path
    inputs = catch_block_inputs(model, blocks, windows)
    x_fp = inputs.hidden
    x_q = x_fp.clone()
    for index, block in enumerate(blocks):
        kwargs = inputs.kwargs[index]
        start = time.perf_counter()
        y_fp = _run_block(block, x_fp, kwargs)
        if index in plan.blocks:
            block_plan = plan.blocks[index]
        else:
            structure = discover_block(block, x_fp[:1], kwargs, head_dim, kv_heads)
            params, losses = _train_block(block, structure, recipe, x_q, y_fp, kwargs, index)
            block_plan = _freeze(block, structure, params, recipe, index)
            block_plan.loss_curve = losses
        apply_block_plan(block, block_plan)
        x_q_next = _run_block(block, x_q, kwargs)
        block_plan.output_mse = float(torch.nn.functional.mse_loss(x_q_next, y_fp))
        if index not in plan.blocks:
            block_plan.seconds = time.perf_counter() - start
            plan.add_block(block_plan)
        x_fp, x_q = y_fp, x_q_next
        on_block(index + 1, len(blocks))
        logger.info("block %d: output mse %.3e", index, block_plan.output_mse)
    return plan
