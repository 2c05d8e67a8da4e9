"""The build driver: a short loop over named stages sharing one ``BuildContext``.

Stages do not call each other; each reads what earlier stages left on the context and adds
its own. The whole loop runs inside ``atomic_directory``, so the artifact appears only after
the last stage (verification included) succeeded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

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
from aqexport.capture import CacheLayout, cache_layout, export_onnx, untie_lm_head
from aqexport.config import BuildConfig, require_buildable
from aqexport.genai_config import build_genai_config
from aqexport.lowering import fp_passes, run_passes
from aqexport.sources import LoadedModel, load_model
from aqexport.verify import verify_artifact

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
    pass_stats: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def load_stage(ctx: BuildContext) -> None:
    ctx.loaded = load_model(ctx.config.model, ctx.config_dir)
    ctx.report["untied_lm_head"] = untie_lm_head(ctx.loaded.model)
    ctx.layout = cache_layout(ctx.loaded.model)


def capture_stage(ctx: BuildContext) -> None:
    ctx.graph, seconds = export_onnx(ctx.loaded.model, ctx.layout, ctx.config.target.opset)
    ctx.report["export_seconds"] = seconds


def lower_stage(ctx: BuildContext) -> None:
    ctx.pass_stats = run_passes(ctx.graph, fp_passes())


def write_stage(ctx: BuildContext) -> None:
    loaded = ctx.loaded
    path = save_model(ctx.graph, ctx.staging)
    onnx.checker.check_model(str(path), full_check=True)
    loaded.tokenizer.save_pretrained(ctx.staging)
    loaded.model.config.to_json_file(ctx.staging / "config.json")
    genai = build_genai_config(
        loaded.model.config, loaded.model.generation_config, ctx.layout, loaded.architecture.genai_type
    )
    write_json(ctx.staging / "genai_config.json", genai)
    ctx.graph = None  # the saved file is the artifact from here on; free the in-memory copy


def verify_stage(ctx: BuildContext) -> None:
    ctx.report["verification"] = verify_artifact(
        ctx.staging,
        ctx.loaded.model,
        ctx.loaded.tokenizer,
        ctx.config.evaluation,
        ctx.config.target.providers,
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
            "quantization": {"recipe": ctx.config.quantization.recipe},
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
        "quantization": {"recipe": ctx.config.quantization.recipe, "linears": {}},
        "passes": ctx.pass_stats,
        "files": file_hashes(ctx.staging),
    }
    write_json(ctx.staging / "manifest.json", manifest)


Stage = Callable[[BuildContext], None]
STAGES: tuple[tuple[str, Stage], ...] = (
    ("load", load_stage),
    ("capture", capture_stage),
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
) -> Path:
    """Run every stage; return the artifact directory (only created if all stages succeed)."""
    require_buildable(config)
    final = Path(output_dir) if output_dir is not None else config.output.dir
    with atomic_directory(final) as staging:
        ctx = BuildContext(config=config, config_dir=config_dir, staging=staging)
        for name, stage in STAGES:
            on_stage(name)
            start = time.perf_counter()
            stage(ctx)
            ctx.timings[name] = round(time.perf_counter() - start, 3)
            logger.info("stage %s: %.1f s", name, ctx.timings[name])
    return final
