"""The build driver: data flowing through named stages.

Each stage is a plain function that takes what it needs by name and returns what it made;
``STAGES`` declares those names, and ``build`` wires them: it keeps every value made so far,
calls each stage with the ones it ``needs``, stores what it ``makes``, and drops a value once no
later stage needs it (the exported graph after lowering, the lowered graph once it is on disk),
so nothing is set by one stage and cleared by hand by another, and memory holds only what is
still to be used. Stages never call each other. The loop runs inside ``atomic_directory``, so
the artifact appears only after the last stage (verification included) succeeded.

Values available to the first stage: ``config``, ``config_dir``, ``staging`` (the temp artifact
directory), ``output_dir`` (where it will be moved), ``identity`` (``build_cache.build_identity``),
``target`` (``aqexport.target.Target``, resolved once), ``scratch`` (a temporary folder removed
when the build ends, however it ends: a streamed GGUF's float shards), ``streaming`` (whether the model is
loaded one block at a time, ``aqexport.stream_choice``, decided before the memory pre-check),
``on_block``, and ``timings`` and
``peak_rss_mib`` (filled by the loop after each stage, read by ``finalize``).

Before any stage, ``build`` takes the output directory's lock, cleans up after a build into it
that was killed (``artifact.recover_interrupted``), and returns the artifact already there if
its manifest records this build's identity and its files still match (``aqexport.build_cache``);
``force=True`` rebuilds anyway.

Reproducibility: two builds of one config on one machine write byte-identical ``model.onnx``,
``model.onnx.data``, ``genai_config.json``, tokenizer files and plan files. ``manifest.json``
keeps what is not reproducible under one key, ``not_reproducible``: the stage and pass wall
times, and the names of the files that hold measurements (``report.json``: timings,
throughput, memory; ``report.html``, the page made from it, ``aqexport.report_html``), whose
sha256 ``files`` still lists for ``aqexport verify``. Paths in the manifest
and ``report.json`` are relative to the config file's folder, never absolute.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from torch import nn

from aqexport import __version__, faults, heap
from aqexport.accuracy_level import choose_accuracy_level, fixed_level_record, low_bit_matmuls
from aqexport.artifact import (
    DATA_FILE,
    MODEL_FILE,
    atomic_directory,
    dependency_versions,
    file_hashes,
    json_text,
    recover_interrupted,
    save_model,
    write_json,
)
from aqexport.build_cache import build_identity, build_lock, portable_config, up_to_date
from aqexport.calibrate.activation_ranges import ActivationRange, linear_activation_ranges
from aqexport.calibrate.data import calibration_windows
from aqexport.calibrate.data_parallel import refuse_ranks
from aqexport.calibrate.edges import (
    can_tie_embedding,
    head_input_hessian,
    quantize_embedding,
    quantize_lm_head,
    tie_embedding,
)
from aqexport.calibrate.fold import FoldedWeights
from aqexport.calibrate.linear_error import linear_output_errors
from aqexport.calibrate.plan import LinearPlan, QuantPlan
from aqexport.calibrate.structure import decoder_blocks
from aqexport.calibration_run import calibrate_loaded, evaluation_windows, torch_perplexity
from aqexport.capture import CacheLayout, cache_layout, export_onnx, export_static_onnx, untie_lm_head
from aqexport.capture_weights import CheckpointWeights, skeleton_model
from aqexport.config import BuildConfig
from aqexport.errors import ConfigError
from aqexport.genai_config import build_genai_config
from aqexport.ladder import FpLadder
from aqexport.lowering import LoweringResult, fp_passes, profile_passes, quantized_passes, run_passes
from aqexport.memory_budget import MemoryGuard, budget_bytes, budget_origin, check_source_fits
from aqexport.mobile import OPERATOR_CONFIG, ep_usability, operator_config_entries, write_ort_for_cpu, write_ort_format
from aqexport.passes.shared_kv_buffer import KV_CACHE_METADATA_KEY
from aqexport.prefill_graph import save_sharing_weights
from aqexport.reference import torch_step
from aqexport.report_html import REPORT_FILE, write_report
from aqexport.source_tensors import CheckpointTensors
from aqexport.sources import LoadedModel, load_model, resolve_source
from aqexport.stream_choice import Streaming, streaming_for
from aqexport.streamed_model import edges_released, float_linears
from aqexport.target import Target
from aqexport.verify import (
    check_greedy_after,
    release_weights,
    torch_reference,
    verify_artifact,
    verify_ort_format,
)

__all__ = ["STAGES", "Calibrated", "Source", "Stage", "build"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """What ``load`` made: the PyTorch model (calibration turns it into the fake-quant reference
    in place), its tokenizer and KV layout."""

    loaded: LoadedModel
    layout: CacheLayout
    untied_lm_head: bool
    #: whether the model holds one block at a time, and why (``aqexport.stream_choice``)
    streaming: Streaming = Streaming(False, "")


@dataclass(frozen=True)
class Calibrated:
    """What ``calibrate`` made: the plan, the model's ends quantized outside it, and its report
    (with the parity ladder's exported- and folded-fp rungs, taken while the float graph exists)."""

    plan: QuantPlan
    lm_head: dict[str, LinearPlan]
    embedding: dict[str, LinearPlan]
    report: dict[str, Any]
    parity_ladder: dict[str, Any] | None = None
    #: ``{embedding path: head path}`` where the embedding reads the head's quantized table.
    tied_embedding: dict[str, str] = field(default_factory=dict)
    #: The QNN artifact's uint16 activation ranges by linear path (``target.npu: qnn`` only).
    activation_ranges: dict[str, ActivationRange] = field(default_factory=dict)


@dataclass(frozen=True)
class Written:
    path: Path
    mobile: dict[str, Any] | None = None


def load_stage(
    config: BuildConfig, config_dir: Path, identity: dict[str, Any], streaming: Streaming, scratch: Path
) -> Source:
    loaded = load_model(config.model, config_dir, identity["source_sha256"], streaming.streamed, scratch)
    untied = untie_lm_head(loaded.model)
    if getattr(config.quantization, "embedding", None) == "tied" and not untied:  # before any calibration
        raise ConfigError(
            "quantization.embedding tied: the model does not tie its embedding to its LM head "
            "(tie_word_embeddings is false), so there is no one table to share",
            "set quantization.embedding: int4 (or auto)",
        )
    return Source(loaded, cache_layout(loaded.model), untied, streaming)


def capture_stage(source: Source, target: Target) -> tuple[ir.Model, ir.Model | None, float]:
    """The float graph, the npu profile's prefill graph (else ``None``) and the exports' seconds.
    A local safetensors checkpoint is the graph's weights (read when used,
    ``aqexport.capture_weights``) and what is traced is a skeleton of the model without weights:
    the graph neither holds nor shares the loaded model's memory."""
    model = source.loaded.model
    weights = _checkpoint_weights(source)
    if weights is not None:
        dtype = next(model.parameters()).dtype
        model = skeleton_model(type(model), copy.deepcopy(model.config), dtype)
    if not target.static_graph:
        graph, seconds = export_onnx(model, source.layout, target.opset, weights)
        return graph, None, seconds
    step, step_seconds = export_static_onnx(model, source.layout, target.max_context, target.opset, weights)
    prefill, prefill_seconds = export_static_onnx(
        model, source.layout, target.max_context, target.opset, weights, tokens=target.prefill_tokens
    )
    return step, prefill, step_seconds + prefill_seconds


def _checkpoint_weights(source: Source) -> CheckpointWeights | None:
    origin = source.loaded.source
    if origin.kind == "hub":
        return None
    weights = CheckpointWeights.for_model(
        Path(origin.location), source.loaded.model, source.untied_lm_head, origin.gguf_file, _streamed_tensors(source)
    )
    if weights is not None:
        logger.info("capture: a weightless skeleton, the graph reading its weights from %s", origin.location)
    return weights


def _streamed_tensors(source: Source) -> CheckpointTensors | None:
    """The tensors a streamed model reads its blocks from: for a GGUF, its float shards, which
    the graph then reads too instead of dequantizing each weight again from a mapping of the
    file that would stay resident (the packaged SmolLM2's 90 MB)."""
    weights = getattr(source.loaded.model, "streamed_weights", None)
    return None if weights is None else weights.tensors


def calibrate_stage(
    config: BuildConfig,
    source: Source,
    exported_graph: ir.Model,
    target: Target,
    on_block: Callable[[int, int], None],
) -> Calibrated | None:
    """After capture, so the exported graph holds the float weights the plan transforms; the
    PyTorch model becomes the fake-quant model that verification compares the artifact with."""
    quant = config.quantization
    if not type(quant).CALIBRATED:
        return None
    loaded = source.loaded
    windows = evaluation_windows(config, loaded.tokenizer)
    logger.info("calibrate: the float model's perplexity")
    fp = torch_perplexity(loaded.model, windows)
    ladder, float_block = None, None
    if config.evaluation.ladder:
        prompt = loaded.tokenizer(config.evaluation.prompt, add_special_tokens=False)["input_ids"]
        eager, _ = torch_step(loaded.model, np.asarray([prompt]), None, 0)
        logger.info("calibrate: the parity ladder's float rungs")
        with edges_released(loaded.model):  # the exported rung's session: as the folded one's below
            ladder = FpLadder(exported_graph, prompt, eager)
        if ladder.graph is not None:  # the float blocks, only where the folded rung runs
            float_block = _float_blocks(loaded.model, source.streaming.streamed)
    logger.info("calibrate: the plan, block by block")
    plan, report = calibrate_loaded(config, loaded, source.layout, on_block)
    report["fp_perplexity"] = fp
    parity = None
    if float_block is not None:
        logger.info("calibrate: per-linear errors and the folded rung")
        folded = FoldedWeights(plan, float_block)
        report["linear_errors"] = _linear_errors(config, loaded, folded)
        with edges_released(loaded.model):  # the rung's session is the calibrate stage's peak
            parity = ladder.fold(plan, folded)
        del folded, float_block
    elif ladder is not None:
        report["linear_errors"] = {"skipped": f"with the folded rung: {ladder.why_not_folded}"}
        parity = ladder.report
    method = quant.head_method
    logger.info("calibrate: the LM head (%s, %s)", quant.lm_head, method or "rtn")
    hessian = _head_hessian(config, loaded, report) if method == "gptq" else None
    tie = _embedding_ties_head(config, source, report)
    lm_head = quantize_lm_head(loaded.model, quant.lm_head, method or "rtn", hessian)
    own_format = "int4" if quant.embedding == "auto" else quant.embedding
    ranges = {}
    if target.uint16_activations:
        ranges = _activation_ranges(config, loaded, [*(path for path, _ in plan.linears().items()), *lm_head], report)
    return Calibrated(
        plan=plan,
        lm_head=lm_head,
        embedding={} if tie else quantize_embedding(loaded.model, own_format),
        tied_embedding=tie_embedding(loaded.model, lm_head) if tie else {},
        report=report,
        parity_ladder=parity,
        activation_ranges=ranges,
    )


def _float_blocks(model: nn.Module, streamed: bool) -> Callable[[int], nn.Module]:
    """Block ``index``'s float weights once calibration has made the model fake-quant: a
    streamed model reads them from its checkpoint when asked (``streamed_model.float_linears``),
    a loaded one keeps a copy of every block, taken now."""
    if streamed:
        return functools.partial(float_linears, model)
    return copy.deepcopy(list(decoder_blocks(model)[1])).__getitem__


#: Calibration windows the QNN artifact's activation ranges are observed on.
RANGE_WINDOWS = 8


def _activation_ranges(
    config: BuildConfig, loaded: LoadedModel, paths: list[str], report: dict[str, Any]
) -> dict[str, ActivationRange]:
    """Input and output ranges of the linears at ``paths`` in the calibrated model, on the first
    ``RANGE_WINDOWS`` calibration windows (``aqexport.calibrate.activation_ranges``)."""
    spec = config.calibration
    start = time.perf_counter()
    windows = calibration_windows(loaded.tokenizer, spec.data, RANGE_WINDOWS, spec.seqlen, spec.seed)
    ranges = linear_activation_ranges(loaded.model, paths, windows)
    report["activation_ranges"] = {
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
        "linears": len(ranges),
        "seconds": time.perf_counter() - start,
    }
    return ranges


#: Calibration windows the per-linear output errors are measured on (report only).
ERROR_WINDOWS = 2


def _linear_errors(config: BuildConfig, loaded: LoadedModel, folded: FoldedWeights) -> dict[str, Any]:
    """Per-linear output error of the plan and of plain RTN (``calibrate.linear_error``), on the
    first calibration windows, with the seconds it took."""
    spec = config.calibration
    start = time.perf_counter()
    windows = calibration_windows(loaded.tokenizer, spec.data, ERROR_WINDOWS, spec.seqlen, spec.seed)
    errors = linear_output_errors(loaded.model, folded, windows)
    return {"seconds": time.perf_counter() - start, "linears": errors}


def _embedding_ties_head(config: BuildConfig, source: Source, report: dict[str, Any]) -> bool:
    """Whether the embedding reads the head's table: ``tied`` must (one clear error when it
    cannot), ``auto`` does where it can and falls back to int4 (``report["embedding"]`` says
    which, and why)."""
    quant = config.quantization
    if quant.embedding not in ("tied", "auto"):
        return False
    reason = can_tie_embedding(source.loaded.model, source.untied_lm_head, quant.lm_head)
    if reason is None and config.target.weight_format != "matmul_nbits":
        reason = f"weight_format {config.target.weight_format} stores no MatMulNBits table to share"
    if reason is not None and quant.embedding == "tied":
        raise ConfigError(f"quantization.embedding tied: {reason}", "set quantization.embedding: int4 (or auto)")
    if reason is not None:
        logger.info("embedding: auto → int4 (%s)", reason)
    report["embedding"] = {"reads_lm_head": reason is None, "why_not": reason}
    return reason is None


def _head_hessian(config: BuildConfig, loaded: LoadedModel, report: dict[str, Any]):
    """The LM head inputs' ``XᵀX`` on the calibrated model, for its GPTQ."""
    spec = config.calibration
    samples = -(-spec.head_tokens // spec.seqlen)
    windows = calibration_windows(loaded.tokenizer, spec.data, samples, spec.seqlen, spec.seed)
    start = time.perf_counter()
    hessian = head_input_hessian(loaded.model, windows)
    report["lm_head"] = {
        "method": "gptq",
        "tokens": int(windows.numel()),
        "hessian_seconds": time.perf_counter() - start,
    }
    return hessian


def lower_stage(
    source: Source,
    exported_graph: ir.Model,
    prefill_graph: ir.Model | None,
    calibrated: Calibrated | None,
    target: Target,
) -> tuple[ir.Model, ir.Model | None, LoweringResult]:
    """The lowered graph and prefill graph (freed once written) and what the passes did to the
    first (kept for the manifest; the prefill graph goes through the same passes)."""
    lowered = run_passes(exported_graph, _lowering_passes(source, calibrated, target))
    prefill = None
    if prefill_graph is not None:
        prefill = run_passes(prefill_graph, _lowering_passes(source, calibrated, target)).model
    return lowered.model, prefill, lowered


def _lowering_passes(source: Source, calibrated: Calibrated | None, target: Target) -> list[ir.passes.PassBase]:
    max_positions = target.rotary_positions(getattr(source.loaded.model.config, "max_position_embeddings", None))
    if calibrated is None:
        passes = fp_passes(target, max_positions)
    else:
        passes = quantized_passes(
            calibrated.plan,
            calibrated.lm_head,
            calibrated.embedding,
            target,
            max_positions,
            tied_embedding=calibrated.tied_embedding,
        )
    return [*passes, *profile_passes(target, calibrated.activation_ranges if calibrated is not None else None)]


def write_stage(
    lowered_graph: ir.Model, lowered_prefill: ir.Model | None, source: Source, target: Target, staging: Path
) -> Written:
    loaded = source.loaded
    path = save_model(lowered_graph, staging)
    prefill = None if lowered_prefill is None else save_sharing_weights(lowered_prefill, path)
    if not target.fuse:  # a fused graph was checked before fusion (lowering.fusion_passes)
        for graph in (path, *([staging / prefill["graph"]] if prefill else [])):
            onnx.checker.check_model(str(graph), full_check=True)
    loaded.tokenizer.save_pretrained(staging)
    loaded.model.config.to_json_file(staging / "config.json")
    mobile = None
    if target.static_graph:
        mobile = {
            "contract": "static step graph: batch 1, one token per call, "
            f"{target.max_context} cache slots, attention_bias input; present.* = the new token's key/value",
            "genai": "not written: onnxruntime-genai does not run the static npu contract",
            "target_ep": target.npu,
            "execution_providers": ep_usability(path, compile_qnn=target.npu == "qnn"),
        }
        if prefill is not None:
            mobile["contract"] += (
                f"; {prefill['graph']}: the same contract at {target.prefill_tokens} tokens per call "
                f"(a prompt's chunks), reading {prefill['weights_file']}"
            )
            prefill["execution_providers"] = ep_usability(staging / prefill["graph"], compile_qnn=target.npu == "qnn")
            prefill["ort"] = (
                "the step graph only (model.ort): the ORT format has no external data, so a prefill.ort "
                "would carry its own copy of every weight"
            )
            mobile["prefill"] = prefill
    if target.writes_genai_config:
        genai = build_genai_config(
            loaded.model.config,
            loaded.model.generation_config,
            source.layout,
            loaded.architecture.genai_type,
            share_buffer=lowered_graph.metadata_props.get(KV_CACHE_METADATA_KEY) == "shared_buffer",
            provider="cuda" if target.profile == "cuda" else None,
            context_length=target.max_context if target.profile == "mobile" else None,
        )
        write_json(staging / "genai_config.json", genai)
    if target.writes_operator_config:
        _, config = write_ort_for_cpu(path, staging / "model.ort")
        mobile = _mobile_cpu_section(target, config)
    elif target.writes_ort:
        write_ort_format(path, staging / "model.ort")
    return Written(path, mobile)


def _mobile_cpu_section(target: Target, config: Path) -> dict[str, Any]:
    """The mobile profile's report section: what was sized for the phone and what the reduced
    build would take (``aqexport.mobile``)."""
    operators = sorted(f"{domain or 'ai.onnx'}:{op}" for domain, op in operator_config_entries(config))
    return {
        "contract": "the cpu profile's dynamic-shape graph and KV cache, run by onnxruntime-genai; "
        f"genai_config.json and the rotary tables sized for {target.max_context} positions",
        "accuracy_level": target.accuracy_level,
        "ort_format": "model.ort: convert_onnx_models_to_ort's Fixed style, level all, target_platform arm",
        "operator_config": {"file": OPERATOR_CONFIG, "operators": operators},
        "reduced_build": "not built here (ONNX Runtime source, the phone's toolchain, hours): build.sh "
        f"--minimal_build --include_ops_by_config {OPERATOR_CONFIG} --enable_reduced_operator_type_support",
    }


def verify_stage(
    config: BuildConfig, source: Source, target: Target, staging: Path, written: Written
) -> dict[str, Any]:
    if target.profile == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return {
            "skipped": "target.profile cuda: this onnxruntime has no CUDA execution provider; the artifact "
            "passed onnx.checker and its structure is tested, run 'aqexport eval --provider cuda' on a GPU"
        }
    loaded = source.loaded
    # The PyTorch side first and once, however often we verify; then the model's weights go, so
    # ONNX Runtime's sessions never share the process with them (``TorchReference``). A streamed
    # model holds only its edges between forwards; it keeps them for one forward after ONNX
    # Runtime, which checks the artifact's greedy tokens (``check_greedy_after``).
    streamed = source.streaming.streamed
    reference = torch_reference(loaded.model, loaded.tokenizer, config.evaluation, greedy=not streamed)
    if not streamed:
        release_weights(loaded.model)

    def verify() -> dict[str, Any]:
        return verify_artifact(
            staging,
            reference,
            loaded.tokenizer,
            config.evaluation,
            target.providers,
            target.session_accuracy_level,
            target.weight_format,
        )

    with edges_released(loaded.model):  # a streamed model's edges wait on disk while ONNX Runtime runs
        if target.measures_accuracy_level and low_bit_matmuls(written.path):
            evaluation = config.evaluation
            verification, choice = choose_accuracy_level(
                staging,
                verify,
                target.accuracy_tolerance,
                can_measure=evaluation.text is not None and evaluation.compare_pytorch,
            )
            verification["accuracy_level"] = choice
        else:
            verification = verify()
            if target.mobile_accuracy_level and low_bit_matmuls(written.path):
                verification["accuracy_level"] = fixed_level_record(
                    target.accuracy_level,
                    verification,
                    "target.profile mobile: the int8-activation path MLAS's ARM kernels accelerate "
                    "(Target.mobile_accuracy_level)",
                )
    if streamed:
        check_greedy_after(verification, loaded.model, reference, config.evaluation)
        release_weights(loaded.model)
    if target.writes_ort:
        verification["ort_format"] = verify_ort_format(
            staging, loaded.tokenizer, config.evaluation, target.weight_format
        )
    return verification


def _relative(path: Any, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _replace_paths(value: Any, paths: dict[str, str]) -> Any:
    """``value`` with every string equal to a key of ``paths`` replaced by its value."""
    if isinstance(value, dict):
        return {k: _replace_paths(v, paths) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace_paths(v, paths) for v in value]
    return paths.get(value, value) if isinstance(value, str) else value


def finalize_stage(
    config: BuildConfig,
    config_dir: Path,
    output_dir: Path,
    identity: dict[str, Any],
    target: Target,
    staging: Path,
    source: Source,
    export_seconds: float,
    calibrated: Calibrated | None,
    lowering: LoweringResult,
    written: Written,
    verification: dict[str, Any],
    timings: dict[str, float],
    peak_rss_mib: dict[str, float],
) -> None:
    loaded = source.loaded
    sizes = {name: (staging / name).stat().st_size for name in (MODEL_FILE, DATA_FILE) if (staging / name).exists()}
    quantization = _quantization_summary(config, target, calibrated, lowering, verification.get("accuracy_level"))
    report: dict[str, Any] = {"untied_lm_head": source.untied_lm_head, "export_seconds": export_seconds}
    if calibrated is not None:
        report["calibration"] = calibrated.report
        if calibrated.parity_ladder is not None:
            report["parity_ladder"] = calibrated.parity_ladder
        fold = next((r.get("stats", {}) for r in lowering.records if r["pass"] == "FoldAffinePass"), {})
        if "run_time_cost" in fold:  # per transform: form, placement, FLOPs and bytes per token
            report["transforms"] = {"run_time_cost": fold["run_time_cost"], "per_transform": fold["transforms"]}
    if written.mobile is not None:
        report["mobile"] = written.mobile
    report.update(
        {
            "verification": verification,
            "model_bytes": sum(sizes.values()),
            "model_files": sizes,
            "quantization": quantization,
            "timings": timings,
            "memory": {
                "peak_rss_mib": peak_rss_mib,
                "measure": _RSS_MEASURE,
                "budget": _budget(config),
                "streamed": {"streamed": source.streaming.streamed, "why": source.streaming.why},
            },
        }
    )
    # absolute paths the report would hold (plan dir, evaluation text, tokenizer folder) -> relative
    absolute = [config.plan_dir(), config.evaluation.text, config.calibration.data]
    if loaded.source.kind != "hub":
        absolute.append(loaded.source.location)
    report = _replace_paths(report, {str(p): _relative(p, config_dir) for p in absolute if p is not None})
    write_json(staging / "report.json", report)
    recorded_config = portable_config(config, config_dir)
    recorded_config["output"]["dir"] = _relative(output_dir, config_dir)
    passes = [{k: v for k, v in record.items() if k != "seconds"} for record in lowering.records]
    manifest = {
        "aqexport_version": __version__,
        "versions": dependency_versions(),
        "build_identity": identity,
        "config": recorded_config,
        "config_sha256": identity["config_sha256"],
        "source": {
            "kind": loaded.source.kind,
            "location": loaded.source.location
            if loaded.source.kind == "hub"
            else _relative(loaded.source.location, config_dir),
            "gguf_file": loaded.source.gguf_file,
            "revision": loaded.source.revision,
            "sha256": loaded.source_sha256,
            "architecture": loaded.architecture.model_type,
        },
        "io": {"inputs": source.layout.input_names(), "outputs": source.layout.output_names()},
        "quantization": {**quantization, "linears": _linear_schemes(calibrated)},
        "passes": passes,
        "fusions": lowering.sections.get("fusions", {}),
        "kv_cache": lowering.sections.get("kv_cache", {"contract": "growing", "reason": _growing_reason(target)}),
        "files": {},  # below, once report.html is written
        "not_reproducible": {
            # model.ort: ONNX Runtime orders one of its tables differently on every save (aqexport.mobile)
            "files": ["report.json", REPORT_FILE, *(["model.ort"] if (staging / "model.ort").exists() else [])],
            "stage_seconds": dict(timings),
            "pass_seconds": [{"pass": r["pass"], "seconds": r.get("seconds")} for r in lowering.records],
        },
    }
    # the page reads the manifest as it will be read back from disk (JSON types), less its files
    write_report(staging, config.plan_dir() if calibrated is not None else None, json.loads(json_text(manifest)))
    manifest["files"] = file_hashes(staging)
    write_json(staging / "manifest.json", manifest)


def _growing_reason(target: Target) -> str:
    if target.static_graph:
        return "the npu static step graph keeps its own fixed cache"
    return "target.fuse is off" if not target.fuse else "target.kv_cache: growing"


def _quantization_summary(
    config: BuildConfig,
    target: Target,
    calibrated: Calibrated | None,
    lowering: LoweringResult,
    level_choice: dict[str, Any] | None,
) -> dict[str, Any]:
    quant = config.quantization
    integer_linears = list(lowering.sections.get("quantization", {}).get("integer_activation_linears", []))
    chosen_level = (level_choice or {}).get("chosen", target.accuracy_level)
    if chosen_level == 0:  # measured back to float: only the 8-bit linears still quantize their input
        schemes = _linear_schemes(calibrated)
        integer_linears = [path for path in integer_linears if schemes.get(path, {}).get("weight", {}).get("bits") == 8]
    summary: dict[str, Any] = {
        "recipe": quant.recipe,
        "preset": getattr(quant, "preset", None),
        "rounding": getattr(getattr(quant, "rounding", None), "method", None),
        "lm_head": getattr(quant, "lm_head", "float"),
        "embedding": getattr(quant, "embedding", "float"),
        "accuracy_level": chosen_level,
        "integer_activation_linears": integer_linears,
        "weight_format": target.weight_format,
    }
    storage = lowering.sections.get("quantization", {}).get("weight_storage")
    if storage is not None:  # DequantizeConstantWeightsPass (npu: coreml): the codes' values in float
        summary["weight_storage"] = storage
    if integer_linears:
        summary["accuracy_level_note"] = (
            "these linears run MatMulNBits at accuracy_level 4, which quantizes their input to int8 per block "
            "at run time: the artifact departs from the calibrated plan by that rounding (verification measures it)"
        )
    if "activations" in lowering.sections.get("quantization", {}):  # Uint16ActivationsPass (npu: qnn)
        summary["activations"] = lowering.sections["quantization"]["activations"]
    elif calibrated is not None and any(e.activation is not None for e in calibrated.plan.linears().values()):
        summary["activations"] = (
            "static per-tensor QDQ (uint8/uint4) where 8/4-bit, else a float fake-quant subgraph"
            if quant.activations == "static"
            else "dynamic per token as an explicit float fake-quant subgraph: accuracy simulation, "
            "no ONNX Runtime kernel runs integer activations per token"
        )
    return summary


def _scheme(scheme) -> dict[str, Any]:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric}


def _linear_schemes(calibrated: Calibrated | None) -> dict[str, Any]:
    if calibrated is None:
        return {}
    schemes = {
        path: {
            "weight": _scheme(entry.scheme),
            "activation": None
            if entry.activation is None
            else {"bits": entry.activation.bits, "static": entry.act_scale is not None},
            "input_transform": entry.input_transform,
        }
        for path, entry in calibrated.plan.linears().items()
    }
    for role, entries in (("lm_head", calibrated.lm_head), ("embedding", calibrated.embedding)):
        for path, entry in entries.items():
            schemes[path] = {"weight": _scheme(entry.scheme), "activation": None, "role": role}
    for path, head in calibrated.tied_embedding.items():
        schemes[path] = {**schemes[head], "role": "embedding", "reads": head}
    return schemes


@dataclass(frozen=True)
class Stage:
    """A named step: ``run(**{name: value for name in needs})`` returns the value(s) named ``makes``."""

    name: str
    run: Callable[..., Any]
    needs: tuple[str, ...]
    makes: tuple[str, ...] = field(default_factory=tuple)


STAGES: tuple[Stage, ...] = (
    Stage("load", load_stage, ("config", "config_dir", "identity", "streaming", "scratch"), ("source",)),
    Stage("capture", capture_stage, ("source", "target"), ("exported_graph", "prefill_graph", "export_seconds")),
    Stage("calibrate", calibrate_stage, ("config", "source", "exported_graph", "target", "on_block"), ("calibrated",)),
    Stage(
        "lower",
        lower_stage,
        ("source", "exported_graph", "prefill_graph", "calibrated", "target"),
        ("lowered_graph", "lowered_prefill", "lowering"),
    ),
    Stage("write", write_stage, ("lowered_graph", "lowered_prefill", "source", "target", "staging"), ("written",)),
    Stage("verify", verify_stage, ("config", "source", "target", "staging", "written"), ("verification",)),
    Stage(
        "finalize",
        finalize_stage,
        (
            "config",
            "config_dir",
            "output_dir",
            "identity",
            "target",
            "staging",
            "source",
            "export_seconds",
            "calibrated",
            "lowering",
            "written",
            "verification",
            "timings",
            "peak_rss_mib",
        ),
    ),
)

#: Values the stage loop fills in as it goes: kept to the end, whatever the stages need.
_LOOP_VALUES = ("timings", "peak_rss_mib")
_RSS_MEASURE = (
    "the build process's peak resident set size (getrusage ru_maxrss) at the end of each stage: "
    "a running maximum, which includes whatever the process held before the build started"
)


def _budget(config: BuildConfig) -> dict[str, Any] | None:
    """The memory budget the build ran under (``aqexport.memory_budget``), for the report."""
    budget = budget_bytes(config.build.max_memory)
    return None if budget is None else {"mib": round(budget / 2**20), "from": budget_origin(config.build.max_memory)}


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _run_stages(stages: tuple[Stage, ...], values: dict[str, Any], on_stage: Callable[[str], None]) -> None:
    last_use = {name: index for index, stage in enumerate(stages) for name in stage.needs}
    timings: dict[str, float] = values["timings"]
    for index, stage in enumerate(stages):
        on_stage(stage.name)
        faults.point(f"stage.{stage.name}")  # a test hook, off unless AQEXPORT_FAULT names it
        start = time.perf_counter()
        made = stage.run(**{name: values[name] for name in stage.needs})
        if len(stage.makes) == 1:
            made = (made,)
        values.update(zip(stage.makes, made or (), strict=True))
        timings[stage.name] = round(time.perf_counter() - start, 3)
        values["peak_rss_mib"][stage.name] = _peak_rss_mib()
        logger.info("stage %s: %.1f s", stage.name, timings[stage.name])
        for name in [name for name, last in last_use.items() if last == index and name not in _LOOP_VALUES]:
            values.pop(name, None)  # no later stage needs it: let it go (graphs, the float copy)
        heap.trim()


def build(
    config: BuildConfig,
    config_dir: Path,
    output_dir: Path | None = None,
    on_stage: Callable[[str], None] = lambda name: None,
    on_block: Callable[[int, int], None] = lambda done, total: None,
    force: bool = False,
) -> Path:
    """Run every stage; return the artifact directory (only created if all stages succeed).
    ``config`` is already valid: ``BuildConfig`` checks every rule when it is made.

    Holds the output's lock throughout (``ConfigError`` if another build holds it). Unless
    ``force``, an artifact already there with this build's identity whose files match its
    manifest is returned as it is: ``on_stage("up to date")`` is the only stage reported."""
    refuse_ranks("aqexport build", "torchrun ... aqexport calibrate CONFIG, then aqexport build CONFIG lowers its plan")
    final = Path(output_dir) if output_dir is not None else config.output.dir
    source = resolve_source(config.model, Path(config_dir))
    max_memory = config.build.max_memory
    streaming = streaming_for(config, source)
    if source.kind != "hub":  # before hashing or loading it; a Hub model's files are not here yet
        check_source_fits(Path(source.location), source.gguf_file, config.model.dtype, max_memory, streaming.streamed)
    with build_lock(final):
        for line in recover_interrupted(final):  # leftovers of a killed build into this output
            logger.warning("%s", line)
        identity = build_identity(config, Path(config_dir))
        if not force:
            fresh, why = up_to_date(final, identity)
            if fresh:
                logger.info("up to date: %s", why)
                on_stage("up to date")
                return final
            logger.info("building: %s", why)
        with atomic_directory(final) as staging, tempfile.TemporaryDirectory(prefix="aqexport-build-") as scratch:
            values: dict[str, Any] = {
                "config": config,
                "config_dir": Path(config_dir),
                "output_dir": final,
                "identity": identity,
                "staging": staging,
                "scratch": Path(scratch),
                "target": Target.from_spec(config.target),
                "streaming": streaming,
                "on_block": on_block,
                "timings": {},
                "peak_rss_mib": {},
            }
            with MemoryGuard(budget_bytes(max_memory), budget_origin(max_memory)) as guard:

                def entering(name: str) -> None:
                    guard.stage = name
                    on_stage(name)

                _run_stages(STAGES, values, entering)
    return final
