"""``aqexport diff A B``: a quantization-aware graph diff that CI can gate on.

One report (``docs/diff-schema.md``) built from independent sections, each in its own module:

* ``side`` — opening A and B (artifact directory, ``.onnx``, or a golden description) with
  weights left on disk;
* ``align`` — pairing nodes, values and initializers (by name, structure, position);
* ``structure`` — nodes, ops, opsets, I/O, initializers, sizes;
* ``linears`` — per linear: scheme, dequantized-weight SQNR, scale drift, outliers, transforms;
* ``execution`` — ``--run``: both models on the same inputs, first divergent tensor, perplexity;
* ``policy`` / ``render`` — the gate and the terminal / markdown views.

This module only composes them, so each can be tested and replaced alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aqexport.diff.align import align
from aqexport.diff.opening import open_side
from aqexport.diff.side import GraphSide
from aqexport.diff.structure import bytes_by_dtype, compare_structure

__all__ = ["REPORT_SCHEMA", "REPORT_VERSION", "diff", "open_side"]

REPORT_SCHEMA = "aqexport.diff"
REPORT_VERSION = 1


def diff(
    a: GraphSide,
    b: GraphSide,
    *,
    run: bool = False,
    text: Path | None = None,
    windows: int = 4,
    seqlen: int = 256,
    threshold_db: float = 20.0,
    provider: str = "cpu",
) -> dict[str, Any]:
    from aqexport.diff.linears import compare_linears

    alignment = align(a, b)
    structure = compare_structure(a, b, alignment)
    linears = compare_linears(a, b)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "a": _side_summary(a),
        "b": _side_summary(b),
        "identical": False,
        "alignment": alignment.summary(),
        "structure": structure,
        "linears": linears,
        "run": None,
        "mobile": _mobile(a, b),
        "policy": None,
    }
    if run:
        from aqexport.diff.execution import compare_execution

        report["run"] = compare_execution(
            a,
            b,
            alignment.value_pairs(),
            text=text,
            windows=windows,
            seqlen=seqlen,
            threshold_db=threshold_db,
            provider=provider,
        )
    report["identical"] = is_identical(report)
    return report


def is_identical(report: dict[str, Any]) -> bool:
    """No structural, I/O, initializer or linear difference, and (with ``--run``) identical
    logits. File sizes and names of files are not compared: the graph is what ships."""
    structure = report["structure"]
    nodes, inits = structure["nodes"], structure["initializers"]
    io = structure["io"]
    if any(nodes[key] for key in ("added", "removed", "changed")):
        return False
    if any(inits[key] for key in ("added", "removed", "renamed", "changed")):
        return False
    if any(io[side][key] for side in ("inputs", "outputs") for key in ("added", "removed", "renamed", "changed")):
        return False
    if structure["opsets"]["a"] != structure["opsets"]["b"] or report["alignment"]["renamed"]:
        return False
    summary = report["linears"].get("summary", {})
    if any(summary.get(key) for key in ("changed", "only_a", "only_b")):
        return False
    run = report.get("run")
    if run and not (run.get("logits") or {}).get("identical", False):
        return False
    return True


def _side_summary(side: GraphSide) -> dict[str, Any]:
    files = side.file_sizes()
    kind = "description" if side.is_description else "artifact" if side.directory is not None else "onnx"
    return {
        "label": side.label,
        "kind": kind,
        "files": files,
        "total_bytes": sum(files.values()),
        "bytes_by_dtype": bytes_by_dtype(side),
    }


def _mobile(a: GraphSide, b: GraphSide) -> dict[str, Any] | None:
    """Each mobile EP's verdict side by side, from the builds' reports (ONNX Runtime's
    usability checker ran at build time); ops that B newly leaves to the CPU are named."""
    verdicts = [_verdicts(side) for side in (a, b)]
    if not any(verdicts):
        return None
    va, vb = (v or {} for v in verdicts)
    newly = {}
    for ep, verdict in vb.items():
        before = set(va.get(ep, {}).get("unsupported_ops", []))
        added = sorted(set(verdict.get("unsupported_ops", [])) - before)
        if added:
            newly[ep] = added
    return {"a": va, "b": vb, "newly_unsupported": newly}


def _verdicts(side: GraphSide) -> dict[str, Any] | None:
    providers = ((side.report or {}).get("mobile") or {}).get("execution_providers")
    if not providers:
        return None
    keys = ("nodes", "supported_nodes", "fraction", "partitions", "unsupported_ops", "verdict")
    return {ep: {k: v[k] for k in keys if k in v} for ep, v in providers.items() if "verdict" in v}
