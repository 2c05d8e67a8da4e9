"""Lowered SmolLM2-135M-Instruct artifacts: ONNX Runtime against the PyTorch fake-quant model.

For each preset, builds the packaged SmolLM2 with ``affinequant`` and verifies the artifact
(WikiText-2 test, seqlen 512, first 40 windows, both sides on the same windows). Plans left by
``benchmarks/calibration.py`` in ``benchmarks/out/plans`` are lowered as they are (the build
finds them finished); a preset without one is calibrated by the build with the config defaults.
Writes per-preset perplexities, size, build time and per-pass node counts and time.

    python benchmarks/lowering.py [--presets w4a16g128,w8a8,w4a8,w4a4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

from aqexport.config import load_config  # noqa: E402
from aqexport.pipeline import build  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "benchmarks" / "out"
RESULTS = OUT / "lowering.json"
FP32_REPORT = ROOT / "build" / "smollm2-fp32" / "report.json"  # from benchmarks/skeleton.py, if built


def build_preset(preset: str, work: Path) -> dict:
    config = {
        "model": {"source": "default"},
        "quantization": {"recipe": "affinequant", "preset": preset},
        "calibration": {"data": str(DATA / "valid.txt"), "plan_dir": str(OUT / "plans" / f"affinequant-{preset}")},
        "evaluation": {"text": str(DATA / "test.txt"), "seqlen": 512, "max_windows": 40, "generate_tokens": 32},
        "output": {"dir": str(work / preset)},
    }
    path = work / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(config))
    artifact = build(load_config(path), work)
    report = json.loads((artifact / "report.json").read_text())
    manifest = json.loads((artifact / "manifest.json").read_text())
    verification = report["verification"]
    return {
        "onnx_perplexity": verification["perplexity"]["onnx"]["perplexity"],
        "fake_quant_perplexity": verification["perplexity"]["pytorch"]["perplexity"],
        "relative_difference": verification["perplexity"]["relative_difference"],
        "fp_perplexity": report["calibration"]["fp_perplexity"],
        "greedy_identical": verification["greedy"]["identical_to_pytorch"],
        "prefill_max_rel": verification["logits_parity"]["prefill"]["max_rel"],
        "model_bytes": report["model_bytes"],
        "resumed_from_block": report["calibration"]["resumed_from_block"],
        "timings": report["timings"],
        "passes": manifest["passes"],
        "activations": report["quantization"].get("activations"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="w4a16g128,w8a8,w4a8,w4a4")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        for preset in args.presets.split(","):
            if preset in results:
                continue
            results[preset] = build_preset(preset, Path(tmp))
            RESULTS.write_text(json.dumps(results, indent=1))
            print(preset, {k: v for k, v in results[preset].items() if k != "passes"}, flush=True)
    fp32_bytes = json.loads(FP32_REPORT.read_text())["model_bytes"] if FP32_REPORT.exists() else None
    rows, pass_rows = [], []
    for preset, r in results.items():
        size = r["model_bytes"] / 2**20
        ratio = f"{r['model_bytes'] / fp32_bytes:.2f}×" if fp32_bytes else "–"
        rows.append(
            f"| {preset} | {r['fp_perplexity']:.4f} | {r['fake_quant_perplexity']:.4f} | {r['onnx_perplexity']:.4f} "
            f"| {100 * r['relative_difference']:.4f} % | {r['greedy_identical']} | {size:.1f} MiB ({ratio}) "
            f"| {r['timings'].get('lower', 0):.1f} s |"
        )
        for p in r["passes"]:
            pass_rows.append(
                f"| {preset} | {p['pass']} | {p['nodes_before']} | {p['nodes_after']} | {p['seconds']:.2f} s |"
            )
    fp32_note = (
        f"fp32 artifact for the size ratio: {fp32_bytes / 2**20:.1f} MiB (`benchmarks/skeleton.py`)."
        if fp32_bytes
        else "No fp32 artifact was built in this checkout: run `python benchmarks/skeleton.py` for the size ratio."
    )
    body = f"""
## Lowering: SmolLM2-135M-Instruct affinequant artifacts under ONNX Runtime

Each row is one `aqexport build` (plans from `benchmarks/calibration.py` where present), verified
on WikiText-2 test, seqlen 512, first 40 windows: fp PyTorch, the PyTorch fake-quant model of the
plan, and the ONNX artifact on the ONNX Runtime CPU EP. Weights are `MatMulNBits` (4-bit; 8-bit
for w8a8); activation presets quantize per token with an explicit float subgraph (simulation:
no ORT kernel runs per-token asymmetric integer activations). LM head and embedding stay fp32.
{fp32_note} Machine: {machine()}. Measured {date.today()} at commit {commit_id()} with
`python benchmarks/lowering.py`.

| preset | fp ppl | fake-quant ppl | ORT ppl | ORT vs fake-quant | greedy same | size | lowering |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Per pass (node counts before → after, time):

| preset | pass | nodes before | nodes after | time |
|---|---|---|---|---|
{chr(10).join(pass_rows)}
"""
    print(write_section("lowering", body))


if __name__ == "__main__":
    main()
