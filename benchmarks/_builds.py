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


#: The config the README builds: the shipped default.
EXAMPLE = ROOT / "examples" / "smollm2-affinequant-w4a16g128.yaml"


def write_example_config(output: Path, build: dict | None = None) -> Path:
    """The shipped example with its paths made absolute, a fresh output and plan directory of its
    own (``<output>`` and ``<output>.plan``, removed first) and ``build`` merged into its
    ``build:`` section; written to ``<output>.yaml``."""
    import shutil

    config = yaml.safe_load(EXAMPLE.read_text())
    for section, key in (("calibration", "data"), ("evaluation", "text")):
        config[section][key] = str((EXAMPLE.parent / config[section][key]).resolve())
    plan_dir = output.with_name(f"{output.name}.plan")
    config["calibration"]["plan_dir"] = str(plan_dir)
    config["output"]["dir"] = str(output)
    if build:
        config["build"] = {**config.get("build", {}), **build}
    for leftover in (output, plan_dir):
        shutil.rmtree(leftover, ignore_errors=True)
    path = output.with_name(f"{output.name}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build_report_row(output: Path) -> dict:
    """What the build benchmarks keep of a finished build's report.json: each stage's seconds,
    its running peak RSS, and the artifact's perplexity under ONNX Runtime."""
    import json

    report = json.loads((output / "report.json").read_text())
    return {
        "timings": report["timings"],
        "peak_rss_mib": report["memory"]["peak_rss_mib"],
        "streamed": report["memory"]["streamed"],
        "ppl_onnx": report["verification"]["perplexity"]["onnx"]["perplexity"],
    }
