"""Whether a build loads its model whole or one decoder block at a time (``build.stream``).

A streamed build (``aqexport.streamed_model``) holds the embedding, the LM head and one block's
weights instead of the whole model, reading each block from the safetensors checkpoint when it
runs; it writes the same artifact, byte for byte (``tests/test_streamed_build.py``), and pays
for it in reads: every forward pass over the model reads every block's weights again (from the
page cache when the checkpoint fits in it). So ``auto`` streams a safetensors checkpoint only
when its weights would take more than ``STREAM_SHARE`` of the memory budget.

A local GGUF file always streams under ``auto``: loading it whole dequantizes every tensor into
a state dict beside the model (twice the float weights at the load's peak), and the streamed
build dequantizes each tensor once into float shards on disk (``gguf_tensors.float_checkpoint``)
and reads its blocks from those. For the packaged SmolLM2 that is the shipped default's memory
(BENCHMARKS.md, "Build memory"): the streamed build holds its embedding and one block, not the
model, its dequantized copy and a float copy of its blocks for the parity ladder. Only local
files stream: a Hub id is downloaded by transformers, and a ``.bin`` is one pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from aqexport.errors import ConfigError
from aqexport.memory_budget import budget_bytes, source_parameters

__all__ = ["STREAM_SHARE", "Streaming", "choose_streaming", "streaming_for"]

#: ``auto`` streams when the weights alone exceed this share of the budget (a build that holds
#: the model needs 2-3x its weights at its peak)
STREAM_SHARE = 0.4


@dataclass(frozen=True)
class Streaming:
    streamed: bool
    why: str


def choose_streaming(
    stream: str, kind: str, folder: Path, gguf_file: str | None, dtype: str, max_memory: str | float | None
) -> Streaming:
    if stream == "never":
        return Streaming(False, "build.stream: never")
    local = kind != "hub"
    streamable = local and (bool(gguf_file) or any(Path(folder).glob("*.safetensors")))
    if stream == "always":
        if not streamable:
            raise ConfigError(
                "build.stream: always needs a local safetensors checkpoint or GGUF file (this source is "
                f"{'a Hub id' if not local else 'neither'})",
                "set build.stream: auto, or save the model with save_pretrained to a folder and build from it",
            )
        return Streaming(True, "build.stream: always")
    if not streamable:
        return Streaming(False, "auto: only a local safetensors checkpoint or GGUF file streams")
    if gguf_file:
        return Streaming(True, "auto: a GGUF file streams (loaded whole, its dequantized copy sits beside the model)")
    budget, counted = budget_bytes(max_memory), source_parameters(Path(folder), gguf_file)
    if budget is None or counted is None:
        return Streaming(False, "auto: the budget or the model's size is unknown")
    weights = counted[0] * torch.finfo(getattr(torch, dtype)).bits // 8
    share = weights / budget
    if share > STREAM_SHARE:
        return Streaming(True, f"auto: the weights are {share:.0%} of the budget (> {STREAM_SHARE:.0%})")
    return Streaming(False, f"auto: the weights are {share:.0%} of the budget (<= {STREAM_SHARE:.0%})")


def streaming_for(config, source) -> Streaming:
    """``choose_streaming`` for a ``BuildConfig`` and its resolved source (``sources.resolve_source``):
    what ``aqexport build`` and ``aqexport calibrate`` both decide before loading."""
    spec = config.build
    return choose_streaming(
        spec.stream, source.kind, Path(source.location), source.gguf_file, config.model.dtype, spec.max_memory
    )
