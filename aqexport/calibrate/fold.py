"""Where each equivalent transform goes in a block's weights (ALGORITHMS.md §3), in one place.

Used with differentiable float32 matrices during training and with float64 ones when freezing a
plan, so the quantized codes and the trained loss see the same algebra. For a linear
``y = x Wᵀ + b``:

* norm-group transform ``A`` and shift ``δ``: ``W ← W Aᵀ``, ``b ← b + W δ`` (the input becomes
  ``(x − δ) A⁻¹``, applied by ``aqexport.calibrate.input_hooks``);
* out transform ``B`` per KV head: ``W_v ← B⁻ᵀ W_v``, ``b_v ← b_v B⁻¹``, ``W_o ← W_o Bᵀ``;
* q·k transform ``R`` per KV head (RoPE-commuting): ``W_q ← Rᵀ W_q``, ``b_q ← b_q R``,
  ``W_k ← R⁻¹ W_k``, ``b_k ← b_k R⁻ᵀ``.

Row transforms (out, q·k) act on output channels and norm transforms on input channels, so
their order does not matter; the shift's bias term uses the row-transformed weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from aqexport.calibrate.structure import BlockStructure, rotary_coefficients, rotary_pair_matrix

__all__ = [
    "BlockTransforms",
    "FoldedWeights",
    "compact_norm_transform",
    "iter_transformed_weights",
    "norm_inverse",
    "plan_transforms",
    "transformed_weights",
]


@dataclass
class BlockTransforms:
    """The matrices of one block, keyed by norm path (``norm``, ``shift``)."""

    norm: dict[str, torch.Tensor] = field(default_factory=dict)  # A, [n, n]; a diagonal A as its diagonal, [n]
    shift: dict[str, torch.Tensor] = field(default_factory=dict)  # δ, [n]
    out: torch.Tensor | None = None  # B, [kv_heads, d, d]
    qk: torch.Tensor | None = None  # (a, b) pairs, [kv_heads, 2, d/2]

    def to(self, dtype: torch.dtype) -> BlockTransforms:
        return BlockTransforms(
            {k: v.to(dtype) for k, v in self.norm.items()},
            {k: v.to(dtype) for k, v in self.shift.items()},
            None if self.out is None else self.out.to(dtype),
            None if self.qk is None else self.qk.to(dtype),
        )


def _per_head(blocks: torch.Tensor, heads: int) -> torch.Tensor:
    return blocks.repeat_interleave(heads // blocks.shape[0], dim=0)


def _rows_by_head(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``blockdiag(blocks) @ weight`` without building the block-diagonal matrix."""
    heads, d, _ = blocks.shape
    return (blocks @ weight.reshape(heads, d, -1)).reshape(weight.shape)


def _columns_by_head(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``weight @ blockdiag(blocks)ᵀ`` without building the block-diagonal matrix: heads · d²
    multiply-adds per row instead of (heads · d)², a 32nd of the work at 7B."""
    heads, d, _ = blocks.shape
    rows = weight.shape[0]
    per_head = weight.reshape(rows, heads, d).transpose(0, 1) @ blocks.transpose(-1, -2)
    return per_head.transpose(0, 1).reshape(rows, heads * d)


def _by_norm_transform(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """``W Aᵀ``; a diagonal ``A`` given as its diagonal scales the columns, with the values of
    the dense product (whose other terms are exact zeros)."""
    return weight * transform if transform.ndim == 1 else weight @ transform.T


def norm_inverse(transform: torch.Tensor) -> torch.Tensor:
    """``A⁻¹`` in the form ``transform`` has: a diagonal's reciprocal, else the dense inverse."""
    return transform.reciprocal() if transform.ndim == 1 else torch.linalg.inv(transform)


def compact_norm_transform(matrix: torch.Tensor) -> torch.Tensor:
    """A plan's ``A`` as its diagonal when it is diagonal: the form ``BlockTransforms`` uses for
    the diagonal default, so folding a frozen plan costs d² per linear, not d³. Plan format 6
    stores a diagonal as that vector already; a format-5 plan stored every ``A`` as d × d."""
    if matrix.ndim == 1:
        return matrix
    diagonal = torch.diagonal(matrix)
    return diagonal.clone() if torch.count_nonzero(matrix) == torch.count_nonzero(diagonal) else matrix


def _bias_by_head(bias: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``bias @ blockdiag(blocks)``."""
    heads, d, _ = blocks.shape
    return (bias.reshape(heads, 1, d) @ blocks).reshape(-1)


def _row_transforms(
    structure: BlockStructure, transforms: BlockTransforms, dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear: (matrix multiplying its weight rows per head, matrix multiplying its bias)."""
    rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    pair = structure.out_pair
    if pair is not None and transforms.out is not None:
        inverse = torch.linalg.inv(transforms.out.to(dtype))
        rows[pair.producer] = (inverse.transpose(-1, -2), inverse)
    qk = structure.qk_pair
    if qk is not None and transforms.qk is not None:
        rotation = rotary_pair_matrix(transforms.qk.to(dtype))
        inverse = torch.linalg.inv(rotation)
        rows[qk.query] = (_per_head(rotation.transpose(-1, -2), qk.heads), _per_head(rotation, qk.heads))
        rows[qk.key] = (inverse, inverse.transpose(-1, -2))
    return rows


def transformed_weights(
    block: nn.Module, structure: BlockStructure, transforms: BlockTransforms, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per linear the weight to quantize, and every bias a transform changed."""
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for name, weight, bias in iter_transformed_weights(block, structure, transforms, dtype):
        weights[name] = weight
        if bias is not None:
            biases[name] = bias
    return weights, biases


def iter_transformed_weights(
    block: nn.Module, structure: BlockStructure, transforms: BlockTransforms, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(linear, weight to quantize, bias if a transform changed it)`` one linear at a time:
    freezing a block computes them in float64, and a 7B block's seven weights at once are
    1.6 GiB of float64 (twice the block) where one at a time is at most 0.36 GiB."""
    rows = _row_transforms(structure, transforms, dtype)
    pair = structure.out_pair
    for name in structure.linears:
        linear = block.get_submodule(name)
        weight = linear.weight.detach().to(dtype)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        changed = None
        if name in rows:
            left, right = rows[name]
            weight = _rows_by_head(weight, left)
            if bias is not None:
                bias = changed = _bias_by_head(bias, right)
        if pair is not None and transforms.out is not None and name == pair.consumer:
            weight = _columns_by_head(weight, _per_head(transforms.out.to(dtype), pair.heads))
        group = structure.group_of(name)
        if group is not None and group.norm in transforms.shift:
            changed = (0 if bias is None else bias) + weight @ transforms.shift[group.norm].to(dtype)
        if group is not None and group.norm in transforms.norm:
            weight = _by_norm_transform(weight, transforms.norm[group.norm].to(dtype))
        yield name, weight, changed


def plan_transforms(block_plan) -> BlockTransforms:
    """The transforms a frozen ``BlockPlan`` holds, in the form ``transformed_weights`` takes."""
    qk = None if block_plan.qk_transform is None else rotary_coefficients(block_plan.qk_transform)
    norm = {name: compact_norm_transform(matrix) for name, matrix in block_plan.norm_transforms.items()}
    return BlockTransforms(norm, dict(block_plan.norm_shifts), block_plan.out_transform, qk)


class FoldedWeights:
    """The *unquantized* transformed weights ``W'`` of a plan's linears and their float originals,
    by full module path: the "folded fp" rung of the parity ladder (which must compute what the
    float model does if the folding is right) and the per-linear errors (``linear_error``) use
    them. Computed a block at a time from ``float_block(index)``, a module holding that block's
    float linears (a copy of the loaded block, or one read from a streamed model's checkpoint,
    ``streamed_model.float_linears``), and only the last block's are kept: the rung's graph reads
    them as its writer reaches them, so the SmolLM2 build holds one block of them (15 MiB) instead
    of every block's (0.43 GiB). The transformed biases are vectors: all kept, computed once."""

    def __init__(self, plan, float_block: Callable[[int], nn.Module]) -> None:
        self.plan = plan
        self._float_block = float_block
        self._last: tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self.paths: list[str] = []
        self.biases: dict[str, torch.Tensor] = {}
        for index in plan.blocks:
            weights, biases, _ = self._block(index)
            self.paths.extend(weights)
            self.biases.update(biases)

    @torch.no_grad()
    def _compute(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        block_plan = self.plan.blocks[index]
        prefix = f"{self.plan.blocks_path}.{index}"
        block = self._float_block(index)
        weights, biases, originals = {}, {}, {}
        for name, weight, bias in iter_transformed_weights(
            block, block_plan.structure, plan_transforms(block_plan), torch.float64
        ):
            weights[f"{prefix}.{name}"] = weight.float()
            originals[f"{prefix}.{name}"] = block.get_submodule(name).weight.detach().float()
            if bias is not None:
                biases[f"{prefix}.{name}"] = bias.float()
        return weights, biases, originals

    def _block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self._last is None or self._last[0] != index:
            self._last = None  # the previous block's go first
            self._last = (index, *self._compute(index))
        return self._last[1:]

    def _index(self, path: str) -> int:
        return int(path[len(self.plan.blocks_path) + 1 :].split(".", 1)[0])

    def weight(self, path: str) -> torch.Tensor:
        """``W'`` of the linear at ``path``."""
        return self._block(self._index(path))[0][path]

    def original(self, path: str) -> torch.Tensor:
        """The float weight ``W`` the plan transformed."""
        return self._block(self._index(path))[2][path]
