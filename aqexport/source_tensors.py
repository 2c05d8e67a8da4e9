"""A safetensors checkpoint's tensors, read one at a time by name.

The capture's graph reads its weights from here instead of holding a copy of the model
(``aqexport.capture_weights``): a tensor is read when a pass or the writer asks for its bytes
and dropped after, so a graph of a 27 GB checkpoint holds none of it.

Read with plain file reads at the offsets the header gives, not ``safetensors.safe_open``: that
maps the whole file, and mapping a 27 GB checkpoint fails (ENOMEM) on a machine with strict
overcommit, the machine streaming is for. The header is the format's whole spec: an 8-byte
little-endian length, then JSON naming each tensor's dtype, shape and byte range after the
header.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["BLOCK_PREFIX", "CheckpointTensors", "SafetensorsTensors", "safetensors_header"]

#: a decoder block's tensors: ``model.layers.7.``, ``transformer.h.7.``, ``model.decoder.layers.7.``,
#: GGUF's ``blk.7.`` (group 1: the block's prefix without its dot)
BLOCK_PREFIX = re.compile(r"^(.*?\.\d+)\.")

#: safetensors dtype names -> torch dtypes (bfloat16 has no numpy dtype: bytes go through torch)
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """The header's tensor entries (``__metadata__`` left out) and where the data starts."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the file's start
    nbytes: int


class SafetensorsTensors:
    """Every tensor of the ``*.safetensors`` files in a folder (sharded or not), by name."""

    def __init__(self, entries: dict[str, _Entry]) -> None:
        self._entries = entries
        #: what must live as long as this reader: the temporary folder of files it reads, where
        #: nothing else owns it (``gguf_tensors.float_checkpoint``)
        self.owner: Any = None

    @classmethod
    def open(cls, folder: Path) -> SafetensorsTensors | None:
        """``None`` when the folder holds no safetensors file or one with a dtype not handled here
        (the caller then keeps the weights it loaded)."""
        entries: dict[str, _Entry] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            header, start = safetensors_header(file)
            for name, entry in header.items():
                if entry["dtype"] not in _DTYPES:
                    return None
                begin, end = entry["data_offsets"]
                entries[name] = _Entry(file, _DTYPES[entry["dtype"]], tuple(entry["shape"]), start + begin, end - begin)
        return cls(entries) if entries else None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor, cast to ``dtype`` by torch exactly as ``from_pretrained(dtype=...)`` casts it."""
        entry = self._entries[name]
        raw = np.fromfile(entry.file, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        return torch.from_numpy(raw).view(entry.dtype).reshape(entry.shape).to(dtype)


class CheckpointTensors(Protocol):
    """What reads a local checkpoint one tensor at a time, by the model's parameter names."""

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor: ...
