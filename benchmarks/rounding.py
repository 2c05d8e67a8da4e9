"""Weight rounding after the transforms: nearest against GPTQ, SmolLM2 PyTorch fake-quant.

Each row calibrates SmolLM2-135M-Instruct with the config defaults sized for a 2-core CPU (16
random windows of 256 tokens of WikiText-2 valid, 4 epochs) and one rounding method, then
scores the fake-quant model on WikiText-2 test, seqlen 512, first 40 windows (the scorer the
build's verification uses). The recipe is built from its registered config (``make_recipe``),
so a row is exactly what ``quantization: {recipe: M, preset: P, rounding: R}`` calibrates.
Rows accumulate in benchmarks/out/rounding.json (a rerun skips measured rows).

    python benchmarks/rounding.py [--methods rtn,affinequant] [--presets w4a16g128] [--roundings nearest,gptq]
        [--gptq-variants 32768/act,32768/natural,4096/natural]

A GPTQ variant is ``TOKENS/act`` or ``TOKENS/natural``: the Hessians' calibration tokens (windows
of their own beyond the training ones, as a build draws them) and the column order.
"""

from __future__ import annotations

import argparse
import json
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
from aqexport.calibration_run import hessian_windows_for  # noqa: E402
from aqexport.recipes import make_recipe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "out" / "rounding.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="rtn,affinequant")
    parser.add_argument("--presets", default="w4a16g128")
    parser.add_argument("--roundings", default="nearest,gptq")
    parser.add_argument("--gptq-variants", default="32768/act")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    bench = FakeQuantBench.smollm2()
    defaults, layout = bench.defaults, bench.layout
    if "fp" not in results:
        results["fp"] = bench.perplexity()
    for preset in args.presets.split(","):
        for method in args.methods.split(","):
            variants = [("nearest", "nearest")] if "nearest" in args.roundings.split(",") else []
            if "gptq" in args.roundings.split(","):
                for variant in args.gptq_variants.split(","):
                    tokens, order = variant.split("/")
                    rounding = {"method": "gptq", "tokens": int(tokens), "act_order": order == "act"}
                    named = "act order" if order == "act" else "natural order"
                    variants.append((f"gptq {tokens} tokens, {named}", rounding))
            for label, rounding in variants:
                key = f"{method}/{preset}/{label}"
                if key in results:
                    continue
                model = bench.reset()
                recipe = make_recipe(method, preset, defaults.epochs, defaults.seed, rounding=rounding)
                extra = hessian_windows_for(bench.loaded, defaults, recipe.rounding.hessian_tokens)
                start = time.perf_counter()
                plan = QuantPlan(recipe.as_dict(), {})
                heads, kv_heads = layout.head_dims[0], layout.kv_heads[0]
                calibrate(model, bench.calibration, recipe, plan, heads, kv_heads, hessian_windows=extra)
                seconds = time.perf_counter() - start
                results[key] = {"perplexity": bench.perplexity(), "seconds": seconds}
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=1))
                print(key, results[key], flush=True)
    fp = results["fp"]
    rows = [
        f"| {key.replace('/', ' | ')} | {r['perplexity']:.4f} | {r['perplexity'] / fp:.3f} | {r['seconds']:.0f} s |"
        for key, r in results.items()
        if key != "fp"
    ]
    body = f"""
## Rounding after the transforms: nearest vs GPTQ, SmolLM2-135M-Instruct, PyTorch fake-quant

Calibration: {defaults.samples} random windows × {defaults.seqlen} tokens of WikiText-2 valid (seed {defaults.seed}),
{defaults.epochs} epochs; GPTQ's Hessians come from TOKENS calibration tokens (the training windows when
that is 4096, else windows of their own), as each linear sees them in the calibrated model (after
the transform, on the quantized blocks' activations), and its codes stay
on the grid the recipe froze (the learned clipping). Evaluation: WikiText-2 test, seqlen 512,
first 40 windows; fp32 {fp:.4f}. LM head and embedding in float. Measured {date.today()} at commit
{commit_id()} with `python benchmarks/rounding.py`; calibration time includes GPTQ.

| method | preset | rounding | perplexity | ratio to fp | calibration time |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    print(write_section("rounding", body))


if __name__ == "__main__":
    main()
