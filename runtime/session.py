"""ONNX Runtime sessions from an ordered list of short provider names, with honest reporting.

ONNX Runtime silently drops a requested execution provider that the installed build lacks and
runs on the CPU instead. A user benchmarking "on XNNPACK" deserves to know that happened, so
``create_session`` returns what was requested, what this build offers, and what the session
actually uses; ``strict=True`` turns a silent fallback into an error.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnxruntime as ort

from aqexport.errors import AqexportError
from aqexport.runtime.static_decoder import PREFILL_FILE

__all__ = ["PROVIDER_NAMES", "SessionInfo", "create_session", "prefill_session"]

logger = logging.getLogger(__name__)

PROVIDER_NAMES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
}


@dataclass
class SessionInfo:
    requested: list[str]
    available: list[str]
    used: list[str]
    unavailable: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _declared_quantization(model_path: Path) -> dict:
    """The manifest's quantization section (accuracy level, weight format); empty without one."""
    manifest = model_path.parent / "manifest.json"
    if not manifest.is_file():
        return {}
    return json.loads(manifest.read_text()).get("quantization", {})


def session_options(
    accuracy_level: int, weight_format: str | None, intra_op_threads: int | None = None
) -> ort.SessionOptions:
    """The options every session on an artifact needs, whichever way the model is loaded (a
    path here, serialized bytes in ``aqexport diff --run``)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT rewrites a QDQ weight (DequantizeLinear → MatMul) into MatMulNBits at this accuracy
    # level, 4 (int8 activations) unless told: use the level the artifact was built for.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if weight_format == "qdq8":
        # 2-4-bit codes in 8-bit tensors (npu profile): ORT would fuse them into 8-bit MatMulNBits, which
        # at level 0 dequantizes the whole matrix on every call (SmolLM2 npu int4: 6 tok/s).
        # Without the QDQ fusions the constant DequantizeLinear is folded once at load: exact,
        # 40 tok/s, float weights in memory (a device's EP takes the QDQ form itself).
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    threads = intra_op_threads or int(os.environ.get("AQEXPORT_THREADS", "0"))
    if threads:
        options.intra_op_num_threads = threads
    return options


def genai_facts(directory: Path | None) -> tuple[int | None, str | None]:
    """The head size and KV contract from ``genai_config.json``: graphs from the genai model builder
    leave the head size symbolic in their KV inputs (``kv_cache_dim``) and declare no contract
    in their metadata, so running them needs both from there. ``None`` where not stated (our
    artifacts declare both in the graph)."""
    genai_file = None if directory is None else Path(directory) / "genai_config.json"
    if genai_file is None or not genai_file.is_file():
        return None, None
    genai = json.loads(genai_file.read_text())
    shared = genai.get("search", {}).get("past_present_share_buffer")
    return genai["model"]["decoder"].get("head_size"), "shared_buffer" if shared else None


def create_session(
    model_path: str | Path,
    providers: tuple[str, ...] | list[str] = ("cpu",),
    *,
    intra_op_threads: int | None = None,
    strict: bool = False,
    accuracy_level: int | None = None,
    weight_format: str | None = None,
) -> tuple[ort.InferenceSession, SessionInfo]:
    """Open ``model_path`` on the first available providers of ``providers``, CPU last.
    ``accuracy_level`` / ``weight_format``: what the artifact was built with; by default what its
    manifest declares (a build verifies before it writes the manifest, so it passes them)."""
    unknown = [p for p in providers if p not in PROVIDER_NAMES]
    if unknown:
        raise AqexportError(
            f"unknown execution provider(s) {unknown}",
            f"use some of: {', '.join(PROVIDER_NAMES)}",
        )
    path = Path(model_path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise AqexportError(f"no ONNX model at '{path}'", "pass an artifact directory built by aqexport")
    available = ort.get_available_providers()
    wanted = [PROVIDER_NAMES[p] for p in providers]
    unavailable = [name for name in wanted if name not in available]
    if unavailable and strict:
        raise AqexportError(
            f"execution provider(s) {unavailable} not in this onnxruntime build ({available})",
            "install the onnxruntime package that ships them, or drop them from --provider",
        )
    chosen = [name for name in wanted if name in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    declared = _declared_quantization(path) if accuracy_level is None or weight_format is None else {}
    if accuracy_level is None:
        accuracy_level = int(declared.get("accuracy_level", 0) or 0)
    options = session_options(accuracy_level, weight_format or declared.get("weight_format"), intra_op_threads)
    session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    info = SessionInfo(
        requested=wanted, available=list(available), used=session.get_providers(), unavailable=unavailable
    )
    if unavailable:
        logger.warning("providers %s unavailable; running on %s", unavailable, info.used)
    return session, info


def prefill_session(
    model_path: str | Path,
    providers: tuple[str, ...] | list[str] = ("cpu",),
    *,
    intra_op_threads: int | None = None,
    accuracy_level: int | None = None,
    weight_format: str | None = None,
) -> ort.InferenceSession | None:
    """The prefill graph of the npu artifact at ``model_path`` (``PREFILL_FILE`` beside its
    ``model.onnx``), opened as ``create_session`` opens the step graph; ``None`` if it has none."""
    path = Path(model_path)
    prefill = (path if path.is_dir() else path.parent) / PREFILL_FILE
    if not prefill.is_file():
        return None
    options = {"intra_op_threads": intra_op_threads, "accuracy_level": accuracy_level, "weight_format": weight_format}
    return create_session(prefill, providers, **options)[0]
