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
relative) are applied by the caller. The graphs are run from in-memory protos, so this is
skipped for models near protobuf's 2 GB limit (the report says so).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx_ir.passes import common as common_passes

from aqexport.calibrate.plan import QuantPlan
from aqexport.passes import FoldAffinePass, StableNamesPass
from aqexport.passes.float_weights import FloatWeightsPass
from aqexport.runtime import decoder_for
from aqexport.verify import compare_logits

__all__ = ["FpLadder"]

PROTO_LIMIT_BYTES = 1_800_000_000


def _prefill_logits(proto_bytes: bytes, prompt: list[int]) -> np.ndarray:
    session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    decoder = decoder_for(session)
    ids = np.asarray([prompt], dtype=np.int64)
    logits, _ = decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
    return logits


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


class FpLadder:
    """Taken in two steps because the exported graph's initializers share memory with the
    PyTorch parameters, which calibration overwrites with fake-quant values: the float graph is
    copied (and its rung run) *before* calibration, folded after it."""

    def __init__(self, graph: ir.Model, prompt: list[int], eager_logits: np.ndarray) -> None:
        self.prompt, self.eager_logits = prompt, eager_logits
        size = _initializer_bytes(graph)
        self.proto = None
        self.report: dict[str, Any] = {"prompt_tokens": len(prompt)}
        if size > PROTO_LIMIT_BYTES:
            self.report["skipped"] = f"{size / 2**30:.1f} GiB of weights is too large to run from memory"
            return
        self.proto = ir.serde.serialize_model(graph)
        self.exported_logits = _prefill_logits(self.proto.SerializeToString(), prompt)
        self.report["exported_fp_vs_eager"] = compare_logits(self.exported_logits, eager_logits)

    def fold(
        self, plan: QuantPlan, weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """The folded fp rung from the float copy; returns the ladder's report."""
        if self.proto is None:
            return self.report
        folded_model = ir.serde.deserialize_model(self.proto)
        self.proto = None
        passes = (
            StableNamesPass(),
            FoldAffinePass(plan),
            FloatWeightsPass(weights, biases),
            common_passes.RemoveUnusedNodesPass(),  # drops the replaced weights too
        )
        for graph_pass in passes:
            graph_pass(folded_model)
        folded = _prefill_logits(ir.serde.serialize_model(folded_model).SerializeToString(), self.prompt)
        self.report["folded_fp_vs_eager"] = compare_logits(folded, self.eager_logits)
        self.report["folded_fp_vs_exported_fp"] = compare_logits(folded, self.exported_logits)
        return self.report
