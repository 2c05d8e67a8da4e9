"""Opening what the user named on the command line as a :class:`GraphSide`.

Separate from ``side`` so that the description reader (which builds a side of its own) and the
side type do not import each other: ``opening`` knows every kind of side, ``side`` none.
Every way opening can fail is one ``AqexportError`` naming the file and the fix (exit status 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx_ir as ir

from aqexport.artifact_refs import escapes
from aqexport.diff.description import load_description
from aqexport.diff.side import GraphSide, subgraphs
from aqexport.errors import AqexportError

__all__ = ["MODEL_FILE", "open_side"]

MODEL_FILE = "model.onnx"


def open_side(spec: str | Path) -> GraphSide:
    """Open what the user named: an artifact directory, a ``.onnx`` file, or a ``.json``
    graph description. Every way this can fail is one ``AqexportError`` (exit status 2)."""
    path = Path(spec)
    label = str(spec)
    if not path.exists():
        raise AqexportError(f"'{path}' does not exist", "pass an artifact directory, a .onnx file or a description")
    if path.is_dir():
        onnx_path = path / MODEL_FILE
        if not onnx_path.is_file():
            raise AqexportError(
                f"'{path}' is not an artifact directory (no {MODEL_FILE})",
                "pass the output directory of 'aqexport build' or a .onnx file",
            )
        return GraphSide(
            label=label,
            model=_load_onnx(onnx_path, label),
            directory=path,
            onnx_path=onnx_path,
            manifest=_read_json(path / "manifest.json", label),
            report=_read_json(path / "report.json", label),
        )
    if path.suffix == ".json":
        return load_description(path, label)
    return GraphSide(label=label, model=_load_onnx(path, label), directory=None, onnx_path=path)


def _load_onnx(path: Path, label: str) -> ir.Model:
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning or ValueError by version
        raise AqexportError(
            f"'{label}' is not a readable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
            "the file is corrupt or truncated: rebuild it or copy it again",
        ) from None
    _check_external_data(model, path, label)
    return model


def _check_external_data(model: ir.Model, path: Path, label: str) -> None:
    """Every external tensor's file must exist and hold its bytes: a missing or short
    ``model.onnx.data`` is reported here, by name, not as a crash in the middle of a diff."""
    sizes: dict[str, int] = {}
    for graph in (model.graph, *subgraphs(model.graph)):
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            location = tensor.location
            if location not in sizes:
                if escapes(location, path.parent):
                    raise AqexportError(
                        f"'{label}' reads external data from '{location}', outside its directory",
                        "diff artifacts built by 'aqexport build': they keep their data beside model.onnx",
                    )
                file = path.parent / location
                if not file.is_file():
                    raise AqexportError(
                        f"'{label}' references external data '{location}', which is missing",
                        f"copy '{location}' beside '{path.name}' (an artifact ships both files)",
                    )
                sizes[location] = file.stat().st_size
            end = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
            if end > sizes[location]:
                raise AqexportError(
                    f"'{label}': external data '{location}' is truncated ({sizes[location]} bytes, "
                    f"initializer '{value.name}' ends at byte {end})",
                    "the file is incomplete: rebuild the artifact or copy it again",
                )


def _read_json(path: Path, label: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AqexportError(f"'{label}': {path.name} is not valid JSON ({exc})", "rebuild the artifact") from None
