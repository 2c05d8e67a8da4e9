"""The float rungs of a quantized build's parity ladder: HF eager → exported fp → folded fp.

A quantized artifact differs from its float model for two reasons: quantization (intended) and
mistakes in how the transforms were put into the graph (bugs). Verification compares the
artifact with the PyTorch fake-quant model, which catches lowering mistakes *given the plan*;
these rungs catch the rest, before any rounding:

* **exported fp**: the captured graph against the Hugging Face model in eager mode;
* **folded fp**: the same graph after ``FoldAffinePass`` with the transformed but unquantized
  weights (``FloatWeightsPass``). Every transform is invertible, so this must still compute
  the float model: the build's check that the algebra of ``fold.py`` and the graph agree.

Both are prefill logits of the evaluation prompt on ONNX Runtime's CPU EP; thresholds (1e-4
relative) are applied by the caller. Each graph runs in a session of its own, which holds a
copy of the weights: skipped above ``PROTO_LIMIT_BYTES`` of weights (the report says so).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes import common as common_passes

from aqexport import heap
from aqexport.calibrate.fold import FoldedWeights
from aqexport.calibrate.plan import QuantPlan
from aqexport.passes import FoldAffinePass, StableNamesPass
from aqexport.passes.float_weights import FloatWeightsPass
from aqexport.runtime import decoder_for
from aqexport.verify import compare_logits

__all__ = ["FpLadder"]

PROTO_LIMIT_BYTES = 1_800_000_000


def _prefill_logits(model: ir.Model, prompt: list[int]) -> np.ndarray:
    """The graph goes to ONNX Runtime as a file with external data in a temporary folder, written
    straight from the tensors: an in-memory proto would hold two more copies of every weight (the
    proto and its serialized bytes) beside the session's own (SmolLM2: +1.6 GiB at the peak).

    The session runs the graph as written: no graph optimization (which builds fused and folded
    copies of initializers beside the originals), no pre-packed weights, no memory arena. The
    rung checks the exported graph, not ONNX Runtime's rewrite of it, and its session is the
    streamed SmolLM2 build's peak: 1519 MiB so against 1617 with the defaults (a one-off
    prefill, where the optimizations buy nothing)."""
    with tempfile.TemporaryDirectory(prefix="aqexport-ladder-") as folder:
        path = Path(folder) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        heap.trim()  # what writing the lazily read weights allocated
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
        options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        decoder = decoder_for(session)
        ids = np.asarray([prompt], dtype=np.int64)
        logits, _ = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
        del decoder, session
    heap.trim()  # the session's weights, which malloc would otherwise keep
    return logits


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


class FpLadder:
    """Taken in two steps: the exported rung before calibration, the folded one after it. The
    exported graph's initializers may share memory with the PyTorch parameters (a source that is
    not a safetensors checkpoint: ``aqexport.capture_weights``), and calibration overwrites the
    planned linears' weights and biases with fake-quant values; the folded rung
    replaces exactly those (``FloatWeightsPass``), so it runs on a clone of the exported graph
    (``ir.Model.clone``: new nodes and values, the same tensors), not on a copy of its weights."""

    def __init__(self, graph: ir.Model, prompt: list[int], eager_logits: np.ndarray) -> None:
        self.prompt, self.eager_logits = prompt, eager_logits
        size = _initializer_bytes(graph)
        self.graph: ir.Model | None = None
        self.report: dict[str, Any] = {"prompt_tokens": len(prompt)}
        #: why the folded rung will not run (``None`` while it can)
        self.why_not_folded: str | None = None
        if size > PROTO_LIMIT_BYTES:
            self.report["skipped"] = self.why_not_folded = f"{size / 2**30:.1f} GiB of weights is too large to run"
            return
        self.graph = graph
        self.exported_logits = _prefill_logits(graph, prompt)
        self.report["exported_fp_vs_eager"] = compare_logits(self.exported_logits, eager_logits)

    def fold(self, plan: QuantPlan, folded: FoldedWeights) -> dict[str, Any]:
        """The folded fp rung; returns the ladder's report. The graph's ``W'`` are computed as
        its writer reaches them, a block at a time (``FoldedWeights``)."""
        if self.graph is None:
            return self.report
        folded_model = self.graph.clone()
        self.graph = None
        weights = {path: functools.partial(folded.weight, path) for path in folded.paths}
        passes = (
            StableNamesPass(),
            FoldAffinePass(plan),
            FloatWeightsPass(weights, folded.biases),
            common_passes.RemoveUnusedNodesPass(),  # drops the replaced weights too
        )
        for graph_pass in passes:
            graph_pass(folded_model)
        folded = _prefill_logits(folded_model, self.prompt)
        self.report["folded_fp_vs_eager"] = compare_logits(folded, self.eager_logits)
        self.report["folded_fp_vs_exported_fp"] = compare_logits(folded, self.exported_logits)
        return self.report
