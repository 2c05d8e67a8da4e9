"""The calibration budget's accuracy-vs-time curve: the shipped default config at several
``samples × seqlen × epochs``, PyTorch fake-quant.

Each row is ``aqexport calibrate`` on ``examples/smollm2-affinequant-w4a16g128.yaml`` (its
recipe, rounding, LM head and embedding formats and its streamed load) with only the
calibration budget changed, into a fresh plan directory: the time is the calibrate stage as a
build spends it (block training, GPTQ rounding of the blocks and the head), the perplexity the
fake-quant model's on WikiText-2 test (the config's 40 × 512 windows). The default budget is
chosen from this table: the most accurate row whose calibration leaves the whole default build
within 15 minutes on this machine (its other stages: `benchmarks/stream_speed.py`).

Rows run one after another in this process and are kept in benchmarks/out/budget.json (a rerun
skips measured rows; ``--rerun`` measures them again). Run it alone on the machine: the times are
the curve's x axis. ``--build`` then builds the example as shipped, fresh (an empty plan
directory), in an ``aqexport build`` process of its own, and records each stage's time, the
peak RSS and the artifact's perplexity under ONNX Runtime: the 15-minute check.

    python benchmarks/budget.py [--budgets 16x256x4,16x256x8,32x256x4] [--build] [--render]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _builds import EXAMPLE, build_report_row, write_example_config  # noqa: E402
from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

from aqexport.calibration_run import run_calibration  # noqa: E402
from aqexport.config import load_config  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "budget"
RESULTS = ROOT / "benchmarks" / "out" / "budget.json"
HEADER = (
    "| samples × seqlen × epochs | tokens × epochs | calibrate | of it, the blocks | summed block MSE "
    "| fake-quant ppl | ratio to fp | load | measured at |\n|---|---|---|---|---|---|---|---|---|"
)
DEFAULT_BUDGETS = "2x64x2,16x256x4,16x256x8,32x256x4,32x256x8"


def parse_budget(text: str) -> dict[str, int]:
    samples, seqlen, epochs = (int(part) for part in text.split("x"))
    return {"samples": samples, "seqlen": seqlen, "epochs": epochs}


def measure(budget: str) -> dict:
    """One calibration of the default config at ``budget``, from an empty plan directory."""
    config = load_config(EXAMPLE)
    plan_dir = OUT / f"{budget}.plan"
    shutil.rmtree(plan_dir, ignore_errors=True)
    calibration = config.calibration.model_copy(update=parse_budget(budget) | {"plan_dir": plan_dir})
    config = config.model_copy(update={"calibration": calibration})
    load_before = os.getloadavg()[0]
    report = run_calibration(config, EXAMPLE.parent.resolve())
    evaluation = report["evaluation"]
    blocks = report["blocks"].values()
    return {
        "seconds": report["calibration_seconds"],
        "block_seconds": sum(block["seconds"] for block in blocks),
        "summed_mse": sum(block["output_mse"] for block in blocks),
        "fp": evaluation["fp_perplexity"],
        "perplexity": evaluation["fake_quant_perplexity"],
        "load": [load_before, os.getloadavg()[0]],
        "commit": commit_id(),
        "date": str(date.today()),
    }


def build_default() -> dict:
    """``aqexport build`` of the example as shipped, into a fresh output and plan directory."""
    output = OUT / "default-build"
    path = write_example_config(output)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    aqexport = str(Path(sys.executable).parent / "aqexport")
    subprocess.run([aqexport, "build", str(path)], check=True, capture_output=True)
    wall = time.perf_counter() - start
    calibration = load_config(EXAMPLE).calibration
    return {
        "budget": f"{calibration.samples}x{calibration.seqlen}x{calibration.epochs}",
        "wall": wall,
        **build_report_row(output),
        "load": [load_before, os.getloadavg()[0]],
        "commit": commit_id(),
        "date": str(date.today()),
    }


def _build_text(build: dict | None, fp: float) -> str:
    if build is None:
        return ""
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in build["timings"].items())
    return (
        f"\nThe example as shipped ({build['budget'].replace('x', ' × ')}), built fresh with `python "
        f"benchmarks/budget.py --build` at {build['commit']}, {build['date']}, alone (load {build['load'][0]:.1f} / "
        f"{build['load'][1]:.1f}): {build['wall']:.0f} s wall ({build['wall'] / 60:.1f} min) for the `aqexport build` "
        f"process; {stages}; peak RSS {max(build['peak_rss_mib'].values()):.0f} MiB; WikiText-2 test perplexity "
        f"under ONNX Runtime {build['ppl_onnx']:.4f} ({build['ppl_onnx'] / fp:.4f}× fp).\n"
    )


def render(results: dict[str, dict]) -> str:
    results = dict(results)
    build = results.pop("build", None)
    default = load_config(EXAMPLE).calibration
    default_key = f"{default.samples}x{default.seqlen}x{default.epochs}"
    rows = []
    for key in sorted(results, key=lambda k: results[k]["seconds"]):
        row, budget = results[key], parse_budget(key)
        tokens = budget["samples"] * budget["seqlen"]
        mark = " (default)" if key == default_key else ""
        rows.append(
            f"| {budget['samples']} × {budget['seqlen']} × {budget['epochs']}{mark} | {tokens * budget['epochs']} "
            f"| {row['seconds']:.0f} s | {row['block_seconds']:.0f} s | {row['summed_mse']:.4f} "
            f"| {row['perplexity']:.4f} | {row['perplexity'] / row['fp']:.4f} "
            f"| {row['load'][0]:.1f} / {row['load'][1]:.1f} | {row['commit']}, {row['date']} |"
        )
    fp = next(iter(results.values()))["fp"]
    return f"""
## Calibration budget: accuracy against time, the shipped default config

`python benchmarks/budget.py` (one row per `samples × seqlen × epochs`; rows measured one after
another, alone on the machine). Machine: {machine()}. Each row is `aqexport calibrate` on
`examples/smollm2-affinequant-w4a16g128.yaml` (AffineQuant w4a16g128, diagonal norm-side form,
GPTQ rounding, int8 LM head, tied embedding, streamed) with only the budget changed, from an
empty plan directory. Time: the calibrate stage; of it, the blocks (training, freezing and GPTQ
of each block's linears on the 32768 Hessian tokens; the rest is the LM head's GPTQ on 16384
tokens and the windows' preparation). Summed block MSE: each block's output error against the
float block, on the quantized blocks' activations, summed over the 30 blocks. Perplexity: the
fake-quant model on WikiText-2 test, 40 × 512 (fp32 {fp:.4f}). Load: the 1-minute load average
before and after (2.0 is both cores busy). The example shipped 16 × 256 × 4 until 8432c70, which
chose 24 × 256 × 4 from these rows: more windows buy more than more epochs or longer windows at
the same cost, and 24 windows leave the whole build within 15 minutes (below); 32 do not.

{HEADER}
{chr(10).join(rows)}
{_build_text(build, fp)}"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, help="SAMPLESxSEQLENxEPOCHS, comma-separated")
    parser.add_argument("--rerun", action="store_true", help="measure rows already in the results again")
    parser.add_argument("--build", action="store_true", help="then build the example as shipped, fresh")
    parser.add_argument("--render", action="store_true", help="only re-render BENCHMARKS.md from the results")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.render:
        for budget in args.budgets.split(",") if args.budgets else []:
            if budget in results and not args.rerun:
                continue
            results[budget] = measure(budget)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1))
            print(budget, results[budget], flush=True)
        if args.build:
            results["build"] = build_default()
            RESULTS.write_text(json.dumps(results, indent=1))
            print("build", results["build"], flush=True)
    if results:
        print(write_section("budget", render(results)))


if __name__ == "__main__":
    main()
