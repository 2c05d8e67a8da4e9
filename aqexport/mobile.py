"""The mobile artifact's extra outputs: ``model.ort`` and each mobile EP's verdict on the graph.

* ``model.ort`` is ONNX Runtime's own format for mobile builds (``onnxruntime-mobile`` loads
  only it). It is written the way ``onnxruntime.tools.convert_onnx_models_to_ort`` writes its
  portable ("fixed") style: a session at *basic* optimization level saves the model in ORT
  format. Basic keeps every node an EP could claim (QDQ units stay QDQ), so NNAPI / CoreML can
  still partition the ``.ort`` on the device; the CPU-only fusions happen at load time there.
* The verdicts are ONNX Runtime's usability checker (``onnxruntime.tools.mobile_helpers``), per
  EP: nodes it would assign, partitions, unsupported op types. The checker judges op types and
  static shapes from its published support tables; it does not run the EP, so the figures say
  the graph is eligible, not how fast the EP runs it.
* XNNPACK is reported as available or not in the installed onnxruntime (the PyPI CPU wheel has
  no XNNPACK EP; mobile packages do).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnxruntime as ort
from onnxruntime.tools.mobile_helpers import usability_checker
from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo

__all__ = ["ep_usability", "write_ort_format"]

logger = logging.getLogger(__name__)

_CHECKS = {
    "nnapi": lambda model: usability_checker.check_nnapi_partitions(model, require_fixed_input_sizes=True),
    "coreml_mlprogram": lambda model: usability_checker.check_coreml_partitions(
        model, require_fixed_input_sizes=True, config_filename="coreml_supported_mlprogram_ops.md"
    ),
    "coreml_neuralnetwork": lambda model: usability_checker.check_coreml_partitions(
        model, require_fixed_input_sizes=True, config_filename="coreml_supported_neuralnetwork_ops.md"
    ),
}


def write_ort_format(onnx_path: Path, ort_path: Path) -> Path:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(ort_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    return ort_path


def ep_usability(onnx_path: Path) -> dict[str, Any]:
    model = ModelProtoWithShapeInfo(onnx_path).model_with_shape_info
    report: dict[str, Any] = {}
    for name, check in _CHECKS.items():
        info = check(model)
        report[name] = {
            "nodes": info.num_nodes,
            "supported_nodes": info.num_supported_nodes,
            "fraction": info.num_supported_nodes / info.num_nodes if info.num_nodes else 0.0,
            "partitions": info.num_partitions,
            "unsupported_ops": sorted(info.unsupported_ops),
            "verdict": info.suitability().name,
        }
    available = ort.get_available_providers()
    report["xnnpack"] = {
        "available": "XnnpackExecutionProvider" in available,
        "installed_providers": available,
    }
    return report
