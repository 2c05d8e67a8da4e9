"""The mobile profile on SmolLM2-135M-Instruct beside the cpu profile's artifact of the same plan:
size against the fp32 model, greedy tokens (our runtime and onnxruntime-genai), prompt and
decode tok/s from ``aqexport bench`` on this machine's CPU (a proxy for a phone's: same ONNX
Runtime CPU EP kernels in their x86 form, not ARM's NEON / KleidiAI ones).

By default the two artifacts are ``benchmarks/_smollm2_variants.py``'s ``affinequant`` (the
shipped example) and ``mobile`` (its plan lowered as ``examples/smollm2-mobile.yaml`` lowers
it), built or found up to date through ``aqexport build``'s cache; ``--cpu`` / ``--mobile`` take
other artifact directories:

    python benchmarks/mobile.py [--cpu DIR] [--mobile DIR] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

PREFILL = (128, 512)
MIB = 2**20


def fp32_bytes(manifest: dict) -> int:
    """The source model's parameters in float32 (tied weights once), loaded as the build did."""
    from aqexport.config import ModelSpec
    from aqexport.sources import load_model

    source = manifest["source"]
    spec = ModelSpec(source="default" if source["kind"] == "default" else source["location"])
    model = load_model(spec).model
    return sum(p.numel() for p in model.parameters()) * 4


def bench(directory: Path, threads: int, repeats: int) -> dict:
    command = [sys.executable, "-m", "aqexport.cli", "bench", str(directory), "--json"]
    command += ["--prefill", ",".join(map(str, PREFILL)), "--decode-context", "128", "--decode-tokens", "64"]
    command += ["--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def greedy(directory: Path, prompt: list[int], tokens: int) -> dict:
    from aqexport.runtime import create_session, decoder_for, generate

    ours = generate(decoder_for(create_session(directory)[0]), prompt, tokens).new_tokens
    try:
        from tests.genai_support import genai_greedy

        genai = genai_greedy(directory, prompt, tokens)
    except Exception as exc:  # noqa: BLE001 - reported in the table instead
        genai = f"genai failed: {exc}"
    return {"ours": ours, "genai": genai}


def head_bytes(directory: Path) -> tuple[int, int, int]:
    """The LM head's stored bytes (``lm_head.*`` initializers of ``model.onnx``, by their external
    data lengths: nothing loaded) and its [vocab, hidden] shape from ``config.json``."""
    import onnx

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    stored = sum(
        int({e.key: e.value for e in tensor.external_data}.get("length", len(tensor.raw_data)))
        for tensor in graph.initializer
        if tensor.name.startswith("lm_head.")
    )
    config = json.loads((directory / "config.json").read_text())
    return stored, config["vocab_size"], config["hidden_size"]


def int4_head_bytes(out: int, width: int, group: int = 32) -> int:
    """An int4 symmetric head in groups of ``group`` (the mobile default): packed codes and
    float32 scales, no zero points."""
    blocks = -(-width // group)
    return out * blocks * (group // 2 + 4)


def spread(values: list[float], form: str) -> str:
    """``median (min–max)`` of per-round medians; the median alone for one round."""
    middle = form.format(statistics.median(values))
    return middle if len(values) == 1 else f"{middle} ({form.format(min(values))}–{form.format(max(values))})"


def embedding_format(manifest: dict) -> str:
    """As lowered, not as configured (``auto`` resolves per model): the head's table, or its own."""
    linears = manifest["quantization"].get("linears", {})
    embedding = next((entry for entry in linears.values() if entry.get("role") == "embedding"), None)
    if embedding is None:
        return "float"
    bits = f"int{embedding['weight']['bits']}"
    return f"{bits} = the head's table" if embedding.get("reads") else bits


def facts(directory: Path) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    report = json.loads((directory / "report.json").read_text())
    files = manifest["files"]
    onnx = sum(info["bytes"] for name, info in files.items() if name.startswith("model.onnx"))
    quant = report["quantization"]
    return {
        "manifest": manifest,
        "onnx_bytes": onnx,
        "ort_bytes": files.get("model.ort", {}).get("bytes"),
        "scheme": f"head {quant['lm_head']}, embedding {embedding_format(manifest)}, "
        f"accuracy_level {quant['accuracy_level']}",
        "ppl": report["verification"].get("perplexity", {}).get("onnx", {}).get("perplexity"),
        "context": json.loads((directory / "genai_config.json").read_text())["model"]["context_length"],
        "profile": manifest["config"]["target"]["profile"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", type=Path, help="default: the shipped example's artifact")
    parser.add_argument("--cpu-same-edges", type=Path, help="default: its plan, cpu profile, mobile edges")
    parser.add_argument("--mobile", type=Path, help="default: its plan lowered for the mobile profile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="bench rounds, the artifacts alternating")
    args = parser.parse_args()
    from _smollm2_variants import build as build_variant
    from transformers import AutoTokenizer

    wanted = (
        ("cpu", args.cpu, "affinequant"),
        ("cpu, mobile edges", args.cpu_same_edges, "affinequant mobile edges"),
        ("mobile", args.mobile, "mobile"),
    )
    artifacts = {name: (given or build_variant(variant)).resolve() for name, given, variant in wanted}
    load = os.getloadavg()[0]  # other jobs on the machine slow both rows alike
    measured = {name: facts(directory) for name, directory in artifacts.items()}
    fp32 = fp32_bytes(measured["cpu"]["manifest"])
    tokenizer = AutoTokenizer.from_pretrained(artifacts["mobile"])
    prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    for name, directory in artifacts.items():
        measured[name]["greedy"] = greedy(directory, prompt, args.tokens)
        measured[name]["bench"] = []
    for round_index in range(args.rounds):  # cpu, mobile, then mobile, cpu: neither always goes first
        for name in list(artifacts)[:: 1 if round_index % 2 == 0 else -1]:
            measured[name]["bench"].append(bench(artifacts[name], args.threads, args.repeats))
            print(name, round_index, json.dumps(measured[name]["bench"][-1]))
    reference = measured["cpu, mobile edges"]["greedy"]  # same plan, same edges: only the profile differs
    mobile = measured["mobile"]
    stored, out, width = head_bytes(artifacts["mobile"])
    int4 = int4_head_bytes(out, width)
    estimate = mobile["onnx_bytes"] - stored + int4
    head_note = (
        f"The mobile row's head is {mobile['scheme'].split(',')[0].split()[-1]} ({stored / MIB:.1f} MiB) because it "
        f"lowers the cpu build's config; the mobile default int4 head (symmetric, groups of 32) stores "
        f"{int4 / MIB:.1f} MiB, so that artifact would be about {estimate / MIB:.1f} MiB "
        f"({estimate / fp32:.3f}× fp32): computed from the shapes, not built."
        if "int4" not in mobile["scheme"].split(",")[0]
        else ""
    )
    rows = []
    for name, m in measured.items():
        runs = m["bench"]
        prefill = " / ".join(
            spread([b["prefill_tokens_per_second"][str(n)]["median"] for b in runs], "{:.0f}") for n in PREFILL
        )
        decode = spread([b["decode_tokens_per_second"]["median"] for b in runs], "{:.1f}")
        ort_size = "–" if m["ort_bytes"] is None else f"{m['ort_bytes'] / MIB:.1f} MiB ({m['ort_bytes'] / fp32:.3f}×)"
        greedy_same = {kind: m["greedy"][kind] == reference[kind] for kind in ("ours", "genai")}
        same = (
            "reference" if name == "cpu, mobile edges" else f"ours {greedy_same['ours']}, genai {greedy_same['genai']}"
        )
        rows.append(
            f"| {name} | {m['scheme']} | {m['context']} | {m['onnx_bytes'] / MIB:.1f} MiB "
            f"({m['onnx_bytes'] / fp32:.3f}×) | {ort_size} | {m['ppl']:.2f} | {same} | {prefill} | "
            f"{decode} | {max(b['peak_rss_mib'] for b in runs):.0f} |"
        )
    body = f"""
## Mobile profile: SmolLM2-135M-Instruct for a phone's CPU EP, beside the cpu profile

`python benchmarks/mobile.py --threads {args.threads} --repeats {args.repeats} --rounds {args.rounds}` at commit
{commit_id()}, {date.today()}. Machine: {machine()}. All three artifacts lower one plan (the shipped
default's): the cpu example as shipped, the same on the cpu profile with the mobile profile's
edges (int4 head, embedding reading its table: the greedy reference), and the mobile
profile's artifact (`examples/smollm2-mobile.yaml`'s config). Sizes against the fp32
model ({fp32 / MIB:.1f} MiB: its {fp32 // 4:,} parameters in float32). Tokens: {args.tokens} greedy
from "The capital of France is", our runtime and onnxruntime-genai, compared with the cpu
reference's. Speed: `aqexport bench --prefill {",".join(map(str, PREFILL))} --decode-context 128
--decode-tokens 64`, {args.threads} threads: the median of {args.rounds} rounds' medians (min–max over rounds), the
artifacts alternating (1-minute load average {load:.1f} at the start: other jobs shared the cores),
on this x86 CPU: a proxy for a phone, whose
CPU EP runs the same graph on MLAS's ARM kernels. Perplexity: the build's verification
(WikiText-2 test). The reduced ONNX Runtime build from `required_operators_and_types.config`
is not made here.

| artifact | quantization | context | model.onnx + data | model.ort | ppl (ORT) | greedy = cpu \
| prefill tok/s ({" / ".join(map(str, PREFILL))}) | decode tok/s | peak RSS MiB |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{head_note}
"""
    print(write_section("mobile", body))


if __name__ == "__main__":
    main()
