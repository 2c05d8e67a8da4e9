"""The build driver: a short loop over named stages sharing one ``BuildContext``.

Stages do not call each other; each reads what earlier stages left on the context and adds
its own. The whole loop runs inside ``atomic_directory``, so the artifact appears only after
the last stage (verification included) succeeded.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from aqexport import __version__
from aqexport.artifact import (
    DATA_FILE,
    MODEL_FILE,
    atomic_directory,
    dependency_versions,
    file_hashes,
    save_model,
    write_json,
)
from aqexport.calibrate.data import calibration_windows
from aqexport.calibrate.edges import head_input_hessian, quantize_embedding, quantize_lm_head
from aqexport.calibrate.fold import folded_float_weights
from aqexport.calibrate.plan import LinearPlan, QuantPlan
from aqexport.calibrate.structure import decoder_blocks
from aqexport.calibration_run import calibrate_loaded, evaluation_windows, torch_perplexity
from aqexport.capture import CacheLayout, cache_layout, export_onnx, export_static_onnx, untie_lm_head
from aqexport.config import BuildConfig, require_buildable
from aqexport.genai_config import build_genai_config
from aqexport.ladder import FpLadder
from aqexport.lowering import fp_passes, profile_passes, quantized_passes, run_passes
from aqexport.mobile import ep_usability, write_ort_format
from aqexport.passes import GroupQueryAttentionPass, OrtFusionsPass, PackMatMulNBitsPass, QuantizeWeightsPass
from aqexport.reference import torch_step
from aqexport.sources import LoadedModel, load_model
from aqexport.verify import verify_artifact, verify_ort_format

__all__ = ["BuildContext", "STAGES", "build"]

logger = logging.getLogger(__name__)


@dataclass
class BuildContext:
    config: BuildConfig
    config_dir: Path
    staging: Path
    loaded: LoadedModel | None = None
    layout: CacheLayout | None = None
    graph: ir.Model | None = None
    plan: QuantPlan | None = None
    lm_head: dict[str, LinearPlan] = field(default_factory=dict)  # quantized outside the plan
    embedding: dict[str, LinearPlan] = field(default_factory=dict)
    ladder: FpLadder | None = None
    folded_weights: tuple[dict, dict] | None = None  # unquantized transformed weights and biases
    passes: list[Any] = field(default_factory=list)
    pass_stats: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    on_block: Callable[[int, int], None] = lambda done, total: None


def load_stage(ctx: BuildContext) -> None:
    ctx.loaded = load_model(ctx.config.model, ctx.config_dir)
    ctx.report["untied_lm_head"] = untie_lm_head(ctx.loaded.model)
    ctx.layout = cache_layout(ctx.loaded.model)


def capture_stage(ctx: BuildContext) -> None:
    target = ctx.config.target
    if target.profile == "mobile":
        ctx.graph, seconds = export_static_onnx(ctx.loaded.model, ctx.layout, target.max_context, target.opset)
    else:
        ctx.graph, seconds = export_onnx(ctx.loaded.model, ctx.layout, target.opset)
    ctx.report["export_seconds"] = seconds


def calibrate_stage(ctx: BuildContext) -> None:
    """After capture, so the exported graph holds the float weights the plan transforms; the
    PyTorch model becomes the fake-quant model that verification compares the artifact with."""
    if ctx.config.quantization.recipe == "none":
        return
    windows = evaluation_windows(ctx.config, ctx.loaded.tokenizer)
    fp = torch_perplexity(ctx.loaded.model, windows)
    float_blocks = None
    if ctx.config.evaluation.ladder:
        prompt = ctx.loaded.tokenizer(ctx.config.evaluation.prompt, add_special_tokens=False)["input_ids"]
        eager, _ = torch_step(ctx.loaded.model, np.asarray([prompt]), None, 0)
        ctx.ladder = FpLadder(ctx.graph, prompt, eager)
        float_blocks = copy.deepcopy(list(decoder_blocks(ctx.loaded.model)[1]))
    ctx.plan, ctx.report["calibration"] = calibrate_loaded(ctx.config, ctx.loaded, ctx.layout, ctx.on_block)
    ctx.report["calibration"]["fp_perplexity"] = fp
    if float_blocks is not None:
        ctx.folded_weights = folded_float_weights(float_blocks, ctx.plan)
    quant = ctx.config.quantization
    method = _head_method(quant)
    hessian = _head_hessian(ctx) if method == "gptq" else None
    ctx.lm_head = quantize_lm_head(ctx.loaded.model, quant.lm_head, method or "rtn", hessian)
    ctx.embedding = quantize_embedding(ctx.loaded.model, quant.embedding)


def _head_method(quant) -> str | None:
    """``auto``: GPTQ where RTN loses (int4), RTN where it is already near-lossless (int8)."""
    if quant.lm_head == "float":
        return None
    if quant.lm_head_method == "auto":
        return "gptq" if quant.lm_head == "int4" else "rtn"
    return quant.lm_head_method


def _head_hessian(ctx: BuildContext):
    """The LM head inputs' ``XᵀX`` on the calibrated model, for its GPTQ."""
    spec = ctx.config.calibration
    samples = -(-spec.head_tokens // spec.seqlen)
    windows = calibration_windows(ctx.loaded.tokenizer, spec.data, samples, spec.seqlen, spec.seed)
    start = time.perf_counter()
    hessian = head_input_hessian(ctx.loaded.model, windows)
    ctx.report["calibration"]["lm_head"] = {
        "method": "gptq",
        "tokens": int(windows.numel()),
        "hessian_seconds": time.perf_counter() - start,
    }
    return hessian


def lower_stage(ctx: BuildContext) -> None:
    target = ctx.config.target
    max_positions = getattr(ctx.loaded.model.config, "max_position_embeddings", None)
    fuse = target.fuse and target.profile != "mobile"  # mobile: portable ops only
    if ctx.plan is None:
        passes = fp_passes(fuse, max_positions)
    else:
        if ctx.ladder is not None:
            ctx.report["parity_ladder"] = ctx.ladder.fold(ctx.plan, *ctx.folded_weights)
            ctx.ladder, ctx.folded_weights = None, None
        passes = quantized_passes(
            ctx.plan,
            ctx.lm_head,
            ctx.embedding,
            target.accuracy_level,
            _weight_format(target),
            fuse,
            max_positions,
        )
    ctx.passes = [*passes, *profile_passes(target.profile)]
    ctx.graph, ctx.pass_stats = run_passes(ctx.graph, ctx.passes)


def write_stage(ctx: BuildContext) -> None:
    loaded, target = ctx.loaded, ctx.config.target
    mobile = target.profile == "mobile"
    path = save_model(ctx.graph, ctx.staging)
    if mobile or not target.fuse:  # a fused graph was checked before fusion (lowering.fusion_passes)
        onnx.checker.check_model(str(path), full_check=True)
    loaded.tokenizer.save_pretrained(ctx.staging)
    loaded.model.config.to_json_file(ctx.staging / "config.json")
    if mobile:  # onnxruntime-genai has no static-cache contract; the report says so
        ctx.report["mobile"] = {
            "contract": "static step graph: batch 1, one token per call, "
            f"{target.max_context} cache slots, attention_bias input; present.* = the new token's key/value",
            "genai": "not written: onnxruntime-genai does not run the static mobile contract",
            "execution_providers": ep_usability(path),
        }
    else:
        genai = build_genai_config(
            loaded.model.config,
            loaded.model.generation_config,
            ctx.layout,
            loaded.architecture.genai_type,
            provider="cuda" if target.profile == "cuda" else None,
        )
        write_json(ctx.staging / "genai_config.json", genai)
    if mobile or "ort" in target.formats:
        write_ort_format(path, ctx.staging / "model.ort")
    ctx.graph = None  # the saved file is the artifact from here on; free the in-memory copy


def verify_stage(ctx: BuildContext) -> None:
    if ctx.config.target.profile == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        ctx.report["verification"] = {
            "skipped": "target.profile cuda: this onnxruntime has no CUDA execution provider; the artifact "
            "passed onnx.checker and its structure is tested, run 'aqexport eval --provider cuda' on a GPU"
        }
        return
    ctx.report["verification"] = verify_artifact(
        ctx.staging,
        ctx.loaded.model,
        ctx.loaded.tokenizer,
        ctx.config.evaluation,
        ctx.config.target.providers,
        ctx.config.target.accuracy_level or 0,
        _weight_format(ctx.config.target),
    )
    if (ctx.staging / "model.ort").exists():
        ctx.report["verification"]["ort_format"] = verify_ort_format(
            ctx.staging, ctx.loaded.tokenizer, ctx.config.evaluation, _weight_format(ctx.config.target)
        )


def finalize_stage(ctx: BuildContext) -> None:
    loaded = ctx.loaded
    sizes = {
        name: (ctx.staging / name).stat().st_size for name in (MODEL_FILE, DATA_FILE) if (ctx.staging / name).exists()
    }
    ctx.report.update(
        {
            "model_bytes": sum(sizes.values()),
            "model_files": sizes,
            "quantization": _quantization_summary(ctx),
            "timings": ctx.timings,
        }
    )
    write_json(ctx.staging / "report.json", ctx.report)
    manifest = {
        "aqexport_version": __version__,
        "versions": dependency_versions(),
        "config": ctx.config.model_dump(mode="json"),
        "config_sha256": ctx.config.sha256(),
        "source": {
            "kind": loaded.source.kind,
            "location": loaded.source.location,
            "gguf_file": loaded.source.gguf_file,
            "revision": loaded.source.revision,
            "sha256": loaded.source_sha256,
            "architecture": loaded.architecture.model_type,
        },
        "io": {"inputs": ctx.layout.input_names(), "outputs": ctx.layout.output_names()},
        "quantization": {**_quantization_summary(ctx), "linears": _linear_schemes(ctx)},
        "passes": ctx.pass_stats,
        "fusions": _fusion_summary(ctx),
        "files": file_hashes(ctx.staging),
    }
    write_json(ctx.staging / "manifest.json", manifest)


def _quantization_summary(ctx: BuildContext) -> dict[str, Any]:
    quant = ctx.config.quantization
    summary: dict[str, Any] = {
        "recipe": quant.recipe,
        "preset": quant.preset,
        "lm_head": quant.lm_head,
        "embedding": quant.embedding,
        "accuracy_level": ctx.config.target.accuracy_level,
        "integer_activation_linears": _integer_activation_linears(ctx),
        "weight_format": _weight_format(ctx.config.target),
    }
    if summary["integer_activation_linears"]:
        summary["accuracy_level_note"] = (
            "these linears run MatMulNBits at accuracy_level 4, which quantizes their input to int8 per block "
            "at run time: the artifact departs from the calibrated plan by that rounding (verification measures it)"
        )
    if ctx.plan is not None and any(e.activation is not None for e in ctx.plan.linears().values()):
        summary["activations"] = (
            "static per-tensor QDQ (uint8/uint4) where 8/4-bit, else a float fake-quant subgraph"
            if quant.activations == "static"
            else "dynamic per token as an explicit float fake-quant subgraph: accuracy simulation, "
            "no ONNX Runtime kernel runs integer activations per token"
        )
    return summary


def _weight_format(target) -> str:
    """The mobile profile always stores QDQ weights in 8-bit tensors (the ORT format has no 4-bit
    type; ``passes/quantize_weights.py`` rule 7)."""
    return "qdq8" if target.profile == "mobile" else target.weight_format


def _fusion_summary(ctx: BuildContext) -> dict[str, Any]:
    """What the fusion passes recognised, so a graph that stayed unfused is visible."""
    summary: dict[str, Any] = {}
    for graph_pass in ctx.passes:
        if isinstance(graph_pass, OrtFusionsPass):
            summary["onnxscript"] = dict(graph_pass.fusions)
        elif isinstance(graph_pass, GroupQueryAttentionPass):
            summary["group_query_attention_layers"] = list(graph_pass.fused)
            summary["rotary_embedding_layers"] = list(graph_pass.rotary_fused)
            summary["attention_left_unfused"] = list(graph_pass.skipped)
        elif isinstance(graph_pass, PackMatMulNBitsPass):
            summary["packed_matmul_nbits"] = list(graph_pass.packed)
    return summary


def _integer_activation_linears(ctx: BuildContext) -> list[str]:
    """Linears whose MatMulNBits node has an accuracy_level (read back from the pass)."""
    for graph_pass in ctx.passes:
        if isinstance(graph_pass, QuantizeWeightsPass):
            return list(graph_pass.integer_activations)
    return []


def _scheme(scheme) -> dict[str, Any]:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric}


def _linear_schemes(ctx: BuildContext) -> dict[str, Any]:
    if ctx.plan is None:
        return {}
    schemes = {
        path: {
            "weight": _scheme(entry.scheme),
            "activation": None
            if entry.activation is None
            else {"bits": entry.activation.bits, "static": entry.act_scale is not None},
            "input_transform": entry.input_transform,
        }
        for path, entry in ctx.plan.linears().items()
    }
    for role, entries in (("lm_head", ctx.lm_head), ("embedding", ctx.embedding)):
        for path, entry in entries.items():
            schemes[path] = {"weight": _scheme(entry.scheme), "activation": None, "role": role}
    return schemes


Stage = Callable[[BuildContext], None]
STAGES: tuple[tuple[str, Stage], ...] = (
    ("load", load_stage),
    ("capture", capture_stage),
    ("calibrate", calibrate_stage),
    ("lower", lower_stage),
    ("write", write_stage),
    ("verify", verify_stage),
    ("finalize", finalize_stage),
)


def build(
    config: BuildConfig,
    config_dir: Path,
    output_dir: Path | None = None,
    on_stage: Callable[[str], None] = lambda name: None,
    on_block: Callable[[int, int], None] = lambda done, total: None,
) -> Path:
    """Run every stage; return the artifact directory (only created if all stages succeed)."""
    require_buildable(config)
    final = Path(output_dir) if output_dir is not None else config.output.dir
    with atomic_directory(final) as staging:
        ctx = BuildContext(config=config, config_dir=config_dir, staging=staging, on_block=on_block)
        for name, stage in STAGES:
            on_stage(name)
            start = time.perf_counter()
            stage(ctx)
            ctx.timings[name] = round(time.perf_counter() - start, 3)
            logger.info("stage %s: %.1f s", name, ctx.timings[name])
    return final
