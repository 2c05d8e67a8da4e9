"""The mobile and npu artifacts' extra outputs: ``model.ort``, the reduced build's operator
config, and each NPU EP's verdict on the static graph.

* ``model.ort`` is ONNX Runtime's own format for mobile builds (``onnxruntime-mobile`` and any
  minimal build load only it). The format has no external data: every initializer, however
  large, is inlined into the one flatbuffer, so the file is about the size of ``model.onnx``
  plus ``model.onnx.data`` (the 4-bit weights are already ``uint8`` tensors, which it stores).
  Two styles, both as ``onnxruntime.tools.convert_onnx_models_to_ort`` writes them:

  - **mobile** (``write_ort_for_cpu``): the tool's *Fixed* style at level *all* for
    ``target_platform arm`` (no NCHWc layout, ``session.qdqisint8allowed``): every CPU EP
    optimization is baked in, because a minimal build cannot run the optimizers at load time.
    Beside it, ``required_operators_and_types.config``: the (domain, opset, operator, types)
    the ``.ort`` holds, the file ONNX Runtime's reduced build takes
    (``build.sh --minimal_build --include_ops_by_config required_operators_and_types.config
    --enable_reduced_operator_type_support``). That build, which compiles ONNX Runtime for the
    phone with only those kernels, is **not** done here: it needs ONNX Runtime's source, the
    Android NDK / Xcode toolchain and hours of compiling. The build checks what it can: the
    ``.ort`` loads in a (full) ONNX Runtime session and gives ``model.onnx``'s logits and
    tokens, and the config lists every operator of the ``.ort`` graph (tests). Optimizations
    at level *all* can depend on the converting machine's CPU in principle; this graph is
    already fused into contrib ops, and on it ORT adds ``QuickGelu`` (x·sigmoid(x)).
  - **npu** (``write_ort_format``): a session at *basic* optimization level. Basic keeps every
    node an EP could claim (QDQ units stay QDQ), so NNAPI / CoreML can still partition the
    ``.ort`` on the device; the CPU-only fusions happen at load time there.

  Neither ``.ort`` is byte-reproducible: ONNX Runtime writes one table of the file in an order
  that changes from save to save (same size, same operators), so the manifest lists
  ``model.ort`` under ``not_reproducible``.
* The verdicts are ONNX Runtime's usability checker (``onnxruntime.tools.mobile_helpers``), per
  EP: nodes it would assign, partitions, unsupported op types. The checker judges op types and
  static shapes from its published support tables; it does not run the EP, so the figures say
  the graph is eligible, not how fast the EP runs it.
* QNN has no checker table; its verdict is a real compile instead (``qnn_verdict``): the
  ``onnxruntime-qnn`` plugin EP (Qualcomm's QNN SDK libraries in a PyPI wheel, x86-64 Linux
  included) prepares the graph for the Hexagon NPU (HTP backend, offline context generation,
  ``QNN_TARGET``) on this host, and the nodes it leaves outside its ``EPContext`` partitions are
  the ones the phone's CPU would run. Graph optimizations are off, so the counts are the
  graph's own nodes. QNN EP hands the graph inputs' ``QuantizeLinear`` to the CPU by design
  (``offload_graph_io_quantization``). It is a compile, not a device run: speed and on-device
  numerics are not measured. Without the wheel the entry says how to get the verdict.
* XNNPACK is reported as available or not in the installed onnxruntime (the PyPI CPU wheel has
  no XNNPACK EP; mobile packages do).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from onnxruntime.tools.mobile_helpers import usability_checker
from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo
from onnxruntime.tools.ort_format_model import create_config_from_models
from onnxruntime.tools.reduced_build_config_parser import parse_config

__all__ = [
    "OPERATOR_CONFIG",
    "QNN_TARGET",
    "ep_usability",
    "operator_config_entries",
    "qnn_verdict",
    "write_ort_for_cpu",
    "write_ort_format",
]

#: The reduced build's operator config, named as ``convert_onnx_models_to_ort`` names it for a
#: directory (with ``--enable_type_reduction``).
OPERATOR_CONFIG = "required_operators_and_types.config"

logger = logging.getLogger(__name__)

#: The NPU the QNN verdict compiles for: Snapdragon 8 Gen 3 (SM8650, Hexagon HTP v75), a 2024
#: flagship; ``prepare_only`` compiles the context binary without running it (this host has no NPU).
QNN_TARGET = {"htp_arch": "75", "soc_model": "57", "enable_htp_prepare_only": "1"}
QNN_EP = "QNNExecutionProvider"

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


def write_ort_for_cpu(onnx_path: Path, ort_path: Path) -> tuple[Path, Path]:
    """``model.ort`` fully optimized for an ARM CPU EP, and its operator config beside it (in
    the same directory, named ``OPERATOR_CONFIG``); the converter's own session settings."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(ort_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.add_session_config_entry("session.qdqisint8allowed", "1")  # the tool's target_platform arm
    ort.InferenceSession(
        str(onnx_path),
        sess_options=options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["NchwcTransformer"],
    )
    config = ort_path.with_name(OPERATOR_CONFIG)
    create_config_from_models([ort_path], config, enable_type_reduction=True)
    # the tool names the model by its absolute path (here a staging directory): name the file
    text = config.read_text().replace(f"# - {ort_path}\n", f"# - {ort_path.name}\n")
    config.write_text(text)
    return ort_path, config


def operator_config_entries(config: Path) -> set[tuple[str, str]]:
    """(domain, operator) pairs an operator config lists, read by ONNX Runtime's own parser
    (the one its reduced build uses), the ONNX domain as ``""`` (the config writes ``ai.onnx``)."""
    required, _types = parse_config(str(config), enable_type_reduction=True)
    return {
        ("" if domain == "ai.onnx" else domain, op)
        for domain, opsets in required.items()
        for ops in opsets.values()
        for op in ops
    }


def ep_usability(onnx_path: Path, compile_qnn: bool = True) -> dict[str, Any]:
    """Each EP's verdict on the graph at ``onnx_path``. ``compile_qnn``: give QNN's (a compile
    that takes minutes on a real model: SmolLM2's step graph 3.6 min here), else say how to."""
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
    report["qnn"] = (
        qnn_verdict(onnx_path)
        if compile_qnn
        else {
            "checked": False,
            "reason": "compiled for target.npu: qnn only (minutes per graph on a real model); "
            "build with it for QNN's verdict",
        }
    )
    report["xnnpack"] = {
        "available": "XnnpackExecutionProvider" in available,
        "installed_providers": available,
    }
    return report


def _qnn_plugin() -> tuple[Any, list[Any]] | None:
    """The ``onnxruntime_qnn`` module and its plugin EP's devices, registering the library once
    per process; None without the ``onnxruntime-qnn`` wheel."""
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    devices = [device for device in ort.get_ep_devices() if device.ep_name == QNN_EP]
    if not devices:
        ort.register_execution_provider_library(QNN_EP, onnxruntime_qnn.get_library_path())
        devices = [device for device in ort.get_ep_devices() if device.ep_name == QNN_EP]
    return onnxruntime_qnn, devices


def qnn_verdict(onnx_path: Path) -> dict[str, Any]:
    """What the QNN EP's HTP backend takes of the graph, by compiling it (``QNN_TARGET``): the
    nodes left outside its partitions run on the CPU EP."""
    plugin = _qnn_plugin()
    if plugin is None:
        return {
            "checked": False,
            "reason": "ONNX Runtime's usability checker has no QNN table, and the QNN EP is not installed: "
            "`pip install onnxruntime-qnn` (Qualcomm's QNN SDK as an ONNX Runtime plugin; x86-64 Linux and "
            "Windows wheels compile for the NPU offline) and rebuild to get the verdict",
        }
    onnxruntime_qnn, devices = plugin
    nodes = len(onnx.load(str(onnx_path), load_external_data=False).graph.node)
    with tempfile.TemporaryDirectory(prefix="aqexport-qnn-") as folder:
        context = Path(folder) / "model_ctx.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_file_path", str(context))
        options.add_provider_for_devices(devices, {"backend_path": onnxruntime_qnn.get_qnn_htp_path(), **QNN_TARGET})
        try:
            ort.InferenceSession(str(onnx_path), sess_options=options)
        except Exception as error:  # noqa: BLE001 - the compile's failure is the verdict
            return {
                "checked": True,
                "compiled": False,
                "verdict": "compile failed",
                "error": str(error)[:500],
                **_qnn_about(onnxruntime_qnn),
            }
        compiled = onnx.load(str(context), load_external_data=False).graph.node
    left = [node for node in compiled if node.op_type != "EPContext"]
    left_ops = Counter(f"{node.domain or 'ai.onnx'}:{node.op_type}" for node in left)
    return {
        "checked": True,
        "compiled": True,
        "verdict": "compiled",
        "nodes": nodes,
        "supported_nodes": nodes - len(left),
        "fraction": (nodes - len(left)) / nodes if nodes else 0.0,
        "partitions": len(compiled) - len(left),
        "unsupported_ops": sorted(left_ops),
        "left_on_cpu": dict(sorted(left_ops.items())),
        **_qnn_about(onnxruntime_qnn),
    }


def _qnn_about(onnxruntime_qnn: Any) -> dict[str, Any]:
    return {
        "how": f"onnxruntime-qnn {onnxruntime_qnn.__version__}: HTP backend, offline context generation for "
        f"htp_arch {QNN_TARGET['htp_arch']} / soc_model {QNN_TARGET['soc_model']} (Snapdragon 8 Gen 3) on this "
        "host, graph optimizations off; a compile, not a device run",
    }
