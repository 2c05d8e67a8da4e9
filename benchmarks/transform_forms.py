"""AffineQuant's norm-side transform forms on SmolLM2: perplexity, speed, size (issue 15).

Each row is ``examples/smollm2-affinequant-w4a16g128.yaml`` with ``transform: <form>``
(``benchmarks/_smollm2_variants.py``), next to RTN of the same format (no transforms):

* perplexity: the build's verification, WikiText-2 test, 40 windows of 512 — the PyTorch
  fake-quant model of the plan and the artifact on ONNX Runtime (at the accuracy level the build
  measured and chose, also shown);
* the transforms' run-time cost per token (``FoldAffinePass``: FLOPs and float32 bytes of the
  explicit ``AffineInverse`` subgraphs; diagonal folds into the norms and costs nothing);
* prefill tok/s of 512 tokens and decode tok/s of 64 tokens after 512, ``aqexport bench``,
  each artifact in its own process, round-robin over ``--rounds`` rounds (median, min–max);
* size: ``model.onnx`` + its data file.

    python benchmarks/transform_forms.py [--rounds 3] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import commit_id, write_section  # noqa: E402
from _smollm2_variants import build  # noqa: E402
from skeleton import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "out" / "transform_forms.json"
ROWS = ("affinequant dense", "affinequant block_diagonal", "affinequant kronecker", "affinequant diagonal", "rtn")


def bench_once(directory: Path, threads: int, repeats: int) -> dict:
    command = [sys.executable, "-m", "aqexport.cli", "bench", str(directory), "--json", "--prefill", "512"]
    command += ["--decode-context", "512", "--decode-tokens", "64", "--repeats", str(repeats)]
    command += ["--threads", str(threads)]
    done = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    data = json.loads(done.stdout.splitlines()[-1])
    prefill = data["prefill_tokens_per_second"]["512"]["median"]
    return {"prefill": prefill, "decode": data["decode_tokens_per_second"]["median"]}


def static_facts(directory: Path) -> dict:
    report = json.loads((directory / "report.json").read_text())
    manifest = json.loads((directory / "manifest.json").read_text())
    perplexity = report["verification"]["perplexity"]
    cost = next(
        (r["stats"]["run_time_cost"] for r in manifest["passes"] if r["pass"] == "FoldAffinePass" and "stats" in r),
        {"flops_per_token": 0, "bytes_per_token": 0, "transforms": 0},
    )
    return {
        "fake_quant_ppl": perplexity["pytorch"]["perplexity"],
        "ort_ppl": perplexity["onnx"]["perplexity"],
        "fp_ppl": report.get("calibration", {}).get("fp_perplexity"),
        "accuracy_level": report["quantization"]["accuracy_level"],
        "cost": cost,
        "bytes": report["model_bytes"],
    }


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def write_report(results: dict, args: argparse.Namespace) -> None:
    lines = [
        "## AffineQuant transform forms: accuracy, run-time cost, speed (SmolLM2, w4a16g128)",
        "",
        f"`python benchmarks/transform_forms.py --rounds {args.rounds} --repeats {args.repeats} --threads "
        f"{args.threads}` at commit {commit_id()}, {date.today().isoformat()}. Machine: {machine()}.",
        "Each row: `examples/smollm2-affinequant-w4a16g128.yaml` with `transform: <form>` (LM head int8, embedding "
        "int4, the example's calibration budget), or `recipe: rtn`. Perplexity: WikiText-2 test, 40 × 512, the plan's "
        "PyTorch fake-quant model and the artifact on ONNX Runtime at the accuracy level the build measured. "
        "Run-time cost: the explicit `AffineInverse` subgraphs per token (float32). Speed: `aqexport bench`, "
        f"prefill 512 and decode 64 after 512, round-robin over {args.rounds} rounds, median (min–max).",
        "",
        "| variant | fake-quant ppl | ORT ppl | level | inverse FLOPs/token | inverse bytes/token | prefill 512 tok/s "
        "| decode tok/s | size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        facts = row["facts"]
        lines.append(
            f"| {name} | {facts['fake_quant_ppl']:.4f} | {facts['ort_ppl']:.4f} | {facts['accuracy_level']} | "
            f"{facts['cost']['flops_per_token'] / 1e6:.2f} M | {facts['cost']['bytes_per_token'] / 2**20:.2f} MiB | "
            f"{_spread(row['prefill'])} | {_spread(row['decode'])} | {facts['bytes'] / 2**20:.1f} MiB |"
        )
    write_section("transform-forms", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from the json")
    args = parser.parse_args()
    if not args.report_only:
        directories = {name: build(name) for name in ROWS}
        results = {name: {"facts": static_facts(d), "prefill": [], "decode": []} for name, d in directories.items()}
        for round_index in range(args.rounds):
            for name, directory in directories.items():
                speed = bench_once(directory, args.threads, args.repeats)
                results[name]["prefill"].append(speed["prefill"])
                results[name]["decode"].append(speed["decode"])
                print(f"round {round_index + 1}/{args.rounds} {name}: {speed}", flush=True)
        RESULTS.write_text(json.dumps(results, indent=2))
    write_report(json.loads(RESULTS.read_text()), args)


if __name__ == "__main__":
    main()
