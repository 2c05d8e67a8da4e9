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

    python benchmarks/stream_speed.py [--render | --collect COMMIT]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _builds import build_report_row, write_example_config  # noqa: E402
from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "stream-speed"
RESULTS = ROOT / "benchmarks" / "results" / "stream_speed.json"
AQEXPORT = str(Path(sys.executable).parent / "aqexport")
STAGES = ("load", "capture", "calibrate", "lower", "write", "verify")
MODES = {"streamed": "auto", "whole": "never"}  # the row's name -> build.stream


def write_config(mode: str) -> Path:
    """The example with a fresh plan and output of its own, and ``build.stream`` set (``auto`` is
    what the example ships)."""
    return write_example_config(OUT / mode, {"stream": MODES[mode]})


def measure() -> dict:
    load_before = os.getloadavg()[0]
    started = {}
    for mode in MODES:
        config = write_config(mode)
        log = (OUT / f"{mode}.log").open("w")
        started[mode] = subprocess.Popen([AQEXPORT, "build", str(config)], stdout=log, stderr=log)
    for process in started.values():
        process.wait()
    # what else ran: the 1-minute load average of the two cores before the builds and after
    return collect() | {"load": [load_before, os.getloadavg()[0]]}


def collect() -> dict:
    """The rows of the builds in ``OUT`` that finished (a report), and whether both wrote the
    same artifact. ``--collect`` reads them without building: a run stopped half way keeps the
    half that finished."""
    rows, missing = {}, []
    for mode in MODES:
        if not (OUT / mode / "report.json").is_file():
            missing.append(mode)
            continue
        rows[mode] = build_report_row(OUT / mode)
    same = None
    if not missing:
        same = all(
            filecmp.cmp(OUT / "streamed" / name, OUT / "whole" / name, shallow=False)
            for name in ("model.onnx", "model.onnx.data")
        )
    return {"rows": rows, "unfinished": missing, "same_bytes": same}


def _run_text(run: dict) -> str:
    rows = run["rows"]
    lines = []
    for mode, row in rows.items():
        times, peaks = row["timings"], row["peak_rss_mib"]
        cells = " | ".join(f"{times[s]:.0f} s / {peaks[s]:.0f}" for s in STAGES)
        lines.append(
            f"| {mode} (build.stream: {MODES[mode]}) | {sum(times.values()):.0f} s | {cells} | "
            f"{max(peaks.values()):.0f} MiB | {row['ppl_onnx']:.3f} |"
        )
    for mode in run.get("unfinished", []):
        lines.append(f"| {mode} (build.stream: {MODES[mode]}) | stopped before it finished |" + " — |" * 8)
    load = run.get("load")
    text = f"At {run['commit']}, {run['date']}" + (
        f" (1-minute load average {load[0]:.1f} before the builds started, {load[1]:.1f} when the last ended; "
        "2.0 is both cores busy)"
        if load
        else " (read back with `--collect`)"
    )
    text += ":\n\n| build | total | load | capture | calibrate | lower | write | verify | peak | ppl (ORT) |\n"
    text += "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    if "streamed" in rows and "whole" in rows:
        streamed, whole = rows["streamed"]["timings"], rows["whole"]["timings"]
        ratio = sum(streamed.values()) / sum(whole.values())
        by_stage = ", ".join(f"{s} {streamed[s] / whole[s]:.2f}" for s in STAGES)
        same = run["same_bytes"]
        same = all(same.values()) if isinstance(same, dict) else same  # the first record: per file
        bytes_ = "the same bytes" if same else "**not the same bytes**"
        text += f"\nStreamed over whole: {ratio:.2f}× the time ({by_stage}); the artifacts are {bytes_}.\n"
    if run.get("note"):  # what the record alone cannot say, added to the record by hand
        text += f"\n{run['note']}\n"
    return text


def render(runs: list[dict]) -> str:
    body = "\n".join(_run_text(run) for run in reversed(runs))
    return f"""
## Streamed against whole: the shipped default's fresh build

`python benchmarks/stream_speed.py` (each run is kept; newest first). Machine: {runs[-1]["machine"]}.
The shipped default (`examples/smollm2-affinequant-w4a16g128.yaml`, whose GGUF source
`build.stream: auto` streams) built fresh from the same config twice, streamed and holding the
whole model (`build.stream: never`), each calibrating into a fresh plan directory, as two
processes started together (they share the machine's drift; while both run each has one of the
two cores, so the times are about twice a lone build's). Per stage: seconds / the process's
running peak RSS in MiB.

{body}"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--render", action="store_true", help="rewrite the section from the records")
    parser.add_argument("--collect", metavar="COMMIT", help="record the builds in the output folder as run at COMMIT")
    args = parser.parse_args()
    recorded = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    runs = recorded["runs"] if "runs" in recorded else [recorded]  # the first record was one run
    if args.collect:
        runs.append({**collect(), "commit": args.collect, "date": str(date.today()), "machine": machine()})
    elif not args.render:
        commit = commit_id()  # the code the builds run: HEAD when they start
        runs.append({**measure(), "commit": commit, "date": str(date.today()), "machine": machine()})
    RESULTS.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(write_section("stream-speed", render(runs)))


if __name__ == "__main__":
    main()
