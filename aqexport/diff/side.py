"""One side of a diff: an artifact directory, a bare ``.onnx`` file, or a golden description.

Why a class of its own: a diff holds two models at once, and users' models are 0.5–8B
parameters, so neither side may materialise its weights. The graph is loaded with
``onnx_ir`` (external tensors stay references); :meth:`GraphSide.read` reads one initializer
straight from its file by offset and length into a fresh array that the caller drops after
use, so the diff's memory grows with the largest tensor, not with the model. (``onnx_ir``'s
own ``ExternalTensor.numpy()`` memory-maps the file and keeps the map alive on the tensor,
which would leave every page read resident until the end.)

A *golden description* (``aqexport diff --describe``) is the small JSON that CI commits
instead of a model: the structure and a content hash of every initializer, no weights. A
side loaded from one answers structural questions and :meth:`GraphSide.digest`, never
:meth:`GraphSide.read`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from aqexport.errors import AqexportError

__all__ = ["GraphSide", "subgraphs", "tensor_digest"]

DESCRIPTION_FORMAT = "aqexport.graph-description"
_PACKED = (ir.DataType.INT4, ir.DataType.UINT4)  # two codes per byte: read as packed uint8


@dataclass
class GraphSide:
    """What a diff knows of one side: its graph, where it came from, and its build's records."""

    label: str  # as the user named it on the command line
    model: ir.Model
    directory: Path | None  # the artifact directory; None for a bare .onnx or a description
    onnx_path: Path | None  # None for a description
    manifest: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    description: dict[str, Any] | None = None  # set when this side is a golden description
    _digests: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def is_description(self) -> bool:
        return self.description is not None

    @cached_property
    def initializers(self) -> dict[str, ir.Value]:
        """Every initializer of the main graph and its subgraphs, by name."""
        found: dict[str, ir.Value] = {}
        for graph in (self.model.graph, *subgraphs(self.model.graph)):
            found.update(graph.initializers)
        return found

    def read(self, value: ir.Value) -> np.ndarray:
        """One initializer's contents, read now and owned by the caller (bounded memory)."""
        tensor = value.const_value
        if self.is_description and isinstance(tensor, ir.ExternalTensor):  # small ones are stored
            raise AqexportError(
                f"'{self.label}' is a graph description: it holds hashes, not weights",
                "diff against an artifact directory or .onnx file to compare weight values",
            )
        if tensor is None:
            raise AqexportError(f"initializer '{value.name}' in '{self.label}' has no value", "rebuild the artifact")
        if isinstance(tensor, ir.ExternalTensor):
            return _read_external(tensor, self.label)
        return np.array(tensor.numpy(), copy=True)

    def chunks(self, value: ir.Value, elements: int = 1 << 20) -> Iterator[np.ndarray]:
        """One initializer's stored elements, flat, ``elements`` at a time, read from the file
        chunk by chunk: comparing two large tables never holds either whole (4-bit types come
        as packed bytes)."""
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor) or self.is_description:
            if tensor.dtype in _PACKED:
                array = np.frombuffer(tensor.tobytes(), np.uint8)
            else:
                array = self.read(value).reshape(-1)
            for start in range(0, array.size, elements):
                yield array[start : start + elements]
            return
        path, dtype, length = _stored(tensor)
        step = elements * dtype.itemsize
        with open(path, "rb") as handle:
            handle.seek(tensor.offset or 0)
            for start in range(0, length, step):
                raw = handle.read(min(step, length - start))
                if not raw or len(raw) % dtype.itemsize:
                    raise AqexportError(f"'{self.label}': external data '{tensor.location}' is truncated", "rebuild")
                yield np.frombuffer(raw, dtype=dtype)

    def known_digest(self, value: ir.Value) -> str | None:
        """A digest without reading: a description's, or one already computed."""
        if self.is_description:
            return self.digest(value)
        return self._digests.get(value.name or "")

    def remember_digests(self, digests: dict[str, str]) -> None:
        """Digests known without data (a golden description's), by initializer name."""
        self._digests.update(digests)

    def digest(self, value: ir.Value) -> str:
        """sha256 of an initializer's dtype, shape and bytes: equal digests mean equal tensors."""
        name = value.name or ""
        if name in self._digests:
            return self._digests[name]
        array = self.read(value)
        digest = tensor_digest(array, str(value.dtype), tuple(array.shape))
        self._digests[name] = digest
        return digest

    def file_sizes(self) -> dict[str, int]:
        """Bytes of every file that ships (the artifact directory, or the .onnx and its data)."""
        if self.is_description:
            return dict(self.description.get("files", {}))
        if self.directory is not None:
            return {
                str(p.relative_to(self.directory)): p.stat().st_size
                for p in sorted(self.directory.rglob("*"))
                if p.is_file()
            }
        assert self.onnx_path is not None
        files = {self.onnx_path.name: self.onnx_path.stat().st_size}
        for location in sorted(_external_locations(self.model)):
            path = self.onnx_path.parent / location
            if path.is_file():
                files[location] = path.stat().st_size
        return files


def tensor_digest(array: np.ndarray, dtype: str, shape: tuple[int, ...]) -> str:
    hasher = hashlib.sha256(f"{dtype}{list(shape)}".encode())
    hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()[:16]


def _stored(tensor: ir.ExternalTensor) -> tuple[Path, np.dtype, int]:
    """Where an external tensor's bytes are, the element type they are read as (4-bit types as
    packed uint8, two per byte) and how many bytes there are."""
    dtype = np.dtype(np.uint8) if tensor.dtype in _PACKED else np.dtype(tensor.dtype.numpy())
    return Path(tensor.base_dir) / tensor.location, dtype, tensor.length or tensor.nbytes


def _read_external(tensor: ir.ExternalTensor, label: str) -> np.ndarray:
    """Read straight into the array that is returned: one copy of the bytes, never two."""
    path, dtype, length = _stored(tensor)
    shape = (length,) if tensor.dtype in _PACKED else tuple(tensor.shape.numpy())
    array = np.empty(shape, dtype=dtype)
    with open(path, "rb") as handle:
        handle.seek(tensor.offset or 0)
        read = handle.readinto(memoryview(array).cast("B"))
    if read != length or array.nbytes != length:
        raise AqexportError(f"'{label}': external data '{tensor.location}' is truncated", "rebuild the artifact")
    return array


def _external_locations(model: ir.Model) -> set[str]:
    return {
        value.const_value.location
        for graph in (model.graph, *subgraphs(model.graph))
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }


def subgraphs(graph: ir.Graph) -> list[ir.Graph]:
    """Graphs nested in node attributes (If/Loop/Scan bodies), depth first."""
    found: list[ir.Graph] = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found.append(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                found.extend(attr.value)
    return found
