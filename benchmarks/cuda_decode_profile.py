"""Where a CUDA decode step's time goes, per operator, for several artifacts side by side.

ONNX Runtime's profiler (``SessionOptions.enable_profiling``) records each node's host-side
time: on a launch-bound small model that is the cost that matters (a 135M model's kernels are
shorter than their launches). Each artifact: a prefill of ``--context`` random tokens, 8 warm-up
steps, then ``--steps`` timed decode steps through ``runtime.bench``'s IO-bound loop (the
artifact's KV contract); the table sums the node events inside those steps' ``model_run``
events. Unprofiled decode tok/s is measured first, the artifacts alternating over 3 rounds.

Runs on the GPU machine (``onnxruntime-gpu``):

    python benchmarks/cuda_decode_profile.py measure new=DIR old=DIR builder=DIR -o profile.json

and renders here:

    python benchmarks/cuda_decode_profile.py report benchmarks/results/cuda-h100-profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import write_section  # noqa: E402


def _decode(path: Path, context: int, steps: int, profile_prefix: str | None) -> tuple[float, str | None]:
    from aqexport.runtime import session as sessions
    from aqexport.runtime.bench import _BoundDecoder
    from aqexport.runtime.decoder import OnnxDecoder

    plain = sessions.session_options

    def profiled(*args, **kwargs):
        options = plain(*args, **kwargs)
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        return options

    sessions.session_options = profiled if profile_prefix else plain
    try:
        session, _ = sessions.create_session(path, ("cuda",))
    finally:
        sessions.session_options = plain
    head_dim, kv_cache = sessions.genai_facts(path)
    bound = _BoundDecoder(OnnxDecoder(session, head_dim, kv_cache))
    tokens = np.random.default_rng(0).integers(0, 1000, context, dtype=np.int64)
    first, present = bound.prefill(tokens, context + steps + 1)
    bound.decode(first, present, context, 8)
    first, present = bound.prefill(tokens, context + steps + 1)
    start = time.perf_counter()
    bound.decode(first, present, context, steps)
    rate = steps / (time.perf_counter() - start)
    return rate, session.end_profiling() if profile_prefix else None


def _by_operator(profile_file: str, steps: int) -> dict:
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-steps:]
    first, last = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and first <= event["ts"] <= last:
            entry = totals[event["args"].get("op_name", "?")]
            entry[0] += event["dur"]
            entry[1] += 1
    ordered = sorted(totals.items(), key=lambda item: -item[1][0])
    return {
        "step_us": sum(run["dur"] for run in runs) / steps,
        "operators": {op: {"us_per_step": total / steps, "nodes": count // steps} for op, (total, count) in ordered},
    }


def measure(artifacts: dict[str, Path], context: int, steps: int) -> dict:
    rates: dict[str, list[float]] = {name: [] for name in artifacts}
    for _ in range(3):
        for name, path in artifacts.items():
            rates[name].append(_decode(path, context, steps, None)[0])
    profiles = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, path in artifacts.items():
            _, profile_file = _decode(path, context, steps, f"{scratch}/{name}")
            profiles[name] = _by_operator(profile_file, steps)
    return {"context": context, "steps": steps, "decode_tok_s": rates, "profiles": profiles}


def report(results: dict) -> str:
    names = list(results["profiles"])
    operators = sorted(
        {op for profile in results["profiles"].values() for op in profile["operators"]},
        key=lambda op: (
            -max(p["operators"].get(op, {"us_per_step": 0})["us_per_step"] for p in results["profiles"].values())
        ),
    )[:10]
    lines = [
        "## CUDA decode step by operator (ONNX Runtime profiler, host time)",
        "",
        f"Decode after {results['context']} tokens, {results['steps']} steps; "
        "`python benchmarks/cuda_decode_profile.py report benchmarks/results/cuda-h100-profile.json` "
        "(measured on the lent H100 with `... measure`). Cells: µs per step (nodes per step).",
        "",
        "| operator | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| **whole step** | "
        + " | ".join(f"**{results['profiles'][n]['step_us'] / 1000:.2f} ms**" for n in names)
        + " |",
    ]
    for op in operators:
        cells = []
        for name in names:
            entry = results["profiles"][name]["operators"].get(op)
            cells.append(f"{entry['us_per_step']:.0f} ({entry['nodes']})" if entry else "–")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    rates = results["decode_tok_s"]
    lines += [
        "",
        "Unprofiled decode tok/s, 3 alternating rounds (median [min–max]): "
        + "; ".join(f"{n} {statistics.median(r):.1f} [{min(r):.1f}–{max(r):.1f}]" for n, r in rates.items())
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure")
    run.add_argument("artifacts", nargs="+", help="NAME=DIRECTORY")
    run.add_argument("--context", type=int, default=512)
    run.add_argument("--steps", type=int, default=64)
    run.add_argument("-o", "--output", type=Path, required=True)
    render = commands.add_parser("report")
    render.add_argument("results", type=Path)
    args = parser.parse_args()
    if args.command == "measure":
        artifacts = {name: Path(path) for name, path in (item.split("=", 1) for item in args.artifacts)}
        args.output.write_text(json.dumps(measure(artifacts, args.context, args.steps), indent=1))
    else:
        print(write_section("cuda-profile", report(json.loads(args.results.read_text()))))


if __name__ == "__main__":
    main()
