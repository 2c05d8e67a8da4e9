"""A GGUF file's tensors under the model's parameter names, dequantized one at a time.

``from_pretrained(gguf_file=...)`` dequantizes every tensor into a float state dict and then
loads it into the model: the whole model twice at its peak (the packaged SmolLM2: 1.2 GB
resident for 0.54 GB of float32 weights). A streamed build (``aqexport.streamed_model``) and the
weightless capture (``aqexport.capture_weights``) ask for one tensor when they use it instead,
so this reads it then: the file is memory-mapped by ``gguf.GGUFReader``, and a tensor's blocks
are dequantized by ``gguf.dequantize`` when asked for and dropped after.

The names and the per-architecture fix-ups (Llama's q/k rows are stored permuted for rotary
pairs; Gemma's norms are stored with their +1) are transformers' own, the ones its loader
applies (``get_gguf_hf_weights_map``, ``TENSOR_PROCESSORS``), so a tensor read here is the
parameter ``from_pretrained`` would have loaded, value for value (``tests/test_gguf_stream.py``).
Processors that gather several GGUF tensors into one parameter (the MoE ones write into the
loader's state instead of returning a tensor) cannot serve one tensor at a time: reading such a
tensor is refused with the fix (``build.stream: never``).

A streamed model reads every block again for each forward pass, and dequantizing the packaged
SmolLM2's blocks takes 1.3 s, a third of a 512-token forward on 2 cores. So a streamed build
dequantizes each tensor once, into float safetensors shards in a temporary folder, one block per
shard (``float_checkpoint``), and streams from those: each later read is a file read (from the
page cache), and memory still holds one block at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aqexport.errors import AqexportError
from aqexport.source_tensors import BLOCK_PREFIX, CheckpointTensors, SafetensorsTensors

__all__ = ["GgufTensors", "checkpoint_tensors", "float_checkpoint"]


class GgufTensors:
    """The tensors of one GGUF file that the model has a parameter for, by that parameter's name
    (the interface of ``source_tensors.SafetensorsTensors``: ``in``, ``shape``, ``read``)."""

    def __init__(self, file: Path, entries: dict[str, Any], processor: Any, mapping: dict[str, str]) -> None:
        self._file = file
        self._entries = entries  # parameter name -> gguf ReaderTensor (memory-mapped)
        self._processor = processor
        self._mapping = mapping  # gguf name -> parameter name, as the processor expects it

    @classmethod
    def open(cls, file: Path, model: nn.Module) -> GgufTensors:
        """``model``: the causal LM the tensors are for (a skeleton without weights is enough:
        only its parameter names and config are read)."""
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        reader = GGUFReader(str(file))
        architecture = read_field(reader, "general.architecture")[0]
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
        mapping = get_gguf_hf_weights_map(model, processor)
        entries = {mapping[tensor.name]: tensor for tensor in reader.tensors if tensor.name in mapping}
        return cls(Path(file), entries, processor, mapping)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        """GGUF lists a tensor's dimensions innermost first."""
        return tuple(int(d) for d in reversed(self._entries[name].shape))

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized, fixed-up tensor cast to ``dtype`` as transformers' loader casts it."""
        from gguf import dequantize

        tensor = self._entries[name]
        gathered: dict[str, Any] = {"tensors": {}}
        result = self._processor.process(
            weights=dequantize(tensor.data, tensor.tensor_type),
            name=tensor.name,
            tensor_key_mapping=self._mapping,
            parsed_parameters=gathered,
        )
        if result.name != tensor.name or gathered["tensors"]:
            raise AqexportError(
                f"'{self._file.name}' stores {name} split over several tensors, which transformers gathers "
                "while loading the whole file: it cannot be read one tensor at a time",
                "set build.stream: never (the model is then loaded whole)",
            )
        return torch.from_numpy(np.copy(result.weights)).to(dtype)


def float_checkpoint(
    tensors: GgufTensors, names: Iterable[str], dtype: torch.dtype, scratch: Path | None = None
) -> SafetensorsTensors:
    """``names`` (in the model's order) dequantized once into ``dtype`` safetensors shards, one per
    decoder block and one per run of tensors outside the blocks (the model's size in ``dtype``).
    They go in a new folder inside ``scratch``, which its owner removes (a build's scratch
    folder, gone when the build ends), or else in a temporary folder that lives as long as the
    returned reader (``TMPDIR`` chooses where)."""
    from safetensors.torch import save_file

    holder = None if scratch is not None else tempfile.TemporaryDirectory(prefix="aqexport-gguf-")
    folder = Path(holder.name) if holder is not None else Path(tempfile.mkdtemp(prefix="aqexport-gguf-", dir=scratch))
    shard: dict[str, torch.Tensor] = {}
    written, group = 0, None

    def flush() -> None:
        nonlocal written
        if shard:
            save_file(shard, str(folder / f"shard-{written:05d}.safetensors"))
            shard.clear()
            written += 1

    for name in names:
        block = BLOCK_PREFIX.match(name)
        key = None if block is None else block.group(1)
        if key != group:
            flush()
            group = key
        shard[name] = tensors.read(name, dtype).contiguous()
    flush()
    converted = SafetensorsTensors.open(folder)
    converted.owner = holder  # removed with the reader, where no scratch folder owns it
    return converted


def checkpoint_tensors(folder: Path, gguf_file: str | None, model: nn.Module) -> CheckpointTensors | None:
    """A local checkpoint's tensors by the model's parameter names: its GGUF file's (dequantized
    when read, ``aqexport.gguf_tensors``; ``model``, a skeleton is enough, names them), else its
    safetensors files' (``None`` when it has none)."""
    if gguf_file:
        return GgufTensors.open(Path(folder) / gguf_file, model)
    return SafetensorsTensors.open(folder)
