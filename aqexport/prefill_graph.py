"""The npu prefill graph, written beside the step graph and reading the step graph's weights file.

A static graph takes a fixed number of tokens per call. The step graph takes one, so a prompt of
n tokens costs n calls; NPU runtimes pair it with a graph that takes a chunk of the prompt per
call (Qualcomm's AR-N / AR-1 pairs, onnxruntime-genai's context / iterator pipelines). The two
graphs are the same model at two sequence lengths: lowered by the same passes from the same
plan, they hold the same weights under the same names, so the prefill graph is written with
its initializers pointing into ``model.onnx.data`` (ONNX external data: file, offset, length)
instead of a copy: the pair ships one set of weights.

Sharing is decided tensor by tensor, by name, dtype, shape *and bytes* (read back from the
written file, one tensor at a time): a tensor the two graphs hold differently (a constant that
depends on the sequence length) stays in ``prefill.onnx`` itself, and the record says how many
bytes that is. Nothing is assumed equal because it is named alike.

The ORT format (``model.ort``) has no external data, so a ``prefill.ort`` would carry its own
copy of every weight: only the step graph is converted (``aqexport.mobile``); the NPU EPs
(QNN, CoreML) load ``.onnx`` files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from aqexport.artifact import DATA_FILE, EXTERNAL_THRESHOLD_BYTES
from aqexport.runtime.static_decoder import PREFILL_FILE

__all__ = ["save_sharing_weights"]


def save_sharing_weights(prefill: ir.Model, step_path: Path) -> dict[str, Any]:
    """Write ``prefill`` as ``PREFILL_FILE`` beside ``step_path`` (a graph saved with external
    data), every initializer equal to one of the step graph's stored as a reference into its
    data file; returns what was shared and which stored tensors were not (``own_*``: tensors of
    ``EXTERNAL_THRESHOLD_BYTES`` or more that ``prefill.onnx`` holds itself)."""
    step = ir.load(step_path)  # the proto with external references: no weight is read
    stored = {
        name: value.const_value
        for name, value in step.graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    shared_bytes = 0
    own: dict[str, int] = {}
    for name, value in prefill.graph.initializers.items():
        tensor, theirs = value.const_value, stored.get(name)
        if tensor is None:
            continue
        if (
            theirs is not None
            and theirs.dtype == tensor.dtype
            and theirs.shape == tensor.shape
            and theirs.tobytes() == tensor.tobytes()
        ):
            value.const_value = ir.ExternalTensor(
                theirs.location,
                theirs.offset,
                theirs.length,
                theirs.dtype,
                shape=theirs.shape,
                name=name,
                base_dir=step_path.parent,
            )
            shared_bytes += theirs.length
        elif tensor.nbytes >= EXTERNAL_THRESHOLD_BYTES:  # smaller ones are inside both graphs' protos
            own[name] = tensor.nbytes
    path = step_path.parent / PREFILL_FILE
    ir.save(prefill, path)  # shared tensors as references, the rest inside the proto
    weights = step_path.parent / DATA_FILE
    one_graph = step_path.stat().st_size + weights.stat().st_size
    return {
        "graph": PREFILL_FILE,
        "tokens_per_call": int(prefill.graph.inputs[0].shape[1]),
        "weights_file": weights.name,
        "shared_bytes": shared_bytes,
        "own_initializers": sorted(own),
        "own_bytes": sum(own.values()),
        "bytes": path.stat().st_size,
        "pair_vs_one_graph": (one_graph + path.stat().st_size) / one_graph,
    }
