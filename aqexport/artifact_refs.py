"""Refuse an artifact whose files point outside its directory, before anything opens them.

An artifact is a directory someone may hand over (a CI download, a shared model folder), and two
of its files name other files the runtime then opens: ``model.onnx``'s external-data
``location`` of each initializer, and ``genai_config.json``'s ``model.decoder.filename``. A
``../`` or absolute path there reads a file outside the artifact: ``aqexport diff`` would hash
and compare its bytes, onnxruntime-genai would load it as the model. ONNX Runtime refuses such
external data itself, but as a raw exception halfway through ``run``. ``manifest.json``'s own
paths are checked by ``aqexport.integrity``; this covers what the manifest cannot (an artifact
without one, or one whose author wrote the manifest too).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from aqexport.errors import ConfigError

__all__ = ["check_artifact_references", "escapes"]

_FIX = "rebuild the artifact with 'aqexport build': it keeps every file its graph names beside model.onnx"


def escapes(location: str, directory: Path) -> bool:
    """Whether ``location`` (relative to ``directory``) names a file outside ``directory``."""
    if not location or PurePosixPath(location).is_absolute() or Path(location).is_absolute():
        return True
    base = Path(directory).resolve()
    target = (base / location).resolve()
    return base != target and base not in target.parents


def _external_locations(model_path: Path) -> list[str]:
    """Every external-data ``location`` of the graph's initializers (and its subgraphs')."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning or ValueError by version
        raise ConfigError(
            f"'{model_path}' is not a readable ONNX model ({type(exc).__name__})",
            "the file is corrupt or truncated: rebuild it or copy it again",
        ) from None
    graphs, locations = [model.graph], []
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                locations += [entry.value for entry in tensor.external_data if entry.key == "location"]
        for node in graph.node:
            for attribute in node.attribute:
                graphs += [attribute.g] if attribute.HasField("g") else []
                graphs += list(attribute.graphs)
    return sorted(set(locations))


def check_artifact_references(directory: Path) -> None:
    """``ConfigError`` naming the first file ``directory``'s graph or genai config points to
    outside ``directory``."""
    directory = Path(directory)
    model = directory / "model.onnx"
    if model.is_file():
        for location in _external_locations(model):
            if escapes(location, directory):
                raise ConfigError(
                    f"'{model}' reads external data from '{location}', outside the artifact directory", _FIX
                )
    genai = directory / "genai_config.json"
    if genai.is_file():
        try:
            filename = json.loads(genai.read_text())["model"]["decoder"]["filename"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # not ours to parse: onnxruntime-genai reports a malformed config itself
        if isinstance(filename, str) and escapes(filename, directory):
            raise ConfigError(f"'{genai}' names the model file '{filename}', outside the artifact directory", _FIX)
