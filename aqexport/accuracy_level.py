"""The MatMulNBits accuracy level, chosen by measurement instead of fixed per format.

At ``accuracy_level`` 4 ONNX Runtime's CPU kernels quantize each 4-bit linear's input to int8
per block and run integer dot products; at 0 they keep float activations. Level 4 is the fast
path (what the genai model builder ships), but it adds a rounding the calibrated plan never saw,
and what that costs depends on the model and the method: AffineQuant's transforms exist to tame
exactly the activation outliers that make int8 activations lossy. So with ``target.accuracy_level``
left unset (cpu profile, MatMulNBits weights), the build emits level 4, verifies the artifact,
and keeps level 4 only if its ONNX Runtime perplexity stays within
``target.accuracy_tolerance`` (relative) of the plan's PyTorch fake-quant perplexity, the model
the calibration optimised; otherwise it rewrites the 2-4-bit nodes to level 0
(``passes/accuracy_level.py``) and verifies again. Both trials, the choice and its cost (the
chosen level's perplexity relative to the fake-quant model) go to ``report.json``. Without an
evaluation text nothing can be measured, and the build takes the level that cannot lose accuracy.

Whole model rather than per linear: one extra perplexity run decides it, and per-linear choices
would need one run per linear (or a proxy); the record keeps the door open for that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from aqexport.artifact import DATA_FILE, MODEL_FILE, save_model
from aqexport.passes.accuracy_level import AccuracyLevelPass
from aqexport.passes.accuracy_level import low_bit_matmuls as low_bit_nodes
from aqexport.target import FAST_LEVEL, SAFE_LEVEL

__all__ = ["FAST_LEVEL", "SAFE_LEVEL", "choose_accuracy_level", "fixed_level_record", "low_bit_matmuls"]

logger = logging.getLogger(__name__)


def low_bit_matmuls(model_path: Path) -> int:
    """How many 2-4-bit MatMulNBits the written graph holds (the ones the level matters for);
    ``ir.load`` leaves the external weights unread."""
    return len(low_bit_nodes(ir.load(model_path).graph))


def _relevel(staging: Path, level: int) -> None:
    """Rewrite the written artifact's low-bit MatMulNBits to ``level``: saved beside it first and
    moved over it, so the external data being read is never the file being written."""
    model = ir.load(staging / MODEL_FILE)
    AccuracyLevelPass(level)(model)
    scratch = staging / ".relevel"
    scratch.mkdir()
    save_model(model, scratch)
    del model
    for name in (MODEL_FILE, DATA_FILE):
        os.replace(scratch / name, staging / name)
    scratch.rmdir()


def _trial(level: int, verification: dict[str, Any]) -> dict[str, Any] | None:
    section = verification.get("perplexity", {})
    onnx_ppl = section.get("onnx", {}).get("perplexity")
    reference = section.get("pytorch", {}).get("perplexity")
    if onnx_ppl is None or reference is None:
        return None
    return {"level": level, "perplexity": onnx_ppl, "vs_fake_quant": onnx_ppl / reference - 1.0}


def fixed_level_record(level: int, verification: dict[str, Any], reason: str) -> dict[str, Any]:
    """The record of a level the profile fixes (mobile: ``Target.mobile_accuracy_level``): not
    measured against another level, but its cost against the plan's fake-quant perplexity is
    still stated where verification computed both."""
    trial = _trial(level, verification)
    return {
        "measured": False,
        "reason": reason,
        "chosen": level,
        "cost": None if trial is None else trial["vs_fake_quant"],
        "trials": [] if trial is None else [trial],
    }


def choose_accuracy_level(
    staging: Path, verify: Callable[[], dict[str, Any]], tolerance: float, can_measure: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify the artifact as emitted (at ``FAST_LEVEL``), fall back to ``SAFE_LEVEL`` if its
    perplexity is out of ``tolerance``; returns the final verification and the choice's record.
    ``can_measure``: the verification computes both perplexities (else straight to the safe level)."""
    record: dict[str, Any] = {
        "tolerance": tolerance,
        "reference": "the plan's PyTorch fake-quant perplexity (verification windows)",
        "trials": [],
    }
    fast = None
    if can_measure:
        verification = verify()
        fast = _trial(FAST_LEVEL, verification)
    if fast is None:
        record["measured"] = False
        record["reason"] = "no perplexity to compare (evaluation.text null or compare_pytorch false)"
    elif fast["vs_fake_quant"] <= tolerance:
        record["trials"].append(fast)
        record.update(measured=True, chosen=FAST_LEVEL, cost=fast["vs_fake_quant"])
        return verification, record
    else:
        record["trials"].append(fast)
        record["measured"] = True
    logger.info("accuracy level %d out of tolerance (%s): rewriting to %d", FAST_LEVEL, fast, SAFE_LEVEL)
    _relevel(staging, SAFE_LEVEL)
    verification = verify()
    safe = _trial(SAFE_LEVEL, verification)
    if safe is not None:
        record["trials"].append(safe)
    record.update(chosen=SAFE_LEVEL, cost=None if safe is None else safe["vs_fake_quant"])
    return verification, record
