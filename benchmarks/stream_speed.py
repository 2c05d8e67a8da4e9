"""Is a streamed build slower than one holding the whole model? (issue 17: "the default SmolLM2
AffineQuant build peaks at ≤ 1.5 GB RSS and is not slower")

The shipped default (``examples/smollm2-affinequant-w4a16g128.yaml``: its packaged GGUF source is
streamed one block at a time by ``build.stream: auto``) built fresh twice from the same config,
once as shipped and once with ``build.stream: never``, each into a fresh plan directory so that
both calibrate. The two builds run as two processes started together, not one after the other:
this machine's speed drifts by ±10 % over minutes, and a build takes longer than the drift's
period, so builds run in turn would compare two different machines; started together they share
it (each gets one of the two cores while both run, and a core of its own once the other ends,
which favours the faster one's tail a little: the stage table shows where each spent its time).
Peaks are each process's own (``report.json`` ``memory.peak_rss_mib``). Both artifacts are
compared byte for byte, as ``tests/test_streamed_build.py`` compares tiny models'.

    python benchmarks/stream_speed.py [--render]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

EXAMPLE = ROOT / "examples" / "smollm2-affinequant-w4a16g128.yaml"
OUT = ROOT / "benchmarks" / "out" / "stream-speed"
RESULTS = ROOT / "benchmarks" / "results" / "stream_speed.json"
AQEXPORT = str(Path(sys.executable).parent / "aqexport")
STAGES = ("load", "capture", "calibrate", "lower", "write", "verify")
MODES = {"streamed": "auto", "whole": "never"}  # the row's name -> build.stream


def write_config(mode: str) -> Path:
    """The example with its paths made absolute, a fresh plan and output of its own, and
    ``build.stream`` set (``auto`` is what the example ships)."""
    config = yaml.safe_load(EXAMPLE.read_text())
    for section, key in (("calibration", "data"), ("evaluation", "text")):
        config[section][key] = str((EXAMPLE.parent / config[section][key]).resolve())
    config["calibration"]["plan_dir"] = str(OUT / f"{mode}.plan")
    config["output"]["dir"] = str(OUT / mode)
    config["build"] = {**config.get("build", {}), "stream": MODES[mode]}
    for leftover in (OUT / mode, OUT / f"{mode}.plan"):
        shutil.rmtree(leftover, ignore_errors=True)
    path = OUT / f"{mode}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def measure() -> dict:
    load_before = os.getloadavg()[0]
    started = {}
    for mode in MODES:
        config = write_config(mode)
        log = (OUT / f"{mode}.log").open("w")
        process = subprocess.Popen([AQEXPORT, "build", str(config)], stdout=log, stderr=log)
        started[mode] = (process, time.perf_counter())
    rows = {}
    for mode, (process, start) in started.items():
        process.wait()
        wall = time.perf_counter() - start
        if process.returncode != 0:
            tail = (OUT / f"{mode}.log").read_text().strip().splitlines()[-1:]
            raise SystemExit(f"the {mode} build failed: {tail}")
        report = json.loads((OUT / mode / "report.json").read_text())
        rows[mode] = {
            "wall_s": wall,
            "timings": report["timings"],
            "peak_rss_mib": report["memory"]["peak_rss_mib"],
            "streamed": report["memory"]["streamed"],
            "ppl_onnx": report["verification"]["perplexity"]["onnx"]["perplexity"],
        }
    same = {
        name: filecmp.cmp(OUT / "streamed" / name, OUT / "whole" / name, shallow=False)
        for name in ("model.onnx", "model.onnx.data")
    }
    # what else ran: the 1-minute load average of the two cores before the builds and after
    return {"rows": rows, "same_bytes": same, "load": [load_before, os.getloadavg()[0]]}


def render(record: dict) -> str:
    rows = record["rows"]
    lines = []
    for mode, row in rows.items():
        times, peaks = row["timings"], row["peak_rss_mib"]
        cells = " | ".join(f"{times[s]:.0f} s / {peaks[s]:.0f}" for s in STAGES)
        lines.append(
            f"| {mode} (build.stream: {MODES[mode]}) | {sum(times.values()):.0f} s | {cells} | "
            f"{max(peaks.values()):.0f} MiB | {row['ppl_onnx']:.3f} |"
        )
    ratio = sum(rows["streamed"]["timings"].values()) / sum(rows["whole"]["timings"].values())
    by_stage = ", ".join(f"{s} {rows['streamed']['timings'][s] / rows['whole']['timings'][s]:.2f}" for s in STAGES)
    same = all(record["same_bytes"].values())
    return f"""
## Streamed against whole: the shipped default's fresh build

`python benchmarks/stream_speed.py`, {record["date"]} at {record["commit"]}. Machine: {record["machine"]}.
The shipped default (`examples/smollm2-affinequant-w4a16g128.yaml`, whose GGUF source
`build.stream: auto` streams) built fresh from the same config twice, streamed and holding the
whole model (`build.stream: never`), each calibrating into a fresh plan directory, as two
processes started together (they share the machine's drift; while both run each has one of the
two cores, so the times are about twice a lone build's). Per stage: seconds / the process's
running peak RSS in MiB. The 1-minute load average was {record["load"][0]:.1f} before they
started (what else ran: 2.0 is both cores busy) and {record["load"][1]:.1f} when the last ended.

| build | total | load | capture | calibrate | lower | write | verify | peak | ppl (ORT) |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

Streamed over whole: {ratio:.2f}× the time ({by_stage}). The two artifacts' model.onnx and
model.onnx.data are {"the same bytes" if same else "**not the same bytes**"}.
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--render", action="store_true", help="rewrite the section from the last record")
    if parser.parse_args().render:
        record = json.loads(RESULTS.read_text())
    else:
        commit = commit_id()  # the code the builds run: HEAD when they start
        record = {**measure(), "commit": commit, "date": str(date.today()), "machine": machine()}
        RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    print(write_section("stream-speed", render(record)))


if __name__ == "__main__":
    main()
