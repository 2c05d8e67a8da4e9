"""``aqexport calibrate`` and the build's calibrate stage: produce (or resume) a QuantPlan.

Calibration is the expensive, resumable half of a quantized build, so it has a persistent
directory of its own (``calibration.plan_dir``, default ``<output.dir>.plan``): a killed run
resumes from the last finished block, and a finished plan can be lowered for any target later
without recalibrating (a build finds it there and only lowers). ``aqexport calibrate`` also
writes ``report.json`` into the plan directory with fp and fake-quant perplexity, calibration
time and per-block matrix health.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from aqexport.atomic_files import out_of_space, write_atomically
from aqexport.build_cache import plan_lock
from aqexport.calibrate.data import calibration_windows
from aqexport.calibrate.data_parallel import DataParallel, from_environment
from aqexport.calibrate.engine import calibrate
from aqexport.calibrate.plan import QuantPlan
from aqexport.calibrate.recipe import CalibrationRecipe
from aqexport.capture import CacheLayout, cache_layout
from aqexport.config import BuildConfig, CalibrationSpec, require_calibratable
from aqexport.recipes import calibration_recipe
from aqexport.reference import torch_logits_of
from aqexport.runtime import perplexity
from aqexport.sources import LoadedModel, load_model, resolve_source
from aqexport.stream_choice import streaming_for
from aqexport.verify import EVALUATION_TEXT, text_windows

__all__ = [
    "calibrate_loaded",
    "hessian_windows_for",
    "evaluation_windows",
    "plan_health",
    "plan_identity",
    "recipe_from_config",
    "run_calibration",
    "torch_perplexity",
]


def recipe_from_config(config: BuildConfig) -> CalibrationRecipe:
    """The engine's settings for the config's recipe (through the recipe registry)."""
    require_calibratable(config)
    spec = config.calibration
    recipe = calibration_recipe(config.quantization, spec.epochs, spec.seed)
    return replace(recipe, windows_per_step=spec.windows_per_step)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plan_identity(loaded: LoadedModel, spec: CalibrationSpec) -> dict[str, Any]:
    """What a saved plan must have been made from to be resumed or lowered: the same weights,
    the same calibration windows. The text is identified by its content, not its path, so a plan
    moves with its project."""
    return {
        "source_sha256": loaded.source_sha256,
        "architecture": loaded.architecture.model_type,
        "samples": spec.samples,
        "seqlen": spec.seqlen,
        "data_sha256": _file_sha256(Path(spec.data)),
    }


#: Added to calibration.seed for the rounding step's extra windows.
HESSIAN_SEED_OFFSET = 1000


def hessian_windows_for(loaded: LoadedModel, spec: CalibrationSpec, tokens: int) -> torch.Tensor | None:
    """Windows for the rounding step's Hessians when it asks for more tokens than training sees
    (``None``: the training windows do). Drawn with another seed so they add text, not repeat it."""
    samples = -(-tokens // spec.seqlen)
    if samples <= spec.samples:
        return None
    return calibration_windows(loaded.tokenizer, spec.data, samples, spec.seqlen, spec.seed + HESSIAN_SEED_OFFSET)


def calibrate_loaded(
    config: BuildConfig,
    loaded: LoadedModel,
    layout: CacheLayout,
    on_block: Callable[[int, int], None] = lambda d, t: None,
) -> tuple[QuantPlan, dict[str, Any]]:
    """Calibrate ``loaded.model`` in place (it becomes the fake-quant model); return the plan
    and what the run did (time, resumed blocks)."""
    spec = config.calibration
    recipe = recipe_from_config(config)
    windows = calibration_windows(loaded.tokenizer, spec.data, spec.samples, spec.seqlen, spec.seed)
    hessian_windows = hessian_windows_for(loaded, spec, recipe.rounding.hessian_tokens)
    parallel = from_environment(recipe.windows_per_step)
    # one calibration per plan_dir (build_cache.plan_lock), held by the rank that writes it
    with plan_lock(config.plan_dir()) if parallel.writes else nullcontext():
        plan = _open_plan(config, recipe, plan_identity(loaded, spec), parallel)
        resumed = len(plan.blocks)
        start = time.perf_counter()
        calibrate(
            loaded.model,
            windows,
            recipe,
            plan,
            layout.head_dims[0],
            layout.kv_heads[0],
            on_block,
            hessian_windows,
            parallel,
        )
    return plan, {
        "recipe": recipe.as_dict(),
        "plan_dir": str(plan.directory),
        "calibration_seconds": time.perf_counter() - start,
        "resumed_from_block": resumed,
        "ranks": parallel.world,
        "samples": spec.samples,
        "seqlen": spec.seqlen,
        "hessian_tokens": int((windows if hessian_windows is None else hessian_windows).numel())
        if recipe.rounding.needs_hessians
        else 0,
        **plan_health(plan),
    }


def _open_plan(config: BuildConfig, recipe: CalibrationRecipe, identity: dict[str, Any], parallel: DataParallel):
    """The plan to fill: rank 0 opens (or resumes) the one in ``plan_dir``; the other ranks then
    read the blocks it found and keep their copy in memory only."""
    if parallel.writes:
        plan = QuantPlan.open(config.plan_dir(), recipe.as_dict(), identity)
    parallel.barrier()
    if not parallel.writes:
        plan = QuantPlan.open(config.plan_dir(), recipe.as_dict(), identity)
        plan.directory = None
    parallel.barrier()  # before rank 0 can finish (and write) a block the others would then skip
    return plan


def plan_health(plan: QuantPlan) -> dict[str, Any]:
    reports = [r for b in plan.blocks.values() for r in b.matrix_reports.values()]
    return {
        "min_dominance_margin": min((r["min_dominance_margin"] for r in reports), default=None),
        "max_condition_number": max((r["condition_number"] for r in reports), default=None),
        "max_inverse_error": max((r["inverse_error"] for r in reports), default=None),
        "blocks": {i: {"output_mse": b.output_mse, "seconds": b.seconds} for i, b in plan.blocks.items()},
    }


def evaluation_windows(config: BuildConfig, tokenizer):
    evaluation = config.evaluation
    if evaluation.text is None:
        return None
    return text_windows(tokenizer, evaluation.text, evaluation.seqlen, evaluation.max_windows, EVALUATION_TEXT)


def torch_perplexity(model, windows) -> float | None:
    return None if windows is None else perplexity(torch_logits_of(model), windows).perplexity


def run_calibration(
    config: BuildConfig, config_dir: Path, on_block: Callable[[int, int], None] = lambda d, t: None
) -> dict[str, Any] | None:
    """Calibrate, evaluate and write ``report.json`` into the plan directory; under ``torchrun``
    every rank calibrates, only rank 0 evaluates and writes, the others return ``None``."""
    require_calibratable(config)
    parallel = from_environment(config.calibration.windows_per_step)
    source = resolve_source(config.model, config_dir)
    streaming = streaming_for(config, source)  # under torchrun every rank holds the model: one block each
    loaded = load_model(config.model, config_dir, streamed=streaming.streamed)
    layout = cache_layout(loaded.model)
    if not parallel.writes:
        calibrate_loaded(config, loaded, layout)
        return None
    windows = evaluation_windows(config, loaded.tokenizer)
    fp = torch_perplexity(loaded.model, windows)
    plan, report = calibrate_loaded(config, loaded, layout, on_block)
    quantized = torch_perplexity(loaded.model, windows)
    if windows is not None:
        report["evaluation"] = {
            "text": str(config.evaluation.text),  # made relative to the plan directory when written
            "seqlen": config.evaluation.seqlen,
            "windows": int(windows.shape[0]),
            "fp_perplexity": fp,
            "fake_quant_perplexity": quantized,
            "ratio": quantized / fp,
        }
    else:
        report["evaluation"] = None
    _write_report(plan.directory, report)
    return report


def _write_report(plan_dir: Path, report: dict[str, Any]) -> None:
    """``report.json`` in the plan directory, which moves with its project: the plan directory
    is ``"."`` and the evaluation text relative to it, never a build machine's absolute path
    (the plan's identity already names the calibration text by its sha256)."""
    portable = {**report, "plan_dir": "."}
    if portable.get("evaluation"):
        text = os.path.relpath(portable["evaluation"]["text"], plan_dir)
        portable["evaluation"] = {**portable["evaluation"], "text": Path(text).as_posix()}
    try:
        write_atomically(plan_dir / "report.json", (json.dumps(portable, indent=2, default=str) + "\n").encode())
    except OSError as error:
        full = out_of_space(error, plan_dir, "free space there, then re-run: the finished plan is kept")
        if full is None:
            raise
        raise full from error
