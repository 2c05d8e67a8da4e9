"""Lowered SmolLM2-135M-Instruct artifacts: ONNX Runtime against the PyTorch fake-quant model.

Each variant is one ``aqexport build`` of the packaged SmolLM2, verified on WikiText-2 test
(seqlen 512, first 40 windows, both sides on the same windows). Plans left by
``benchmarks/calibration.py`` in ``benchmarks/out/plans`` are lowered as they are (the build
finds them finished); a variant without one is calibrated by the build with the config
defaults. The fp32 build is one of the variants, so size ratios come from the same run.
Writes per-variant perplexities, size, build time and per-pass node counts and time.

    python benchmarks/lowering.py [--variants fp32,w4a16g128,llm_int8,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _builds import OUT, write_smollm2_config  # noqa: E402
from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

from aqexport.config import load_config  # noqa: E402
from aqexport.pipeline import build  # noqa: E402

RESULTS = OUT / "lowering.json"


#: name -> quantization section and optional target section (plans are shared by variants that
#: differ only in lowering). ``-level0``: 8-bit MatMulNBits at accuracy_level 0 (exact, slow on
#: CPU); without it the default (auto: level 4 for 8-bit weights).
VARIANTS: dict[str, dict] = {
    "fp32": {"recipe": "none"},
    "w4a16g128": {"recipe": "affinequant", "preset": "w4a16g128"},
    "w4a16g128-head8-emb4": {"recipe": "affinequant", "preset": "w4a16g128", "lm_head": "int8", "embedding": "int4"},
    "w4a16g128-head4-emb4": {"recipe": "affinequant", "preset": "w4a16g128", "lm_head": "int4", "embedding": "int4"},
    "w8a8": {"recipe": "affinequant", "preset": "w8a8"},
    "w8a8-level0": {"recipe": "affinequant", "preset": "w8a8", "target": {"accuracy_level": 0}},
    "w4a8": {"recipe": "affinequant", "preset": "w4a8"},
    "w4a4": {"recipe": "affinequant", "preset": "w4a4"},
    "w4a16g128-head8-emb4-level0": {
        "recipe": "affinequant",
        "preset": "w4a16g128",
        "lm_head": "int8",
        "embedding": "int4",
        "target": {"accuracy_level": 0},
    },
    "llm_int8": {"recipe": "llm_int8"},
    "llm_int8-level0": {"recipe": "llm_int8", "target": {"accuracy_level": 0}},
    "llm_int8-static": {"recipe": "llm_int8", "outlier_split": "static", "target": {"accuracy_level": 0}},
}


def build_preset(preset: str, work: Path) -> dict:
    path = write_smollm2_config(VARIANTS[preset], work / preset, work / f"{preset}.yaml", 40, 32)
    artifact = build(load_config(path), work)
    report = json.loads((artifact / "report.json").read_text())
    manifest = json.loads((artifact / "manifest.json").read_text())
    verification = report["verification"]
    calibration = report.get("calibration", {})
    return {
        "onnx_perplexity": verification["perplexity"]["onnx"]["perplexity"],
        "fake_quant_perplexity": verification["perplexity"]["pytorch"]["perplexity"],
        "relative_difference": verification["perplexity"]["relative_difference"],
        "fp_perplexity": calibration.get("fp_perplexity", verification["perplexity"]["pytorch"]["perplexity"]),
        "greedy_identical": verification["greedy"]["identical_to_pytorch"],
        "prefill_max_rel": verification["logits_parity"]["prefill"]["max_rel"],
        "model_bytes": report["model_bytes"],
        "resumed_from_block": calibration.get("resumed_from_block"),
        "timings": report["timings"],
        "passes": [
            {**p, "seconds": t["seconds"]}
            for p, t in zip(manifest["passes"], manifest["not_reproducible"]["pass_seconds"])
        ],
        "activations": report["quantization"].get("activations"),
        "ladder": report.get("parity_ladder"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rerun", action="store_true", help="rebuild variants already in benchmarks/out/lowering.json")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        for preset in args.variants.split(","):
            if preset in results and not args.rerun:
                continue
            results[preset] = {**build_preset(preset, Path(tmp)), "commit": commit_id()}
            RESULTS.write_text(json.dumps(results, indent=1))
            print(preset, {k: v for k, v in results[preset].items() if k != "passes"}, flush=True)
    fp32_bytes = results["fp32"]["model_bytes"] if "fp32" in results else None
    rows, pass_rows = [], []
    for preset, r in results.items():
        size = r["model_bytes"] / 2**20
        ratio = f"{r['model_bytes'] / fp32_bytes:.2f}×" if fp32_bytes else "–"
        ladder = r.get("ladder") or {}
        folded = f"{ladder['folded_fp_vs_eager']['max_rel']:.1e}" if "folded_fp_vs_eager" in ladder else "–"
        rows.append(
            f"| {preset} | {r['fp_perplexity']:.4f} | {r['fake_quant_perplexity']:.4f} | {r['onnx_perplexity']:.4f} "
            f"| {100 * r['relative_difference']:.4f} % | {r['greedy_identical']} | {size:.1f} MiB ({ratio}) "
            f"| {r['timings'].get('lower', 0):.1f} s | {folded} | {r.get('commit', '?')} |"
        )
        for p in r["passes"]:
            pass_rows.append(
                f"| {preset} | {p['pass']} | {p['nodes_before']} | {p['nodes_after']} | {p['seconds']:.2f} s |"
            )
    fp32_note = "" if fp32_bytes else "No fp32 variant in this run, so no size ratio."
    body = f"""
## Lowering: SmolLM2-135M-Instruct artifacts under ONNX Runtime

Each row is one `aqexport build` (plans from `benchmarks/calibration.py` where present), verified
on WikiText-2 test, seqlen 512, first 40 windows: fp PyTorch, the PyTorch fake-quant model of the
plan (for fp32: the exported PyTorch model), and the ONNX artifact on the ONNX Runtime CPU EP.
Weights are `MatMulNBits` (4-bit; 8-bit for w8a8 and llm_int8); activation presets quantize per
token with an explicit float subgraph (simulation: no ORT kernel runs per-token integer
activations). `headN-embM`: LM head as N-bit MatMulNBits and embedding as M-bit
GatherBlockQuantized (RTN, groups of 128); otherwise both stay fp32. `llm_int8`: τ = 6, dynamic
(bitsandbytes) or static (outlier set from calibration) split. `-level0`: 8-bit MatMulNBits at
accuracy_level 0 (float arithmetic, the plan exactly); otherwise the default, level 4 for 8-bit
weights (ORT quantizes their inputs to int8 per block), which is what the CPU runs fast. "folded fp": max relative logit
difference of the graph with the transforms folded in but weights unquantized, against HF eager
(the parity ladder; rows without it predate it). {fp32_note}
Machine: {machine()}. Table written {date.today()} by `python benchmarks/lowering.py`; rows are
cached in `benchmarks/out/lowering.json` between runs, so each row names the commit it was built at.

| variant | fp ppl | fake-quant ppl | ORT ppl | ORT vs fake-quant | greedy same | size | lowering | folded fp | commit |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Per pass (node counts before → after, time):

| variant | pass | nodes before | nodes after | time |
|---|---|---|---|---|
{chr(10).join(pass_rows)}
"""
    print(write_section("lowering", body))


if __name__ == "__main__":
    main()
