"""Shared by the benchmarks that build the packaged SmolLM2: where the data and the calibration
plans live, and the model.yaml of one variant.

A variant is a ``quantization`` section with an optional ``target`` key for the target section.
Variants that differ only in lowering share one plan directory (named by recipe, preset and
LLM.int8 split), so a plan left by ``benchmarks/calibration.py`` is lowered, not recalibrated.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "benchmarks" / "out"


def plan_name(quantization: dict) -> str:
    split = quantization.get("outlier_split")
    return "-".join(str(v) for v in (quantization["recipe"], quantization.get("preset"), split) if v)


def write_smollm2_config(
    variant: dict, output: Path, path: Path, max_windows: int, generate_tokens: int, seqlen: int = 512
) -> Path:
    """Write the model.yaml of ``variant`` to ``path``, building into ``output``."""
    quantization = {k: v for k, v in variant.items() if k != "target"}
    config = {
        "model": {"source": "default"},
        "quantization": quantization,
        "target": variant.get("target", {}),
        "evaluation": {
            "text": str(DATA / "test.txt"),
            "seqlen": seqlen,
            "max_windows": max_windows,
            "generate_tokens": generate_tokens,
        },
        "output": {"dir": str(output)},
    }
    if quantization["recipe"] != "none":
        plan_dir = OUT / "plans" / plan_name(quantization)
        config["calibration"] = {"data": str(DATA / "valid.txt"), "plan_dir": str(plan_dir)}
    path.write_text(yaml.safe_dump(config))
    return path
