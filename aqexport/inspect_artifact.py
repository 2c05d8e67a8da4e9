"""What is in an artifact: op histogram, sizes, I/O, quantization summary.

Reads the graph with ``onnx_ir`` so external weights stay on disk (lazy tensors): inspecting a
multi-GB artifact costs the size of its graph, not of its weights.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import onnx_ir as ir

from aqexport.artifact import MODEL_FILE
from aqexport.errors import AqexportError

__all__ = ["QUANT_OPS", "inspect_artifact"]

QUANT_OPS = frozenset(
    {
        "MatMulNBits",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulInteger",
        "GatherBlockQuantized",
    }
)


def _io(values) -> list[dict[str, Any]]:
    return [
        {
            "name": v.name,
            "dtype": str(v.dtype) if v.dtype is not None else None,
            "shape": [str(d) for d in v.shape] if v.shape is not None else None,
        }
        for v in values
    ]


def inspect_artifact(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MODEL_FILE if directory.is_dir() else directory
    if not path.is_file():
        raise AqexportError(f"no {MODEL_FILE} in '{directory}'", "pass an artifact directory")
    model = ir.load(path)
    ops = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.all_nodes()
    )
    weight_bytes = collections.Counter()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            weight_bytes[str(tensor.dtype)] += tensor.nbytes
    files = {p.name: p.stat().st_size for p in sorted(path.parent.iterdir()) if p.is_file()}
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return {
        "model": str(path),
        "opset": {domain or "ai.onnx": version for domain, version in model.opset_imports.items()},
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "initializers": len(model.graph.initializers),
        "weight_bytes_by_dtype": dict(weight_bytes),
        "files": files,
        "total_bytes": sum(files.values()),
        "inputs": _io(model.graph.inputs),
        "outputs": _io(model.graph.outputs),
        "quantization": {
            "recipe": manifest.get("quantization", {}).get("recipe", "unknown"),
            "quant_ops": {op: n for op, n in ops.items() if op.split("::")[-1] in QUANT_OPS},
        },
        "transforms": _transform_cost(manifest),
    }


def _transform_cost(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What the norm-side transforms cost per token at run time (``FoldAffinePass``'s record:
    total FLOPs and float32 bytes, how many are explicit, their forms); ``None`` without one."""
    for record in manifest.get("passes", []):
        stats = record.get("stats", {})
        if record.get("pass") == "FoldAffinePass" and "run_time_cost" in stats:
            forms = collections.Counter(t["form"] for t in stats.get("transforms", {}).values())
            return {**stats["run_time_cost"], "forms": dict(forms), "placements": stats.get("placements", {})}
    return None
