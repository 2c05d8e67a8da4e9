"""``aqexport calibrate``: produce a QuantPlan and measure its PyTorch fake-quant perplexity.

Calibration is the expensive, resumable half of a quantized build, so it has its own command
and its own persistent directory (``calibration.plan_dir``, default ``<output.dir>.plan``):
a killed run resumes from the last finished block, and a finished plan can be lowered for any
target later without recalibrating. The plan directory gets ``report.json`` with fp and
fake-quant perplexity on the evaluation windows, calibration time, and per-block matrix health.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aqexport.artifact import write_json
from aqexport.calibrate.data import calibration_windows
from aqexport.calibrate.engine import calibrate
from aqexport.calibrate.plan import QuantPlan
from aqexport.calibrate.recipe import make_recipe
from aqexport.capture import cache_layout
from aqexport.config import BuildConfig, require_calibratable
from aqexport.reference import torch_logits_of
from aqexport.runtime import perplexity, split_windows
from aqexport.sources import load_model
from aqexport.verify import tokenize_text

__all__ = ["run_calibration"]


def _perplexity(model, windows) -> float | None:
    return None if windows is None else perplexity(torch_logits_of(model), windows).perplexity


def run_calibration(
    config: BuildConfig, config_dir: Path, on_block: Callable[[int, int], None] = lambda d, t: None
) -> dict[str, Any]:
    require_calibratable(config)
    spec = config.calibration
    quant = config.quantization
    recipe = make_recipe(
        quant.recipe,
        quant.preset,
        spec.epochs,
        spec.seed,
        alpha=quant.alpha,
        init=quant.init,
        aug_loss=quant.aug_loss,
        static_activations=quant.activations == "static",
        train_dtype=quant.train_dtype,
        stability_factor=quant.stability_factor,
        lr_transform=quant.lr_transform,
        lr_lwc=quant.lr_lwc,
    )
    loaded = load_model(config.model, config_dir)
    model = loaded.model
    layout = cache_layout(model)
    evaluation = config.evaluation
    eval_windows = None
    if evaluation.text is not None:
        eval_windows = split_windows(
            tokenize_text(loaded.tokenizer, evaluation.text), evaluation.seqlen, evaluation.max_windows
        )
    windows = calibration_windows(loaded.tokenizer, spec.data, spec.samples, spec.seqlen, spec.seed)
    identity = {
        "source_sha256": loaded.source_sha256,
        "architecture": loaded.architecture.model_type,
        "samples": spec.samples,
        "seqlen": spec.seqlen,
        "data": str(spec.data),
    }
    plan = QuantPlan.open(config.plan_dir(), recipe.as_dict(), identity)
    resumed_blocks = len(plan.blocks)
    fp = _perplexity(model, eval_windows)
    start = time.perf_counter()
    calibrate(model, windows, recipe, plan, layout.head_dims[0], layout.kv_heads[0], on_block)
    seconds = time.perf_counter() - start
    quantized = _perplexity(model, eval_windows)
    margins = [r["min_dominance_margin"] for b in plan.blocks.values() for r in b.matrix_reports.values()]
    conditions = [r["condition_number"] for b in plan.blocks.values() for r in b.matrix_reports.values()]
    report = {
        "recipe": recipe.as_dict(),
        "plan_dir": str(plan.directory),
        "calibration_seconds": seconds,
        "resumed_from_block": resumed_blocks,
        "samples": spec.samples,
        "seqlen": spec.seqlen,
        "evaluation": None
        if eval_windows is None
        else {
            "text": str(evaluation.text),
            "seqlen": evaluation.seqlen,
            "windows": int(eval_windows.shape[0]),
            "fp_perplexity": fp,
            "fake_quant_perplexity": quantized,
            "ratio": quantized / fp,
        },
        "min_dominance_margin": min(margins) if margins else None,
        "max_condition_number": max(conditions) if conditions else None,
        "blocks": {i: {"output_mse": b.output_mse, "seconds": b.seconds} for i, b in sorted(plan.blocks.items())},
    }
    write_json(plan.directory / "report.json", report)
    return report
