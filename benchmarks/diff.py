"""`aqexport diff` on SmolLM2 artifacts: what it reports, how long it takes, how much memory.

Each case runs the real command line in its own process (so peak RSS is that diff's alone):

* ``rtn → affinequant`` and back, structure + per-linear only, then with ``--run --text``
  (4 × 256-token WikiText-2 test windows) and a policy forbidding any perplexity increase
  (``max_ppl_increase: 0``): it must exit 1 in the order that loses perplexity and 0 in the other;
* ``fp32 → rtn`` (the same model unquantized and int4);
* ``rtn → rtn rebuilt`` (the same config built twice): must report no difference and exit 0
  under ``--require-identical``.

Artifacts come from ``benchmarks/_smollm2_variants.py`` (``rtn``, ``affinequant``) and
``examples/smollm2-fp32.yaml``; ``smollm2-rtn-rebuilt`` is the rtn config built into a second
directory.

    python benchmarks/diff.py
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import commit_id, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "benchmarks" / "out" / "artifacts"
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
OUT = ROOT / "benchmarks" / "out" / "diff.json"

_MEASURE = """
import json, resource, sys, time
from aqexport.cli import main
start = time.perf_counter()
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)
"""


def artifact(name: str) -> Path:
    path = ARTIFACTS / f"smollm2-{name}"
    if not (path / "model.onnx").is_file():
        sys.exit(f"{path} missing: build it first (see this script's docstring)")
    return path


def run_case(a: str, b: str, *flags: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        command = [sys.executable, "-c", _MEASURE, "diff", str(artifact(a)), str(artifact(b)), "--json"]
        command += ["-o", str(report_path), *flags]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        measured = json.loads(done.stderr.strip().splitlines()[-1])
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return {"a": a, "b": b, "flags": list(flags), **measured, "report": report}


def summarize(case: dict) -> dict:
    report = case["report"]
    linears = report["linears"]
    run = report.get("run") or {}
    ppl = run.get("perplexity") or {}
    divergence = run.get("first_divergence") or {}
    residual = run.get("first_residual_divergence") or {}
    transforms = linears.get("transforms", {})
    return {
        "case": f"{case['a']} → {case['b']}" + (" --run" if run else ""),
        "exit": case["code"],
        "seconds": case["seconds"],
        "peak_rss_mib": case["peak_rss_mib"],
        "identical": report["identical"],
        "changed_linears": linears["summary"]["changed"],
        "min_sqnr_db": linears["summary"].get("min_sqnr_db"),
        "folded_norms": sum(
            1 for f in transforms.get("folded", []) if f.get("a") != f.get("b") or f.get("values_changed")
        ),
        "nodes_changed": len(report["structure"]["nodes"]["changed"]),
        "ppl": (ppl.get("a"), ppl.get("b"), ppl.get("change")) if ppl else None,
        "first_divergence": divergence.get("module") or divergence.get("a"),
        "first_residual_divergence": residual.get("module") or residual.get("a"),
        "violations": [v["message"] for v in (report.get("policy") or {}).get("violations", [])],
    }


def main() -> None:
    run_flags = ("--run", "--text", str(TEXT), "--windows", "4", "--seqlen", "256", "--max-ppl-increase", "0")
    cases = [
        run_case("rtn", "affinequant"),
        run_case("rtn", "affinequant", *run_flags),
        run_case("affinequant", "rtn", *run_flags),
        run_case("fp32", "rtn"),
        run_case("rtn", "rtn-rebuilt", "--require-identical"),
    ]
    rows = [summarize(case) for case in cases]
    names = ("fp32", "rtn", "affinequant")
    sizes = {name: sum(p.stat().st_size for p in artifact(name).iterdir()) / 2**20 for name in names}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"rows": rows, "sizes_mib": sizes}, indent=2))
    lines = [
        "## `aqexport diff` on SmolLM2 artifacts: findings, time, peak memory",
        "",
        f"`python benchmarks/diff.py` at commit {commit_id()}, {date.today().isoformat()}. "
        f"Machine: {platform.processor() or platform.machine()}, {_cpu_name()}. Each case is one `aqexport diff` "
        "process (peak RSS = that process's `ru_maxrss`). Artifact sizes: "
        + ", ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items())
        + ". `--run`: seed prompt + 4 × 256-token WikiText-2 test windows, policy `--max-ppl-increase 0`.",
        "",
        "| case | exit | time (s) | peak RSS (MiB) | identical | changed linears | min weight SQNR (dB) | "
        "norms with a folded transform changed | nodes changed | ppl A → B (change) | first divergence (any tensor; "
        "residual stream) | violations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ppl = f"{row['ppl'][0]:.4f} → {row['ppl'][1]:.4f} ({row['ppl'][2]:+.2%})" if row["ppl"] else "–"
        sqnr = row["min_sqnr_db"]
        sqnr = f"{sqnr:.1f}" if isinstance(sqnr, (int, float)) else str(sqnr)
        lines.append(
            f"| {row['case']} | {row['exit']} | {row['seconds']:.1f} | {row['peak_rss_mib']:.0f} | "
            f"{row['identical']} | "
            f"{row['changed_linears']} | {sqnr} | {row['folded_norms']} | {row['nodes_changed']} | {ppl} | "
            f"{_divergence(row)} | {'; '.join(row['violations']) or '–'} |"
        )
    lines += [
        "",
        "Weight SQNR is B's dequantized weights against A's. Between RTN and AffineQuant it is low by construction: "
        "AffineQuant's transforms are folded into the weights and norms, so each linear multiplies by different "
        "(transformed) weights; the run section is what says whether that helped. The first divergence over all "
        "tensors is the first norm for the same reason (its folded weights differ by design); on the residual stream "
        "it is the sum the skip-norm named `model.layers.1.input_layernorm` writes, i.e. the output of block 0. "
        "Goals (issue 13): without `--run` under 10 s and under 1.5× one artifact's size in RSS.",
    ]
    print(write_section("diff", "\n".join(lines)))


def _divergence(row: dict) -> str:
    if not row["first_divergence"]:
        return "–"
    return f"{row['first_divergence']}; {row['first_residual_divergence'] or 'none'}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {len(_cores())} cores"
    except OSError:
        pass
    return "unknown CPU"


def _cores() -> list[str]:
    return [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("processor")]


if __name__ == "__main__":
    main()
