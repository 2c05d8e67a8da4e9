"""Check a GGUF file before transformers reads it.

transformers reads a GGUF in two passes (its config, then every tensor de-quantized), and
fails in either with whatever the ``gguf`` package raised: a file cut short by an interrupted
download is "cannot reshape array of size 66784 into shape (576,360)" reported as a bad model
config, or a ``struct.error`` traceback when the cut falls in the header; a tensor of a type
``gguf`` cannot de-quantize (``Q8_1``, ``I32``, ``F64``, a type newer than the installed
package) fails after minutes of de-quantizing the tensors before it. ``check_gguf`` finds both
in a fraction of a second (the reader maps the file; one row per tensor type is de-quantized)
and says which file, which tensor and what to do.
"""

from __future__ import annotations

from pathlib import Path

from aqexport.errors import ConfigError

__all__ = ["check_gguf"]

_MAGIC = b"GGUF"
_REQUANTIZE = (
    "re-quantize the model to a supported type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or a K-quant, "
    "e.g. with llama.cpp's llama-quantize), or use its Hugging Face folder"
)
_AGAIN = "download or copy the file again (an interrupted transfer leaves it short)"


def check_gguf(path: Path) -> None:
    """``ConfigError`` if ``path`` is not a complete GGUF whose every tensor type the installed
    ``gguf`` package can de-quantize."""
    from gguf import GGUFReader, dequantize

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"GGUF file '{path}' not found", "set model.gguf_file to a .gguf file in model.source's folder"
        )
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(len(_MAGIC))
    if magic != _MAGIC:
        raise ConfigError(
            f"'{path}' is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r})",
            "point model.source at a llama.cpp .gguf file, or at a Hugging Face model folder",
        )
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct.error... by where it stops
        if "GGMLQuantizationType" in str(exc):  # a type code newer than the installed gguf package
            raise ConfigError(
                f"GGUF file '{path}' holds a tensor type the installed gguf package does not know ({exc})",
                f"upgrade gguf (pip install -U gguf), or {_REQUANTIZE}",
            ) from None
        raise ConfigError(
            f"GGUF file '{path}' is truncated or corrupt ({size} bytes; reading it failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})",
            _AGAIN,
        ) from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ConfigError(
                f"GGUF file '{path}' is truncated: tensor '{tensor.name}' ends at byte {end}, the file has {size}",
                _AGAIN,
            )
    checked = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind in checked:
            continue
        data = tensor.data
        row = data.reshape(-1, data.shape[-1])[:1] if data.ndim else data
        try:
            dequantize(row, kind)
        except NotImplementedError:
            raise ConfigError(
                f"GGUF file '{path}': tensor '{tensor.name}' has type {kind.name}, which the installed gguf "
                "package cannot de-quantize",
                _REQUANTIZE,
            ) from None
        checked.add(kind)
