"""Fake-quant perplexity of SmolLM2-135M-Instruct per calibration method and preset.

Each method calibrates with the config defaults sized for a 2-core CPU (16 random windows of
256 tokens of WikiText-2 valid, 4 epochs), then the PyTorch fake-quant model is scored on
WikiText-2 test, seqlen 512, first 40 windows: the same scorer as the build's verification.
Results accumulate in benchmarks/out/calibration.json (a rerun skips rows already measured, so
an interrupted run continues), and the table goes into BENCHMARKS.md.

    python benchmarks/calibration.py [--presets w4a16g128,...] [--methods rtn,...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _fake_quant import FakeQuantBench  # noqa: E402
from _report import commit_id, write_section  # noqa: E402

from aqexport.calibrate.engine import calibrate  # noqa: E402
from aqexport.calibrate.plan import QuantPlan  # noqa: E402
from aqexport.calibration_run import plan_identity  # noqa: E402
from aqexport.recipes import make_recipe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "out" / "calibration.json"
PLANS = ROOT / "benchmarks" / "out" / "plans"  # kept so benchmarks/lowering.py lowers the same plans
TARGETS = {"w4a16": 1.08, "w4a16g128": 1.04, "w3a16g128": 1.20, "w4a8": 1.10, "w4a4": 1.60}
METHODS = ("rtn", "smoothquant", "omniquant", "affinequant")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default=",".join(TARGETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--init", default=None, help="override the recipe's init (a side row, key method/preset/init)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    bench = FakeQuantBench.smollm2()
    defaults, loaded, layout = bench.defaults, bench.loaded, bench.layout
    if "fp" not in results:
        results["fp"] = bench.perplexity()
    for preset in args.presets.split(","):
        for method in args.methods.split(","):
            key = f"{method}/{preset}" + (f"/init={args.init}" if args.init else "")
            if key in results:
                continue
            model = bench.reset()
            recipe = make_recipe(method, preset, defaults.epochs, defaults.seed, init=args.init)
            start = time.perf_counter()
            plan_dir = PLANS / key.replace("/", "-")
            if plan_dir.exists():
                shutil.rmtree(plan_dir)  # this row is being re-measured: never resume a stale plan
            plan = QuantPlan.open(plan_dir, recipe.as_dict(), plan_identity(loaded, defaults))
            calibrate(model, bench.calibration, recipe, plan, layout.head_dims[0], layout.kv_heads[0])
            seconds = time.perf_counter() - start
            ppl = bench.perplexity()
            results[key] = {"perplexity": ppl, "seconds": seconds}
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1))
            print(key, results[key], flush=True)
    fp = results["fp"]
    rows = [f"| fp32 | – | {fp:.4f} | 1.000 | – | – |"]
    side = [
        f"| {key} | {value['perplexity']:.4f} | {value['perplexity'] / fp:.3f} | {value['seconds']:.0f} s |"
        for key, value in results.items()
        if key.count("/") == 2
    ]
    orders = []
    for preset in TARGETS:
        measured = {m: results[f"{m}/{preset}"] for m in METHODS if f"{m}/{preset}" in results}
        for method, value in measured.items():
            ratio = value["perplexity"] / fp
            target = ""
            if method == "affinequant":
                target = f"≤ {TARGETS[preset]:.2f} ({'met' if ratio <= TARGETS[preset] else 'missed'})"
            rows.append(
                f"| {method} | {preset} | {value['perplexity']:.4f} | {ratio:.3f} | {target} "
                f"| {value['seconds']:.0f} s |"
            )
        if {"rtn", "omniquant", "affinequant"} <= measured.keys():
            ppl = {m: measured[m]["perplexity"] for m in measured}
            holds = ppl["affinequant"] < ppl["omniquant"] < ppl["rtn"]
            orders.append(f"- {preset}: affinequant < omniquant < rtn {'holds' if holds else 'does not hold'}")
    body = f"""
## Calibration: SmolLM2-135M-Instruct, PyTorch fake-quant, per method and preset

Calibration: {defaults.samples} random windows × {defaults.seqlen} tokens of WikiText-2 valid (seed
{defaults.seed}), {defaults.epochs} epochs (the config defaults for this 2-core machine; the paper
uses 128 × 2048 and 20 epochs). Evaluation: WikiText-2 test, seqlen 512, first 40 windows.
Asymmetric weights, LM head and embedding in float; activation presets quantize every
linear's input per token (asymmetric, dynamic), not the attention matmuls' Q/K/V. Measured {date.today()} at commit
{commit_id()} with `python benchmarks/calibration.py`.

| method | preset | perplexity | ratio to fp | issue target | calibration time |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Ordering required by the issue (perplexity):
{chr(10).join(orders)}

Side rows (one knob changed against the defaults, `--init`):

| method/preset/change | perplexity | ratio to fp | calibration time |
|---|---|---|---|
{chr(10).join(side)}
"""
    print(write_section("calibration", body))


if __name__ == "__main__":
    main()
