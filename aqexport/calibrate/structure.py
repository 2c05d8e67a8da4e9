"""Discover, per decoder block, which transforms can be folded, by running the block, not by name.

A hand-written table of layer names per architecture is the main complaint against the nearest
peer, so nothing here knows ``q_proj`` or ``input_layernorm``. Three facts are read off a real
forward of each block:

1. **Decoder blocks** are the children of the model's ``nn.ModuleList`` that runs once per layer
   (``config.num_hidden_layers`` entries of one class).
2. **norm → linears groups.** Forward hooks record which module produced each tensor; a linear
   whose input *is* (same tensor object) the output of an elementwise-affine module (a 1-D
   ``weight``: RMSNorm / LayerNorm) belongs to that norm's group. Llama's gate and up, OPT's
   fc1, and q/k/v all come out of this. A probe tells whether the norm multiplies by ``weight``
   or by ``1 + weight`` (Gemma), which decides how a diagonal transform folds into it.
3. **v → o pairs.** A linear whose input is computed (no module produced it) is a candidate
   consumer. A candidate producer is accepted as ``v`` for that consumer only if right-multiplying
   its output by a random block-diagonal matrix (one d×d block per KV head) turns the consumer's
   input into the same product per query head: the exact commutation the out transform needs.
   ``up → down`` fails this (SiLU·mul in between), so down stays untransformed, as it must.
4. **q · k pairs.** Two linears of a norm group, shaped like query (heads·d outputs) and key
   (kv_heads·d), are the pair feeding the attention scores if multiplying the query's heads by a
   random ``R`` (one per KV head) and the key's by ``R⁻ᵀ`` leaves the block's output unchanged.
   ``R`` is drawn from the family that commutes with rotary embeddings (``a·I + b·J`` on every
   frequency pair ``(i, i + d/2)``, a complex scalar per frequency; ALGORITHMS.md §3), so the
   probe accepts exactly the transforms the engine may fold: on a rotary model that is the
   RoPE-commuting family, and a model with a per-head norm after q/k (Gemma 3, Qwen 3) finds
   no pair and gets no q·k transform, instead of a non-output-preserving one.

A block that has no norm group at all is refused with an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from aqexport.errors import AqexportError

__all__ = [
    "BlockStructure",
    "NormGroup",
    "OutPair",
    "QkPair",
    "decoder_blocks",
    "discover_block",
    "rotary_pair_matrix",
]


@dataclass(frozen=True)
class NormGroup:
    norm: str  # module path relative to the block
    linears: tuple[str, ...]
    weight_offset: float  # norm output = normalized · (offset + weight)
    has_bias: bool


@dataclass(frozen=True)
class OutPair:
    producer: str  # v
    consumer: str  # o
    head_dim: int
    kv_heads: int
    heads: int


@dataclass(frozen=True)
class QkPair:
    query: str
    key: str
    head_dim: int
    kv_heads: int
    heads: int


@dataclass(frozen=True)
class BlockStructure:
    norm_groups: tuple[NormGroup, ...]
    out_pair: OutPair | None
    linears: tuple[str, ...] = field(default=())
    qk_pair: QkPair | None = None

    def group_of(self, linear: str) -> NormGroup | None:
        return next((g for g in self.norm_groups if linear in g.linears), None)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder layers: ``num_hidden_layers`` children of one class."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            if len({type(child) for child in module}) == 1 and any(
                isinstance(m, nn.Linear) for m in module[0].modules()
            ):
                return name, module
    raise AqexportError(
        f"found no list of {count} decoder blocks in {type(model).__name__}",
        "use a supported decoder-only architecture",
    )


def _is_elementwise_affine(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and not isinstance(module, nn.Embedding)


@torch.no_grad()
def _weight_offset(norm: nn.Module) -> float:
    """0 if the norm scales by ``weight``, 1 if by ``1 + weight`` (probed with weight = 0)."""
    saved = norm.weight.detach().clone()
    saved_bias = norm.bias.detach().clone() if getattr(norm, "bias", None) is not None else None
    try:
        norm.weight.zero_()
        if saved_bias is not None:
            norm.bias.zero_()
        out = norm(torch.randn(1, 3, saved.shape[0]))
        return 0.0 if out.abs().max() < 1e-6 else 1.0
    finally:
        norm.weight.copy_(saved)
        if saved_bias is not None:
            norm.bias.copy_(saved_bias)


@torch.no_grad()
def discover_block(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict, head_dim: int, kv_heads: int
) -> BlockStructure:
    """Structure of one block from one forward on ``hidden`` with the block's own ``kwargs``."""
    names = {module: name for name, module in block.named_modules()}
    linears = [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    producers: dict[int, str] = {}
    inputs: dict[str, int] = {}
    alive: list[torch.Tensor] = []  # ids are only unique while the tensors live

    def record_output(module, args, output):
        if isinstance(output, torch.Tensor):
            alive.append(output)
            producers.setdefault(id(output), names[module])

    def record_input(module, args):
        alive.append(args[0])
        inputs[names[module]] = id(args[0])

    modules = [m for m in block.modules() if m is not block]
    handles = [m.register_forward_hook(record_output) for m in modules]
    handles += [block.get_submodule(n).register_forward_pre_hook(record_input) for n in linears]
    try:
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    groups: dict[str, list[str]] = {}
    orphans = []
    for linear in linears:
        producer = producers.get(inputs.get(linear, -1))
        if producer is not None and _is_elementwise_affine(block.get_submodule(producer)):
            groups.setdefault(producer, []).append(linear)
        elif producer is None:
            orphans.append(linear)
    if not groups:
        raise AqexportError(
            f"no normalization → linear group found in decoder block {type(block).__name__}",
            "this block layout is not supported; please report the architecture",
        )
    norm_groups = tuple(
        NormGroup(
            norm,
            tuple(members),
            _weight_offset(block.get_submodule(norm)),
            getattr(block.get_submodule(norm), "bias", None) is not None,
        )
        for norm, members in groups.items()
    )
    candidates = [lin for members in groups.values() for lin in members]
    out_pair = _find_out_pair(block, hidden, kwargs, candidates, orphans, head_dim, kv_heads)
    qk_pair = None
    if out_pair is not None:
        qk_pair = _find_qk_pair(block, hidden, kwargs, candidates, out_pair)
    return BlockStructure(norm_groups, out_pair, tuple(linears), qk_pair)


def rotary_pair_matrix(coefficients: torch.Tensor) -> torch.Tensor:
    """Dense ``[..., d, d]`` matrices ``a·I + b·J`` per frequency pair ``(i, i + d/2)``.

    ``coefficients`` is ``[..., 2, d/2]`` (``a`` then ``b``). As a right-multiplication
    ``q ↦ q R`` this multiplies each pair by the complex number ``a + ib``, exactly like a rotary
    rotation does, so the two commute. ``R⁻ᵀ = R / (a² + b²)`` pairwise.
    """
    a, b = coefficients.unbind(-2)
    half = a.shape[-1]
    eye = torch.eye(half, dtype=a.dtype)
    diag_a = a[..., :, None] * eye
    diag_b = b[..., :, None] * eye
    top = torch.cat([diag_a, diag_b], dim=-1)
    bottom = torch.cat([-diag_b, diag_a], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def rotary_coefficients(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rotary_pair_matrix``: the ``[..., 2, d/2]`` coefficients ``(a, b)``."""
    half = matrix.shape[-1] // 2
    a = matrix[..., :half, :half].diagonal(dim1=-2, dim2=-1)
    b = matrix[..., :half, half:].diagonal(dim1=-2, dim2=-1)
    return torch.stack([a, b], dim=-2)


def _block_output(block, hidden, kwargs) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _find_qk_pair(block, hidden, kwargs, candidates, out_pair: OutPair) -> QkPair | None:
    d, kv_heads, heads = out_pair.head_dim, out_pair.kv_heads, out_pair.heads
    if d % 2:
        return None
    generator = torch.Generator().manual_seed(1)
    a = 1.0 + 0.3 * torch.randn(kv_heads, d // 2, generator=generator)
    b = 0.5 * torch.randn(kv_heads, d // 2, generator=generator)
    coefficients = torch.stack([a, b], dim=-2)
    rotation = rotary_pair_matrix(coefficients)
    norm2 = (coefficients**2).sum(-2)
    inverse_t = rotation / torch.cat([norm2, norm2], dim=-1)[..., None, :]
    reference = _block_output(block, hidden, kwargs)
    scale = reference.abs().max().clamp(min=1e-6)
    shapes = {name: block.get_submodule(name).out_features for name in candidates if name != out_pair.producer}
    queries = [name for name, size in shapes.items() if size == heads * d]
    keys = [name for name, size in shapes.items() if size == kv_heads * d]
    for query in queries:
        for key in keys:
            if key == query:
                continue
            handles = [
                block.get_submodule(query).register_forward_hook(
                    lambda m, a, out: _block_diag_apply(out, rotation, heads // kv_heads)
                ),
                block.get_submodule(key).register_forward_hook(lambda m, a, out: _block_diag_apply(out, inverse_t, 1)),
            ]
            try:
                probed = _block_output(block, hidden, kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            if (probed - reference).abs().max() / scale < 1e-4:
                return QkPair(query, key, d, kv_heads, heads)
    return None


def _block_diag_apply(x: torch.Tensor, blocks: torch.Tensor, repeat: int) -> torch.Tensor:
    """x [..., heads·d] times blockdiag(blocks[h // repeat]) on the last axis."""
    kv, d, _ = blocks.shape
    heads = x.shape[-1] // d
    per_head = blocks.repeat_interleave(repeat, dim=0)[:heads]
    shaped = x.reshape(*x.shape[:-1], heads, d)
    return torch.einsum("...hd,hde->...he", shaped, per_head).reshape(x.shape)


@torch.no_grad()
def _find_out_pair(block, hidden, kwargs, candidates, orphans, head_dim, kv_heads) -> OutPair | None:
    generator = torch.Generator().manual_seed(0)
    plain: dict[str, torch.Tensor] = {}  # a consumer's unprobed input, the same whichever producer is probed
    for producer in candidates:
        out_features = block.get_submodule(producer).out_features
        if out_features != kv_heads * head_dim:
            continue
        probe = torch.eye(head_dim) + 0.3 * torch.randn(kv_heads, head_dim, head_dim, generator=generator)
        for consumer in orphans:
            in_features = block.get_submodule(consumer).in_features
            if in_features % head_dim:
                continue
            heads = in_features // head_dim
            if heads % kv_heads:
                continue
            repeat = heads // kv_heads
            captured: dict[str, torch.Tensor] = {}

            def grab(module, args, key, captured=captured):
                captured[key] = args[0].detach().clone()

            consumer_module = block.get_submodule(consumer)
            if consumer not in plain:
                handle = consumer_module.register_forward_pre_hook(lambda m, a: grab(m, a, "plain"))
                block(hidden, **kwargs)
                handle.remove()
                plain[consumer] = captured.pop("plain")
            handles = [
                block.get_submodule(producer).register_forward_hook(
                    lambda m, a, out, probe=probe: _block_diag_apply(out, probe, 1)
                ),
                consumer_module.register_forward_pre_hook(lambda m, a: grab(m, a, "probed")),
            ]
            block(hidden, **kwargs)
            for handle in handles:
                handle.remove()
            expected = _block_diag_apply(plain[consumer], probe, repeat)
            scale = expected.abs().max().clamp(min=1e-6)
            if (captured["probed"] - expected).abs().max() / scale < 1e-4:
                return OutPair(producer, consumer, head_dim, kv_heads, heads)
    return None
