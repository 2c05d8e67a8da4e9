"""Capture a causal LM with ``torch.export`` and lower it to ONNX with an explicit KV cache.

The artifact contract (shared with onnxruntime-genai and Optimum) wants flat tensors in and out:
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` ->
``logits``, ``present.{i}.key/value``. ``KVCacheWrapper`` is the one place that translates
between those flat tensors and a ``transformers`` cache object, so the exported graph is the
model's own forward, untouched. The cache is a plain ``DynamicCache`` built without the model
config: every layer keeps its full past, and sliding-window layers (Gemma 3) get their window
from the attention mask the model builds, which keeps ``present`` = ``past + seq`` for every
layer as onnxruntime-genai expects.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import onnx_ir as ir
import torch
from torch import nn
from transformers import DynamicCache

from aqexport.capture_weights import ModelWeights, WeightSource, fold_weight_transposes
from aqexport.errors import AqexportError

__all__ = [
    "CacheLayout",
    "KVCacheWrapper",
    "StaticStepWrapper",
    "cache_layout",
    "export_onnx",
    "export_static_onnx",
    "static_input_names",
    "untie_lm_head",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheLayout:
    """Per-layer KV shapes, read from the model's own cache rather than from config fields."""

    num_layers: int
    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "position_ids"]
        for i in range(self.num_layers):
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.num_layers):
            names += [f"present.{i}.key", f"present.{i}.value"]
        return names

    def empty_past(self, batch: int, length: int = 0, dtype=torch.float32) -> tuple:
        return tuple(
            (
                torch.zeros(batch, h, length, d, dtype=dtype),
                torch.zeros(batch, h, length, d, dtype=dtype),
            )
            for h, d in zip(self.kv_heads, self.head_dims)
        )


class KVCacheWrapper(nn.Module):
    """Flat-tensor forward of a causal LM: the signature of the exported graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        cache = DynamicCache(past_key_values)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
        return out.logits, presents


@torch.no_grad()
def cache_layout(model: nn.Module) -> CacheLayout:
    ids = torch.zeros(1, 2, dtype=torch.long)
    out = model(input_ids=ids, use_cache=True, past_key_values=DynamicCache())
    layers = out.past_key_values.layers
    return CacheLayout(
        num_layers=len(layers),
        kv_heads=tuple(layer.keys.shape[1] for layer in layers),
        head_dims=tuple(layer.keys.shape[3] for layer in layers),
    )


def untie_lm_head(model: nn.Module) -> bool:
    """Give the LM head its own parameter when it shares the embedding's.

    A tied weight would be one initializer used by both ``Gather`` and ``MatMul``; the lowering
    passes quantize the head (MatMulNBits) and the embedding (GatherBlockQuantized) differently,
    so each must own its initializer. Returns whether anything was untied.
    """
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    return True


def export_onnx(
    model: nn.Module, layout: CacheLayout, opset: int = 21, weights: WeightSource | None = None
) -> tuple[ir.Model, float]:
    """``torch.export`` + dynamo lowering; returns the ONNX IR model and the seconds it took.
    ``weights``: where the graph's weights come from (``aqexport.capture_weights``; default the
    model's own)."""
    wrapper = KVCacheWrapper(model).eval()
    batch, seq, past = 2, 3, 4
    example = (
        torch.randint(0, 8, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        layout.empty_past(batch, past),
    )
    b = torch.export.Dim("batch_size")
    s = torch.export.Dim("sequence_length")
    p = torch.export.Dim("past_sequence_length")
    t = torch.export.Dim("total_sequence_length")
    dynamic_shapes = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past_key_values": tuple(({0: b, 2: p}, {0: b, 2: p}) for _ in range(layout.num_layers)),
    }
    with torch.no_grad():
        return _dynamo_export(
            wrapper, example, layout.input_names(), layout.output_names(), opset, weights, dynamic_shapes
        )


def _dynamo_export(
    wrapper: nn.Module,
    example: tuple,
    input_names: list[str],
    output_names: list[str],
    opset: int,
    weights: WeightSource | None,
    dynamic_shapes: dict | None = None,
) -> tuple[ir.Model, float]:
    """Exported unoptimized, the weights attached from ``weights`` without the exporter's
    transposed copy of every linear, then optimized as the exporter would
    (``aqexport.capture_weights``)."""
    start = time.perf_counter()
    program = torch.onnx.export(
        wrapper,
        example,
        dynamic_shapes=dynamic_shapes,
        input_names=input_names,
        output_names=output_names,
        dynamo=True,
        opset_version=opset,
        optimize=False,
        external_data=True,
        verbose=False,
    )
    fold_weight_transposes(program.model, weights or ModelWeights())
    program.optimize()
    seconds = time.perf_counter() - start
    logger.info("exported %s in %.1f s", type(wrapper).__name__, seconds)
    return program.model, seconds


class _RotaryTable(nn.Module):
    """Rotary ``(cos, sin)`` looked up by position from tables the model's own rotary module
    computed once. NPU EPs have ``Gather`` (int32 indices) but not ``Cos``; a lookup also
    drops the angle arithmetic from every step."""

    def __init__(self, rotary: nn.Module, positions: int) -> None:
        super().__init__()
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])
        self.register_buffer("cos_table", cos[0].contiguous(), persistent=False)
        self.register_buffer("sin_table", sin[0].contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = position_ids.to(torch.int32)
        cos = nn.functional.embedding(index, self.cos_table)
        sin = nn.functional.embedding(index, self.sin_table)
        return cos.to(x.dtype), sin.to(x.dtype)


@contextmanager
def _rotary_tables(model: nn.Module, positions: int):
    """Swap every rotary module of the decoder for a table lookup, and put the originals back
    (the PyTorch model is verification's reference afterwards)."""
    decoder = model.get_decoder()
    originals = {name: module for name, module in decoder.named_children() if name.startswith("rotary_emb")}
    if not originals:
        raise AqexportError(
            "the npu profile needs a rotary-position model (Llama, Mistral, Qwen2)",
            "use target.profile cpu or mobile for this architecture",
        )
    try:
        for name, module in originals.items():
            setattr(decoder, name, _RotaryTable(module, positions))
        yield
    finally:
        for name, module in originals.items():
            setattr(decoder, name, module)


class StaticStepWrapper(nn.Module):
    """T new tokens against a fixed-size KV cache: the npu contract (``docs/architecture.md``);
    T = 1 is the step graph, T = ``target.prefill_tokens`` the prefill graph.

    ``attention_bias`` [1, 1, T, C + T] is the additive mask over the C cache slots and the new
    tokens, built by the host, so the graph has no mask arithmetic; the new tokens' keys/values
    come back as ``present.*`` [1, kv_heads, T, head_dim] for the host to write into their slots.
    Token ids are cast to int32 before the embedding ``Gather`` (NNAPI takes non-constant
    indices only as int32)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_bias, past_key_values):
        embeds = self.model.get_input_embeddings()(input_ids.to(torch.int32))
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_bias,
            position_ids=position_ids,
            past_key_values=DynamicCache(past_key_values),
            use_cache=True,
        )
        new = input_ids.shape[1]
        return out.logits, tuple(
            (layer.keys[:, :, -new:], layer.values[:, :, -new:]) for layer in out.past_key_values.layers
        )


def static_input_names(layout: CacheLayout) -> list[str]:
    names = ["input_ids", "position_ids", "attention_bias"]
    for i in range(layout.num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def export_static_onnx(
    model: nn.Module,
    layout: CacheLayout,
    context: int,
    opset: int = 21,
    weights: WeightSource | None = None,
    tokens: int = 1,
) -> tuple[ir.Model, float]:
    """An npu graph with every shape fixed: batch 1, ``tokens`` new tokens (1: the step graph),
    ``context`` cache slots. The rotary table has ``context + 1`` rows whatever ``tokens`` is,
    so the step and prefill graphs hold the same table (``aqexport.prefill_graph`` shares it)."""
    layer_types = getattr(model.config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        raise AqexportError(
            f"the npu profile takes one attention mask for every layer; {model.config.model_type} has "
            "sliding-window layers that need their own",
            "use target.profile cpu or mobile for this model",
        )
    example = (
        torch.zeros(1, tokens, dtype=torch.long),
        torch.zeros(1, tokens, dtype=torch.long),
        torch.zeros(1, 1, tokens, context + tokens),
        layout.empty_past(1, context),
    )
    with torch.no_grad(), _rotary_tables(model, context + 1):
        wrapper = StaticStepWrapper(model).eval()
        return _dynamo_export(wrapper, example, static_input_names(layout), layout.output_names(), opset, weights)
