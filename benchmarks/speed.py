"""Decode speed of the shipped default artifact where users run it: onnxruntime-genai and
``aqexport bench`` at several context lengths, next to RTN in the same format and the
onnxruntime-genai model builder's int4 model of the same weights (issue 15's table).

Artifacts (``benchmarks/_smollm2_variants.py`` builds ours from the example config; the builder's
comes from ``benchmarks/execution.py``'s recipe, ``-p int4 -e cpu``):

* ``affinequant`` — ``examples/smollm2-affinequant-w4a16g128.yaml`` as shipped;
* ``rtn`` — the same file with ``recipe: rtn`` (at the accuracy level its build measured);
* ``rtn level4`` — the same RTN plan forced to ``accuracy_level: 4``, the builder's level;
* ``builder int4`` — ``python -m onnxruntime_genai.models.builder -p int4 -e cpu``.

Measurements, each in its own process, every artifact taking its turn in each of ``--rounds``
rounds (this machine drifts ±10 % over minutes, so only ratios inside one run mean anything):

* **genai C**: ``og.Generator`` with the artifact's own ``genai_config.json``, a C-token prompt
  (random ids, fixed seed) and 63 generated tokens (``max_length`` C + 64): decode tok/s is the
  tokens after the first over their time, for C in 128, 512, 2048;
* **bench C**: ``aqexport bench --decode-context C --decode-tokens 64`` (IO binding, the
  artifact's KV contract) for C in 128, 512, 2048.

Each figure is the median over rounds (min–max in brackets).

    python benchmarks/speed.py [--rounds 3] [--repeats 2] [--threads 2]
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

OUT = ROOT / "benchmarks" / "out"
RESULTS = OUT / "speed.json"
CONTEXTS = (128, 512, 2048)

GENAI_SNIPPET = """
import json, statistics, sys, time
import numpy as np
import onnxruntime_genai as og
directory, threads, prompt_length, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = og.Config(directory)
config.clear_providers()  # CPU, whatever the file names
config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
model = og.Model(config)
vocab = json.load(open(directory + "/genai_config.json"))["model"]["vocab_size"]
prompt = np.random.default_rng(0).integers(0, min(vocab, 30000), prompt_length).astype(np.int32)
def once():
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_length + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()
    first = time.perf_counter()
    count = 0
    while not generator.is_done():
        generator.generate_next_token()
        count += 1
    end = time.perf_counter()
    return prompt_length / (first - start), count / (end - first)
once()  # warm-up
runs = [once() for _ in range(int(sys.argv[5]))]
print(json.dumps({"prefill": statistics.median(r[0] for r in runs), "decode": statistics.median(r[1] for r in runs)}))
"""


def builder_dir() -> Path:
    from execution import build_builder

    return build_builder("builder int4", "int4")


def genai_run(directory: Path, threads: int, repeats: int, prompt: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", GENAI_SNIPPET, str(directory), str(threads), str(prompt), "64", str(repeats)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_run(directory: Path, context: int, threads: int, repeats: int) -> dict:
    command = [sys.executable, "-m", "aqexport.cli", "bench", str(directory), "--json", "--prefill", "128"]
    command += ["--decode-context", str(context), "--decode-tokens", "64", "--repeats", str(repeats)]
    command += ["--threads", str(threads)]
    done = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return {"decode": data["decode_tokens_per_second"]["median"], "kv_cache": data.get("kv_cache")}


def measure(artifacts: dict[str, Path], rounds: int, repeats: int, threads: int) -> dict:
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in artifacts}
    contracts: dict[str, str] = {}
    for round_index in range(rounds):
        for name, directory in artifacts.items():
            for context in CONTEXTS:
                genai = genai_run(directory, threads, repeats, context)
                runs[name].setdefault(f"genai {context}", []).append(genai["decode"])
                result = bench_run(directory, context, threads, repeats)
                runs[name].setdefault(f"bench {context}", []).append(result["decode"])
                contracts[name] = result["kv_cache"]
            print(f"round {round_index + 1}/{rounds} {name}: {json.dumps({k: v[-1] for k, v in runs[name].items()})}")
    return {"runs": runs, "kv_cache": contracts, "facts": {name: _facts(d) for name, d in artifacts.items()}}


def _facts(directory: Path) -> dict:
    """Accuracy level and ORT perplexity from our build report (the builder ships level 4)."""
    report = directory / "report.json"
    if not report.is_file():
        return {"level": 4, "ppl": None}
    data = json.loads(report.read_text())
    return {
        "level": data["quantization"]["accuracy_level"],
        "ppl": data["verification"]["perplexity"]["onnx"]["perplexity"],
    }


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def write_report(results: dict, args: argparse.Namespace) -> None:
    runs = results["runs"]
    columns = [*(f"genai {c}" for c in CONTEXTS), *(f"bench {c}" for c in CONTEXTS)]
    median = {name: {col: statistics.median(values[col]) for col in columns} for name, values in runs.items()}
    lines = [
        "## Decode speed at several context lengths: the default artifact, RTN and the genai builder's int4",
        "",
        f"`python benchmarks/speed.py --rounds {args.rounds} --repeats {args.repeats} --threads {args.threads}` at "
        f"commit {commit_id()}, {date.today().isoformat()}. Machine: {machine()}. CPU EP, {args.threads} threads.",
        "Artifacts: `affinequant` is `examples/smollm2-affinequant-w4a16g128.yaml` as shipped, `rtn` the same file "
        "with `recipe: rtn` (both at the accuracy level their build measured), `rtn level4` that RTN plan forced to "
        "level 4, `builder int4` the onnxruntime-genai model builder's `-p int4 -e cpu` model of the same weights. "
        "genai: `og.Generator`, C-token prompt + 63 generated tokens (decode tok/s after the first). "
        "bench: `aqexport bench --decode-context C --decode-tokens 64`. Each artifact in its own process, "
        f"round-robin over {args.rounds} rounds; median (min–max) decode tok/s.",
        "",
        "| artifact | KV contract | level | ORT ppl (40 × 512) | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for name, values in runs.items():
        cells = " | ".join(_cell(values[col]) for col in columns)
        facts = results["facts"][name]
        ppl = f"{facts['ppl']:.4f}" if facts["ppl"] else "–"
        lines.append(f"| {name} | {results['kv_cache'].get(name)} | {facts['level']} | {ppl} | {cells} |")
    for reference in ("builder int4", "rtn", "rtn level4"):
        if reference in median and "affinequant" in median:
            ratios = " | ".join(f"{median['affinequant'][c] / median[reference][c]:.2f}×" for c in columns)
            lines.append(f"| affinequant ÷ {reference} | | | | {ratios} |")
    lines += [
        "",
        "`affinequant` (diagonal norm-side transforms, folded into the norms) and `rtn level4` run the same graph "
        "structure (same ops, shapes, level and KV contract; only weight values differ), so their ratio is this "
        "run's noise: read the ratios to the builder against it.",
    ]
    write_section("speed", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from speed.json")
    args = parser.parse_args()
    if not args.report_only:
        names = ("affinequant", "rtn", "rtn level4")
        artifacts = {**{name: build(name) for name in names}, "builder int4": builder_dir()}
        results = measure(artifacts, args.rounds, args.repeats, args.threads)
        RESULTS.write_text(json.dumps(results, indent=2))
    write_report(json.loads(RESULTS.read_text()), args)


if __name__ == "__main__":
    main()
