"""Block-by-block calibration (ALGORITHMS.md §5) shared by every recipe.

For each decoder block in order: fp targets ``y = F(x_fp)`` (the same pass gathers the
activation statistics); train the block's LWC, transform and shift parameters to minimise
``MSE(y, F_q(x_q))`` where ``x_q`` came out of the already-quantized blocks; freeze the result
into a ``BlockPlan`` (integer codes, scales, zero points, transforms in float64, static
activation ranges where asked); rebuild the block's fake-quant form *from that plan*; propagate
``x_q`` and ``x_fp``. Deriving the fake-quant block from the saved plan is what makes resume
exact: a resumed run rebuilds earlier blocks from the same plan entries, bit for bit.

The algebra of where transforms go is in ``fold.py``; what happens to a linear's input
(``Qa((x − δ) A⁻¹)``) in ``input_hooks.py``. A dense norm-side ``A`` stays an explicit
``MatMul`` after the norm at lowering (block-diagonal and Kronecker ones structured
``MatMul``s, ``norm_forms.py``), a diagonal one folds into the norm; out and q·k transforms are
already inside the codes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from aqexport.calibrate.block_inputs import catch_block_inputs
from aqexport.calibrate.data_parallel import SINGLE_PROCESS, DataParallel, StepGradients
from aqexport.calibrate.finite import check_fake_quant_block, check_float_block, check_plan_tensors
from aqexport.calibrate.fold import (
    BlockTransforms,
    compact_norm_transform,
    iter_transformed_weights,
    norm_inverse,
    transformed_weights,
)
from aqexport.calibrate.input_hooks import InputState, install_input_hooks, remove_input_hooks
from aqexport.calibrate.norm_forms import NormTransform, factor_shapes
from aqexport.calibrate.outliers import OutlierSplit, outlier_mode, split_outlier_columns
from aqexport.calibrate.plan import BlockPlan, LinearPlan, QuantPlan
from aqexport.calibrate.quantizer import QuantScheme, fake_quantize, quantize_codes, quantize_params
from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.calibrate.residency import edges_released, resident, stream_from_plan
from aqexport.calibrate.statistics import ChannelStats, StatisticsCollector
from aqexport.calibrate.structure import BlockStructure, decoder_blocks, discover_block, rotary_pair_matrix
from aqexport.calibrate.transforms import (
    DIAGONAL_FLOOR,
    band_width,
    enforce_dominance_,
    enforce_rotary_dominance_,
    gradual_mask,
    matrix_report,
)

__all__ = ["BlockParameters", "apply_block_plan", "apply_plan", "calibrate", "frozen_inverse", "smoothquant_scales"]

logger = logging.getLogger(__name__)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _output(result):
    return result[0] if isinstance(result, tuple) else result


def smoothquant_scales(block: nn.Module, linears: tuple[str, ...], stats: ChannelStats, alpha: float) -> torch.Tensor:
    """``s_j = max|x_j|^α / max|W_:,j|^(1−α)``, the weight max over every linear of the group."""
    weight_max = torch.stack([block.get_submodule(n).weight.detach().abs().amax(0) for n in linears]).amax(0)
    scales = stats.absmax.clamp(min=1e-5).pow(alpha) / weight_max.float().clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=DIAGONAL_FLOOR)


def _shiftable(block: nn.Module, group, recipe: CalibrationRecipe) -> bool:
    """A shift needs a norm bias to absorb ``−δ`` and a bias in every linear to absorb ``W δ``;
    it only matters when activations are quantized."""
    if recipe.activation is None or not recipe.trains or not group.has_bias:
        return False
    return all(block.get_submodule(name).bias is not None for name in group.linears)


class BlockParameters(nn.Module):
    """Trainable state of one block: LWC logits per linear; transforms per group, v→o and q·k.

    A norm-group transform is ``A = (S ∘ M) · diag(s₀)``: ``s₀`` fixed scales (SmoothQuant's with
    ``init: smoothquant``, ones with ``init: identity``), ``S`` the learned matrix, starting at
    ``I``. So ``x A⁻¹ = (x / s₀) S⁻¹``: the learned part mixes channels *after* smoothing, and
    every entry of ``S`` is O(1) whatever its channel's range. The dominance guard acts on ``S``'s
    factors (``NormTransform``: one dense matrix, blocks, or Kronecker factors, per the recipe's
    ``norm_side_form``); ``A`` is invertible because ``S`` is and ``s₀ > 0``.
    """

    def __init__(
        self,
        block: nn.Module,
        structure: BlockStructure,
        recipe: CalibrationRecipe,
        stats: dict[str, ChannelStats],
    ) -> None:
        super().__init__()
        self.gamma = nn.ParameterDict()
        self.beta = nn.ParameterDict()
        self.norm = nn.ModuleDict()
        self.shift = nn.ParameterDict()
        self.norm_base: dict[str, torch.Tensor] = {}
        self.out: nn.Parameter | None = None
        self.qk: nn.Parameter | None = None
        if recipe.lwc:
            for name in structure.linears:
                weight = block.get_submodule(name).weight
                shape = (weight.shape[0], recipe.weight.num_groups(weight.shape[1]), 1)
                self.gamma[_key(name)] = nn.Parameter(torch.full(shape, 4.0))
                self.beta[_key(name)] = nn.Parameter(torch.full(shape, 4.0))
        if recipe.transform == "none":
            return
        for group in structure.norm_groups:
            width = block.get_submodule(group.linears[0]).in_features
            if recipe.init == "smoothquant":
                base = smoothquant_scales(block, group.linears, stats[group.linears[0]], recipe.alpha)
            else:
                base = torch.ones(width)
            self.norm_base[_key(group.norm)] = base
            shapes = factor_shapes(recipe.norm_side_form, width, recipe.norm_block, recipe.norm_factors, group.norm)
            self.norm[_key(group.norm)] = NormTransform(recipe.norm_side_form, shapes)
            if _shiftable(block, group, recipe):
                self.shift[_key(group.norm)] = nn.Parameter(stats[group.linears[0]].shift.clone())
        if not recipe.trains:
            return
        pair = structure.out_pair
        if pair is not None:
            self.out = nn.Parameter(torch.eye(pair.head_dim).repeat(pair.kv_heads, 1, 1))
        qk = structure.qk_pair
        if qk is not None and recipe.qk_transform:
            half = qk.head_dim // 2
            self.qk = nn.Parameter(torch.stack([torch.ones(qk.kv_heads, half), torch.zeros(qk.kv_heads, half)], -2))

    def transform_parameters(self) -> list[nn.Parameter]:
        extra = [p for p in (self.out, self.qk) if p is not None]
        norm = [p for transform in self.norm.values() for p in transform.parameters()]
        return norm + list(self.shift.values()) + extra

    def lwc_parameters(self) -> list[nn.Parameter]:
        return list(self.gamma.values()) + list(self.beta.values())


class _Masks:
    """``M_e`` for every matrix at one epoch. Diagonal recipes keep the band at width 1 for good;
    dense ones widen it each epoch (per norm-side factor: inside each block, in each Kronecker
    factor)."""

    def __init__(self, params: BlockParameters, recipe: CalibrationRecipe, epoch: int) -> None:
        sf = recipe.stability_factor
        self.norm = {key: transform.masks(epoch, recipe.epochs, sf) for key, transform in params.norm.items()}
        self.out = None
        if params.out is not None:
            n = params.out.shape[-1]
            self.out = gradual_mask(n, 1 if recipe.transform == "diagonal" else band_width(epoch, recipe.epochs, n), sf)


def _block_transforms(
    structure: BlockStructure, params: BlockParameters, masks: _Masks, recipe: CalibrationRecipe
) -> BlockTransforms:
    """The matrices actually used: ``(S ∘ M)·diag(s₀)`` per group, ``B ∘ M``, the q·k pairs
    (diagonal recipes keep only ``a``: a per-frequency scale, the diagonal of ``R``)."""
    transforms = BlockTransforms()
    for group in structure.norm_groups:
        key = _key(group.norm)
        if key in params.norm:
            transforms.norm[group.norm] = params.norm[key].operand(masks.norm[key], params.norm_base[key])
        if key in params.shift:
            transforms.shift[group.norm] = params.shift[key]
    if params.out is not None:
        transforms.out = params.out * masks.out
    if params.qk is not None:
        qk = params.qk
        if recipe.transform == "diagonal":
            qk = torch.stack([qk[..., 0, :], torch.zeros_like(qk[..., 1, :])], -2)
        transforms.qk = qk
    return transforms


def _recomputed_fake_quantize(
    weight: torch.Tensor, scheme: QuantScheme, gamma: torch.Tensor | None, beta: torch.Tensor | None
) -> torch.Tensor:
    """``fake_quantize`` whose intermediates are recomputed in the backward pass, not kept.

    Its autograd graph keeps several weight-sized tensors per linear (the grouped weight, the
    division by Δ, the clamp's input, ``q − z``) from the forward to the backward: 2.5× the
    block's weights, the largest share of a training step's memory (a 7B block: ~2 GB). The
    checkpoint keeps only its inputs and rebuilds one linear's graph at a time during the
    backward; the ops are elementwise, a rounding error beside the step's matmuls, and
    deterministic, so the gradients are the same bit for bit."""
    if not torch.is_grad_enabled():
        return fake_quantize(weight, scheme, gamma, beta)
    return checkpoint(fake_quantize, weight, scheme, gamma, beta, use_reentrant=False)


def _quantized_overrides(
    block: nn.Module,
    structure: BlockStructure,
    params: BlockParameters,
    masks: _Masks,
    recipe: CalibrationRecipe,
    state: InputState,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Differentiable fake-quant weights and biases for ``functional_call``; updates ``state``."""
    transforms = _block_transforms(structure, params, masks, recipe).to(dtype)
    weights, biases = transformed_weights(block, structure, transforms, dtype)
    state.inverses = {norm: norm_inverse(transform) for norm, transform in transforms.norm.items()}
    state.shifts = transforms.shift
    overrides = {
        f"{name}.weight": _recomputed_fake_quantize(
            weight, recipe.weight, params.gamma.get(_key(name)), params.beta.get(_key(name))
        )
        for name, weight in weights.items()
    }
    overrides.update({f"{name}.bias": bias for name, bias in biases.items()})
    return overrides


def _freeze(
    block: nn.Module,
    structure: BlockStructure,
    params: BlockParameters,
    recipe: CalibrationRecipe,
    index: int,
    stats: dict[str, ChannelStats],
    prefix: str,
) -> tuple[BlockPlan, dict[str, torch.Tensor]]:
    """Final transforms (last-epoch mask) in float64, round-to-nearest codes/scales/zeros per
    linear; with an outlier split (LLM.int8) the split of each linear (``prefix``: the block's
    module path). Also the transformed float weights the codes quantize, for the rounding step."""
    masks = _Masks(params, recipe, max(recipe.epochs - 1, 0))
    with torch.no_grad():
        transforms = _block_transforms(structure, params, masks, recipe).to(torch.float64)
        structures = {
            norm: params.norm[_key(norm)].structure(masks.norm[_key(norm)], params.norm_base[_key(norm)])
            for norm in transforms.norm
        }
        for norm, record in structures.items():
            if record.factors:  # the frozen A is the one the lowering composes from the same factors
                transforms.norm[norm] = record.matrix()
        linears, quantized_weights = {}, {}
        for name, weight, bias in iter_transformed_weights(block, structure, transforms, torch.float64):
            key = _key(name)
            gamma, beta = params.gamma.get(key), params.beta.get(key)
            weight = weight.float()
            outlier, outlier_weight = None, None
            if recipe.outlier_split is not None:
                mode = outlier_mode(f"{prefix}.{name}", recipe.outlier_split, recipe.outlier_layers)
                weight, channels, outlier_weight = split_outlier_columns(weight, stats[name], mode)
                outlier = OutlierSplit(mode, recipe.outlier_threshold, channels)
            scale, zero = quantize_params(
                weight,
                recipe.weight,
                None if gamma is None else gamma.detach(),
                None if beta is None else beta.detach(),
            )
            group = structure.group_of(name)
            quantized_weights[name] = weight
            linears[name] = LinearPlan(
                scheme=recipe.weight,
                codes=quantize_codes(weight, recipe.weight, scale, zero),
                scale=scale.squeeze(-1),
                zero=zero.squeeze(-1),
                input_transform=group.norm if group is not None and group.norm in transforms.norm else None,
                bias=bias,
                activation=recipe.activation,
                stats=stats.get(name),
                input_shift=group.norm if group is not None and group.norm in transforms.shift else None,
                outlier=outlier,
                outlier_weight=outlier_weight,
            )
        reports = {
            norm: matrix_report(matrix, learned=params.norm[_key(norm)].learned(masks.norm[_key(norm)]))
            for norm, matrix in transforms.norm.items()
        }
        if transforms.out is not None:
            reports["out"] = matrix_report(transforms.out)
        qk_matrix = None
        if transforms.qk is not None:
            qk_matrix = rotary_pair_matrix(transforms.qk)
            reports["qk"] = matrix_report(qk_matrix)
    plan = BlockPlan(
        index=index,
        linears=linears,
        norm_transforms=dict(transforms.norm),  # a diagonal as its vector (plan format 6)
        out_transform=transforms.out,
        structure=structure,
        matrix_reports=reports,
        qk_transform=qk_matrix,
        norm_shifts=transforms.shift,
        static_activations=recipe.static_activations,
        norm_structures=structures,
    )
    return plan, quantized_weights


#: Windows per call where the engine only runs forward for the rounding step's Hessians (the
#: Hessian windows' propagation and the accumulating pass): fewer, larger matmuls. Training and
#: the training windows' propagation stay one window per call, so plans of nearest rounding are
#: unchanged.
FORWARD_BATCH = 8
#: Inputs remembered for reuse within a window: the widest group of linears reading one input.
_SHARED_INPUTS = 3


@torch.no_grad()
def _input_hessians(block: nn.Module, plan: BlockPlan, hidden: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
    """``XᵀX / n`` (float64) of every planned linear's input as the fake-quant block of ``plan``
    sees it: after ``Qa((x − δ) A⁻¹)`` (the accumulating hooks run after the input hooks).
    Linears that read one input (q/k/v, gate/up) share one tensor: three copies of a 7B model's
    4096² float64 Hessian are 384 MiB."""
    apply_block_plan(block, plan)
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owners: dict[str, str] = {}  # linear -> the linear whose total holds its input's XᵀX
    recent: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # this call's inputs, their XᵀX, whose

    def accumulate(_module: nn.Module, args: tuple, name: str) -> None:
        rows = args[0].detach().reshape(-1, args[0].shape[-1])
        # q/k/v (and gate/up) read equal inputs: one product serves the group. A call's product
        # is taken in float32 (sums over its windows' tokens) and accumulated in float64.
        seen = next(
            (
                (p, who)
                for rows_seen, p, who in recent
                if rows_seen.shape == rows.shape and torch.equal(rows_seen, rows)
            ),
            None,
        )
        if seen is None:
            product, owner = (rows.T @ rows).double(), name
            recent[:] = [*recent[-(_SHARED_INPUTS - 1) :], (rows, product, name)]
        else:
            product, owner = seen
        if owners.setdefault(name, owner) != owner:
            raise RuntimeError(f"{name}'s input matched {owner}'s in one call and {owners[name]}'s in another")
        if owner == name:
            totals[name] = totals.get(name, 0) + product
            counts[name] = counts.get(name, 0) + rows.shape[0]

    handles = [
        block.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: accumulate(m, a, name))
        for name in plan.linears
    ]
    try:
        _observe_block(block, hidden, kwargs, FORWARD_BATCH)
    finally:
        for handle in handles:
            handle.remove()
    for name, total in totals.items():
        total /= counts[name]
    return {name: totals[owner] for name, owner in owners.items()}


def frozen_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """``A⁻¹`` for a frozen block's input hooks: computed in float64, held in float32. A diagonal
    ``A`` (the default norm-side form of weight-only presets, which plan format 6 stores as its
    vector and format 5 as a d × d matrix) gives the reciprocal of its diagonal as a vector,
    which ``InputState.map`` multiplies elementwise: the same values as the dense inverse and
    product, whose other terms are exact zeros (``tests/test_calibration.py``), for d floats a
    norm instead of d² (64 MiB at 7B) and no O(d³) inverse."""
    return norm_inverse(compact_norm_transform(matrix.double())).float()


def _input_state(plan: BlockPlan) -> InputState:
    activation = next((e.activation for e in plan.linears.values() if e.activation is not None), None)
    return InputState(
        activation=activation,
        static=plan.static_activations,
        inverses={norm: frozen_inverse(matrix) for norm, matrix in plan.norm_transforms.items()},
        shifts={norm: shift.float() for norm, shift in plan.norm_shifts.items()},
        ranges={name: (e.act_scale, e.act_zero) for name, e in plan.linears.items() if e.act_scale is not None},
        outliers={name: e.outlier for name, e in plan.linears.items() if e.outlier is not None},
    )


@torch.no_grad()
def apply_block_plan(block: nn.Module, plan: BlockPlan) -> None:
    """Make ``block`` the fake-quant block of ``plan``: weights ``dequant(codes)``, transformed
    biases, and input hooks ``Qa((x − δ) A⁻¹)`` (``A⁻¹`` computed in float64)."""
    for name, entry in plan.linears.items():
        linear = block.get_submodule(name)
        linear.weight.copy_(entry.effective_weight().to(linear.weight.dtype))
        if entry.bias is not None:
            linear.bias.copy_(entry.bias.to(linear.bias.dtype))
    install_plan_input_hooks(block, plan)


def install_plan_input_hooks(block: nn.Module, plan: BlockPlan) -> None:
    """The input side of ``apply_block_plan`` alone (a block whose weights come from elsewhere:
    ``aqexport.streamed_model``)."""
    install_input_hooks(block, plan.structure, _input_state(plan))


@torch.no_grad()
def _calibrate_static_ranges(block: nn.Module, plan: BlockPlan, hidden: torch.Tensor, kwargs: dict) -> None:
    """Fix per-tensor activation ranges: observe every linear's transformed input over the
    calibration windows (through the block's frozen quantized weights), store Δ and z."""
    apply_block_plan(block, plan)
    state = _input_state(plan)
    state.observed = {}
    install_input_hooks(block, plan.structure, state)
    _observe_block(block, hidden, kwargs)
    for name, (low, high) in state.observed.items():
        entry = plan.linears[name]
        scale, zero = quantize_params(torch.stack([low, high]).reshape(1, 2).float(), entry.activation)
        entry.act_scale, entry.act_zero = scale.reshape(()), zero.reshape(())


def apply_plan(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Turn a float model into the PyTorch fake-quant model of ``plan`` (in place)."""
    _, blocks = decoder_blocks(model)
    for index, block_plan in plan.blocks.items():
        apply_block_plan(blocks[index], block_plan)
    return model


def _guard_(params: BlockParameters, masks: _Masks, recipe: CalibrationRecipe) -> None:
    """Levy–Desplanques after every step: every matrix used stays strictly diagonally dominant."""
    for key, transform in params.norm.items():
        transform.guard_(masks.norm[key], recipe.dominance_margin)
    if params.out is not None:
        enforce_dominance_(params.out.data, masks.out.to(params.out.dtype), recipe.dominance_margin)
    if params.qk is not None:
        enforce_rotary_dominance_(params.qk.data, recipe.dominance_margin)


def _cast(value, dtype: torch.dtype):
    """Floating tensors inside ``value`` (tensors, tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _train_block(
    block: nn.Module,
    structure: BlockStructure,
    recipe: CalibrationRecipe,
    params: BlockParameters,
    x_q: torch.Tensor,
    y_fp: torch.Tensor,
    kwargs: dict,
    index: int,
    parallel: DataParallel,
) -> list[float]:
    """Train ``params`` for ``recipe.epochs`` epochs; return each epoch's loss (mean over its
    steps). A step's gradient is the mean over its ``windows_per_step`` windows, each window's
    gradient taken on its own (batch 1) and summed in float64 (``data_parallel.StepGradients``)
    whichever of ``parallel``'s ranks took it."""
    losses: list[float] = []
    if not recipe.trains:
        return losses
    dtype = torch.float64 if recipe.train_dtype == "float64" else torch.float32
    y_aug = _run_block(block, x_q, kwargs) if recipe.aug_loss else None
    block.to(dtype)
    params.to(dtype)
    params.norm_base = {k: v.to(dtype) for k, v in params.norm_base.items()}
    x_q, y_fp, y_aug, kwargs = _cast((x_q, y_fp, y_aug, kwargs), dtype)
    groups = []
    if params.transform_parameters():
        groups.append({"params": params.transform_parameters(), "lr": recipe.lr_transform})
    if params.lwc_parameters():
        groups.append({"params": params.lwc_parameters(), "lr": recipe.lr_lwc})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    trained = [param for group in groups for param in group["params"]]
    generator = torch.Generator().manual_seed(recipe.seed * 100_003 + index)
    for param in block.parameters():
        param.requires_grad_(False)
    state = InputState(activation=recipe.activation, static=recipe.static_activations)
    install_input_hooks(block, structure, state)
    try:
        for epoch in range(recipe.epochs):
            masks = _Masks(params, recipe, epoch)
            total = 0.0
            order = torch.randperm(x_q.shape[0], generator=generator).tolist()
            steps = [order[i : i + recipe.windows_per_step] for i in range(0, len(order), recipe.windows_per_step)]
            for step in steps:
                gradients = StepGradients(trained)
                for sample in parallel.share(step):
                    overrides = _quantized_overrides(block, structure, params, masks, recipe, state, dtype)
                    out = _output(functional_call(block, overrides, (x_q[sample : sample + 1],), kwargs))
                    loss = torch.nn.functional.mse_loss(out, y_fp[sample : sample + 1])
                    if y_aug is not None:
                        loss = loss + torch.nn.functional.mse_loss(out, y_aug[sample : sample + 1])
                    if len(step) > 1:  # the step's loss is the mean over its windows
                        loss = loss / len(step)
                    gradients.add(torch.autograd.grad(loss, trained, allow_unused=True))
                    total += loss.item()
                optimizer.zero_grad(set_to_none=True)
                parallel.install_gradients(gradients)
                optimizer.step()
                _guard_(params, masks, recipe)
            losses.append(parallel.sum(total) / len(steps))
            logger.debug("block %d epoch %d loss %.3e", index, epoch, losses[-1])
    finally:
        install_input_hooks(block, structure, InputState())
        block.to(torch.float32)
    return losses


@torch.no_grad()
def _observe_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch: int = 1) -> None:
    """``block`` over ``hidden`` for what its hooks see; each call's output is dropped as it
    comes (the GPTQ Hessians' 32768 tokens: 72 MB of outputs nobody reads, for the packaged
    SmolLM2)."""
    for i in range(0, hidden.shape[0], batch):
        block(hidden[i : i + batch], **kwargs)


@torch.no_grad()
def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch: int = 1) -> torch.Tensor:
    """``block`` over ``hidden`` [N, L, H], ``batch`` windows per call (the caught keyword
    arguments are batch 1 and broadcast: masks [1, 1, L, L], positions [1, L]).

    Each call's output is copied into one tensor as it comes, not concatenated at the end: the
    pieces and their concatenation were two copies of the output at once (72 MB each for the
    packaged SmolLM2's GPTQ windows, 32768 tokens)."""
    out = None
    for i in range(0, hidden.shape[0], batch):
        piece = _output(block(hidden[i : i + batch], **kwargs))
        if out is None:
            out = piece.new_empty((hidden.shape[0], *piece.shape[1:]))
        out[i : i + piece.shape[0]] = piece
        del piece
    return out


def _plan_block(
    block: nn.Module,
    name: str,
    index: int,
    recipe: CalibrationRecipe,
    stats: dict[str, ChannelStats],
    x_fp: torch.Tensor,
    x_q: torch.Tensor,
    y_fp: torch.Tensor,
    h_q: torch.Tensor | None,
    kwargs: dict,
    head_dim: int,
    kv_heads: int,
    parallel: DataParallel,
) -> BlockPlan:
    """Train one block's transforms and clipping, freeze them, round its weights: a function of
    its own so that what only this block needs (its transformed float weights, the trained
    parameters) is gone when it returns. Kept as loop variables they lived on through the next
    block's training: a 7B block's transformed weights alone are 810 MiB."""
    structure = discover_block(block, x_fp[:1], kwargs, head_dim, kv_heads)
    params = BlockParameters(block, structure, recipe, stats)
    losses = _train_block(block, structure, recipe, params, x_q, y_fp, kwargs, index, parallel)
    block_plan, weights = _freeze(block, structure, params, recipe, index, stats, name)
    del params
    block_plan.loss_curve = losses
    if recipe.rounding.needs_hessians:
        seen = x_q if h_q is None else h_q
        recipe.rounding.refine(block_plan, weights, _input_hessians(block, block_plan, seen, kwargs))
    del weights
    if recipe.static_activations and recipe.activation is not None:
        _calibrate_static_ranges(block, block_plan, x_q, kwargs)
    return block_plan


def calibrate(
    model: nn.Module,
    windows: torch.Tensor,
    recipe: CalibrationRecipe,
    plan: QuantPlan,
    head_dim: int,
    kv_heads: int,
    on_block: Callable[[int, int], None] = lambda done, total: None,
    hessian_windows: torch.Tensor | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
) -> QuantPlan:
    """Calibrate ``model`` in place (it ends up as the fake-quant model) and fill ``plan``.

    Blocks already in ``plan`` (a resumed run) are not retrained: their fake-quant form is
    rebuilt from the plan and the activations propagated through them.

    ``hessian_windows`` (same length as ``windows``): where the rounding step's Hessians come
    from instead of the training windows. They run only forward, through each block as
    calibrated (quantized blocks before it included), so a data-aware rounding can see many more
    tokens than training can afford; ``None``: the training windows.

    ``parallel``: this process's rank among those sharing each training step
    (``data_parallel``); every rank fills an identical ``plan``.
    """
    blocks_path, blocks = decoder_blocks(model)
    plan.blocks_path = blocks_path
    for block in blocks:
        # ``model`` must hold float weights; input hooks of an earlier fake-quant run on the same
        # object would transform inputs twice and hide the norm → linear structure.
        remove_input_hooks(block)
    stream_from_plan(model, None)  # a streamed model's blocks load float until the plan is done
    inputs = catch_block_inputs(model, blocks, windows)
    x_fp = inputs.hidden
    x_q = x_fp.clone()
    h_q = None if hessian_windows is None else catch_block_inputs(model, blocks, hessian_windows).hidden
    with edges_released(model):  # the blocks need neither the embedding nor the head
        for index, block in enumerate(blocks):
            with resident(block):  # a streamed model's block holds its weights for this iteration only
                kwargs = inputs.kwargs[index]
                start = time.perf_counter()
                with StatisticsCollector(block, recipe.outlier_threshold) as collector:
                    y_fp = _run_block(block, x_fp, kwargs)
                name = f"{blocks_path}.{index}"
                check_float_block(block, name, index, x_fp, y_fp, kwargs, plan.directory)
                if index in plan.blocks:
                    block_plan = plan.blocks[index]
                else:
                    block_plan = _plan_block(
                        block,
                        name,
                        index,
                        recipe,
                        collector.stats,
                        x_fp,
                        x_q,
                        y_fp,
                        h_q,
                        kwargs,
                        head_dim,
                        kv_heads,
                        parallel,
                    )
                apply_block_plan(block, block_plan)
                x_q_next = _run_block(block, x_q, kwargs)
                if h_q is not None:
                    h_q = _run_block(block, h_q, kwargs, FORWARD_BATCH)
                check_fake_quant_block(block, name, index, x_q, x_q_next, kwargs, plan.directory)
                block_plan.output_mse = float(torch.nn.functional.mse_loss(x_q_next, y_fp))
                if index not in plan.blocks:
                    block_plan.seconds = time.perf_counter() - start
                    check_plan_tensors(block_plan.tensors(), name, index, plan.directory)
                    plan.add_block(block_plan)
                x_fp, x_q = y_fp, x_q_next
                on_block(index + 1, len(blocks))
                logger.info("block %d: output mse %.3e", index, block_plan.output_mse)
                del block_plan  # filed; held on, a 7B block's codes (470 MiB) sat through the next's training
    stream_from_plan(model, plan)  # and from now on as fake-quant, as a loaded model's blocks are
    return plan
