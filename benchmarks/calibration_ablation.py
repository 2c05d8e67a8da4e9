"""Which training defaults make AffineQuant work on a 2-core schedule: a cheap ablation.

Calibrates only the first ``--blocks`` decoder blocks of SmolLM2-135M-Instruct (the model is cut
there) with each variant and reports the propagated output error of the last block and the
summed block errors: the quantity the block-wise loop minimises, at a fraction of a full run's
cost. The defaults in ``aqexport.calibrate.recipe`` were chosen from this table.

    python benchmarks/calibration_ablation.py [--preset w4a16g128] [--blocks 6]
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

from _report import commit_id, write_section  # noqa: E402

from aqexport.calibrate.data import calibration_windows  # noqa: E402
from aqexport.calibrate.engine import calibrate  # noqa: E402
from aqexport.calibrate.plan import QuantPlan  # noqa: E402
from aqexport.capture import cache_layout  # noqa: E402
from aqexport.config import CalibrationSpec, ModelSpec  # noqa: E402
from aqexport.recipes import make_recipe  # noqa: E402
from aqexport.sources import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULTS = ROOT / "benchmarks" / "out" / "calibration_ablation.json"

VARIANTS: dict[str, tuple[str, dict]] = {
    "rtn": ("rtn", {}),
    "smoothquant α=0.5": ("smoothquant", {}),
    "omniquant, identity init": ("omniquant", {"init": "identity"}),
    "omniquant, SmoothQuant base": ("omniquant", {"init": "smoothquant"}),
    "affinequant, identity init, sf=1.0 (reference)": ("affinequant", {"init": "identity", "stability_factor": 1.0}),
    "affinequant, identity init, sf=0.05": ("affinequant", {"init": "identity", "stability_factor": 0.05}),
    "affinequant, identity init, sf=0.001": ("affinequant", {"init": "identity", "stability_factor": 0.001}),
    "affinequant, identity init, sf=0.003": ("affinequant", {"init": "identity", "stability_factor": 0.003}),
    "affinequant, identity init, sf=0.02": ("affinequant", {"init": "identity", "stability_factor": 0.02}),
    "affinequant, identity init, sf=0.01": ("affinequant", {"init": "identity", "stability_factor": 0.01}),
    "affinequant, SmoothQuant base, sf=0.003": ("affinequant", {"init": "smoothquant", "stability_factor": 0.003}),
    "affinequant, SmoothQuant base, sf=0.01": ("affinequant", {"init": "smoothquant", "stability_factor": 0.01}),
    "affinequant, SmoothQuant base, sf=0.03": ("affinequant", {"init": "smoothquant", "stability_factor": 0.03}),
    "affinequant, SmoothQuant base, sf=0.001": ("affinequant", {"init": "smoothquant", "stability_factor": 0.001}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="w4a16g128")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--variants", default=None, help="subset of variant names, separated by ;")
    args = parser.parse_args()
    defaults = CalibrationSpec()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    wanted = args.variants.split(";") if args.variants else list(VARIANTS)
    for name in wanted:
        key = f"{args.preset}/{args.blocks}/{name}"
        if key in results:
            continue
        loaded = load_model(ModelSpec(source="default"))
        model = loaded.model
        layout = cache_layout(model)
        model.model.layers = model.model.layers[: args.blocks]
        model.config.num_hidden_layers = args.blocks
        windows = calibration_windows(
            loaded.tokenizer, DATA / "valid.txt", defaults.samples, defaults.seqlen, defaults.seed
        )
        method, overrides = VARIANTS[name]
        recipe = make_recipe(method, args.preset, defaults.epochs, defaults.seed, **overrides)
        plan = QuantPlan(recipe.as_dict(), {})
        start = time.perf_counter()
        calibrate(model, windows, recipe, plan, layout.head_dims[0], layout.kv_heads[0])
        errors = [plan.blocks[i].output_mse for i in sorted(plan.blocks)]
        results[key] = {"last": errors[-1], "sum": sum(errors), "seconds": time.perf_counter() - start}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
        print(name, results[key], flush=True)
    rows = []
    for key, value in results.items():
        preset, blocks, name = key.split("/", 2)
        rows.append(
            f"| {preset} | {blocks} | {name} | {value['last']:.4e} | {value['sum']:.4e} | {value['seconds']:.0f} s |"
        )
    body = f"""
## Calibration ablation: training defaults on the first blocks of SmolLM2

Output MSE of the last calibrated block (errors of the quantized earlier blocks propagated) and
the sum over blocks, for each variant; {defaults.samples} windows × {defaults.seqlen} tokens,
{defaults.epochs} epochs. Lower is better. Measured {date.today()} at commit {commit_id()} with
`python benchmarks/calibration_ablation.py --preset PRESET --blocks N`.

| preset | blocks | variant | last block MSE | summed MSE | time |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    print(write_section("calibration-ablation", body))


if __name__ == "__main__":
    main()
