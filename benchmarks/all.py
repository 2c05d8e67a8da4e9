"""Regenerate the benchmarks with one command: ``--quick`` (the peer table on fewer windows and
one round, then the plots) or the full set, each step one script run in order.

Every run records the machine, the versions of the packages the figures depend on, the commit,
and per step the exact command, its exit status and its wall time, in
``benchmarks/results/all-<quick|full>.json`` and BENCHMARKS.md's ``runs-<quick|full>`` section.
A failing step is recorded and the run goes on (one broken script must not hide the others'
figures); the command exits non-zero at the end if any step failed.

The quick run writes its peer table into its own section (``peers-quick``), so the full figures
are never overwritten by quick ones. Artifacts are reused through ``aqexport build``'s cache:
the first run on a fresh clone builds them (the shipped default about 15 minutes), later runs
take seconds to confirm they are up to date.

    python benchmarks/all.py --quick     # under 30 minutes here once the artifacts are built
    python benchmarks/all.py             # hours: every benchmark script below
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

QUICK = [
    ["benchmarks/peers.py", "--rounds", "1", "--repeats", "1", "--windows", "8", "--spot-windows", "2", "--quick"],
    ["benchmarks/plots.py"],
]
FULL = [
    ["benchmarks/skeleton.py"],
    ["benchmarks/calibration.py"],
    ["benchmarks/rounding.py"],
    ["benchmarks/execution.py"],
    ["benchmarks/speed.py"],
    ["benchmarks/peers.py"],
    ["benchmarks/transform_forms.py"],
    ["benchmarks/lowering.py"],
    ["benchmarks/mobile.py"],
    ["benchmarks/npu.py"],
    ["benchmarks/diff.py"],
    ["benchmarks/reproducible.py"],
    ["benchmarks/data_parallel.py"],
    ["benchmarks/build_memory.py"],
    ["benchmarks/plots.py"],
]
PACKAGES = ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-genai", "numpy")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    steps = []
    for command in QUICK if args.quick else FULL:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *command], cwd=ROOT)
        steps.append(
            {
                "command": "python " + " ".join(command),
                "returncode": done.returncode,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(f"{steps[-1]['command']}: exit {done.returncode} in {steps[-1]['seconds']} s", flush=True)
    record = {
        "mode": mode,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit_id(),
        "machine": machine(),
        "versions": versions(),
        "steps": steps,
    }
    results = ROOT / "benchmarks" / "results" / f"all-{mode}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(record, indent=1))
    rows = "\n".join(f"| `{s['command']}` | {s['returncode']} | {s['seconds'] / 60:.1f} |" for s in steps)
    total = sum(s["seconds"] for s in steps) / 60
    write_section(
        f"runs-{mode}",
        f"## `python benchmarks/all.py{' --quick' if args.quick else ''}`: the last run\n\n"
        f"At {record['commit']}, {record['started']}; {record['machine']}.\n"
        f"Versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}.\n\n"
        f"| step | exit | minutes |\n|---|---|---|\n{rows}\n\nTotal {total:.1f} minutes.",
    )
    if any(step["returncode"] for step in steps):
        sys.exit(1)


if __name__ == "__main__":
    main()
