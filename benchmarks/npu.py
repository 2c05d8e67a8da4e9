"""The npu profile on SmolLM2-135M-Instruct: what each NPU EP would take of the static step
and prefill graphs (ONNX Runtime's usability checker), the ``.ort`` file, the prefill graph's
size beside the step graph whose weights file it reads, and the static graphs' agreement with
PyTorch, for an fp32 and an AffineQuant int4 (LM head int8) build.

Builds into ``benchmarks/out/artifacts/npu-*`` (the int4 one lowers the plan of
``benchmarks/calibration.py`` when present), then reads each report.

    python benchmarks/npu.py [--context 512] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _builds import OUT, write_smollm2_config  # noqa: E402
from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

ARTIFACTS = OUT / "artifacts"
#: ``target`` keys beside the profile's: ``npu`` picks the weights' storage (coreml, the default:
#: the plan's values in float16; qnn / nnapi: QDQ codes in 8-bit storage).
VARIANTS = {
    "npu fp32": {"recipe": "none"},
    "npu int4 (coreml)": {"recipe": "affinequant", "preset": "w4a16g128", "lm_head": "int8"},
    "npu int4 (qnn)": {"recipe": "affinequant", "preset": "w4a16g128", "lm_head": "int8", "target": {"npu": "qnn"}},
}
EPS = ("nnapi", "coreml_neuralnetwork", "coreml_mlprogram", "qnn")


def build(name: str, variant: dict, context: int, rebuild: bool) -> Path:
    directory = ARTIFACTS / name.replace(" ", "-").replace("(", "").replace(")", "")
    if rebuild and directory.exists():
        shutil.rmtree(directory)
    if not (directory / "report.json").exists():
        variant = {**variant, "target": {"profile": "npu", "max_context": context, **variant.get("target", {})}}
        path = write_smollm2_config(variant, directory, ARTIFACTS / f"{directory.name}.yaml", 4, 32, seqlen=context)
        subprocess.run([sys.executable, "-m", "aqexport.cli", "build", str(path)], check=True, cwd=ROOT)
    return directory


def prompt_speed(directory: Path, tokens: int, rounds: int = 3) -> tuple[float, float]:
    """Prompt tok/s of ``tokens`` tokens through the prefill graph, and one token per call through
    the step graph alone: medians of ``rounds`` alternating rounds on one step session."""
    import numpy as np

    from aqexport.runtime import create_session, decoder_for, prefill_session

    step = create_session(directory)[0]
    decoders = {"prefill": decoder_for(step, prefill=prefill_session(directory)), "steps": decoder_for(step)}
    ids = (np.arange(tokens)[None] * 7919 + 11) % 40000 + 3
    seconds: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, decoder in decoders.items():
            start = time.perf_counter()
            decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))
            seconds[name].append(time.perf_counter() - start)
    return tokens / statistics.median(seconds["prefill"]), tokens / statistics.median(seconds["steps"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    rows, ep_rows = [], []
    for name, variant in VARIANTS.items():
        directory = build(name, variant, args.context, args.rebuild)
        report = json.loads((directory / "report.json").read_text())
        verification, eps = report["verification"], report["mobile"]["execution_providers"]
        onnx_bytes = sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith("model.onnx"))
        ppl, prefill = verification["perplexity"], report["mobile"]["prefill"]
        chunked, stepped = prompt_speed(directory, prefill["tokens_per_call"])
        rows.append(
            f"| {name} | {onnx_bytes / 2**20:.0f} MiB | {prefill['bytes'] / 2**20:.2f} MiB "
            f"({prefill['tokens_per_call']} tokens, {prefill['own_bytes']} B of own weights) | "
            f"{prefill['pair_vs_one_graph']:.4f}× | {verification['ort_format']['bytes'] / 2**20:.0f} MiB | "
            f"{verification['ort_format']['greedy_identical_to_onnx']} | {ppl['onnx']['perplexity']:.3f} | "
            f"{ppl['pytorch']['perplexity']:.3f} | {verification['logits_parity']['decode_step']['max_rel']:.1e} | "
            f"{verification['greedy']['identical_to_pytorch']} | "
            f"{chunked:.0f} / {stepped:.0f} | "
            f"{verification['greedy']['decode_tokens_per_second']:.1f} |"
        )
        for graph, checked in (("step", eps), ("prefill", prefill["execution_providers"])):
            for ep in EPS:
                e = checked[ep]
                if e.get("checked") is False:  # QNN compiles for target.npu: qnn builds only
                    ep_rows.append(f"| {name} | {graph} | {ep} | – | – | – | not compiled: {e['reason']} |")
                    continue
                left = e.get("left_on_cpu")  # QNN's compile counts the nodes it leaves out
                unsupported = (
                    ", ".join(f"{op} ×{n}" for op, n in left.items()) if left else ", ".join(e["unsupported_ops"])
                )
                ep_rows.append(
                    f"| {name} | {graph} | {ep} | {e['supported_nodes']} / {e['nodes']} "
                    f"({100 * e['fraction']:.1f} %) | {e['partitions']} | {unsupported or '–'} | {e['verdict']} |"
                )
        xnnpack = eps["xnnpack"]
    body = f"""
## NPU profile: SmolLM2-135M-Instruct as static step and prefill graphs

`python benchmarks/npu.py --context {args.context}` at commit {commit_id()}, {date.today()}.
Machine: {machine()}. Static contract: batch 1, {args.context} cache slots, attention by an
additive mask input; the step graph (`model.onnx`) takes one token per call, the prefill graph
(`prefill.onnx`) the default `target.prefill_tokens` and reads `model.onnx.data` (its own size is
its graph proto; "pair ÷ one graph": both graphs and the weights file over the step graph and
its weights file). Weights by `target.npu`: **coreml** (the default) stores the plan's values in
float16, because ONNX Runtime's CoreML EP has no `DequantizeLinear` (Core ML compresses weights
itself, with coremltools); **qnn** keeps QDQ codes in 8-bit storage (the ORT format has no 4-bit
type) and puts uint16 QDQ on every linear's input and output (w4a16). QNN's verdict is a compile
by `onnxruntime-qnn` for the Hexagon NPU (HTP v75) on this host, the others ONNX Runtime's
usability checker. `model.ort` (the step graph) written at basic optimization level, which folds
the float16 → float32 casts (so the coreml `.ort` holds float32). Perplexity: WikiText-2 test, 4 windows of
{args.context} tokens, each through the prefill graph's chunks. Prompt tok/s: one prompt of
`prefill_tokens` tokens through the prefill graph / one token per call through the step graph
(medians of 3 alternating rounds on one session); decode tok/s: the verification's greedy run
(its generated tokens). Both on this machine's CPU EP, a proxy for the phone, not a phone.

| build | model.onnx + data | prefill.onnx | pair ÷ one graph | model.ort | .ort greedy = .onnx | ppl ONNX \
| ppl PyTorch | step logits rel | greedy = PyTorch | prompt tok/s, prefill graph / steps (CPU) | decode tok/s (CPU) |
|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

ONNX Runtime's usability checker (`onnxruntime.tools.mobile_helpers`; op types and static
shapes against its published support tables, not a device run) for NNAPI and CoreML; for QNN
`onnxruntime-qnn`'s compile of the graph for the Hexagon NPU (HTP v75, Snapdragon 8 Gen 3,
offline on this host; the ops it leaves to the CPU, with counts; not a device run either):

| build | graph | EP | nodes it takes | partitions | ops left to the CPU | verdict |
|---|---|---|---|---|---|---|
{chr(10).join(ep_rows)}

XNNPACK: {"offered" if xnnpack["available"] else "not offered"} by the installed onnxruntime
({", ".join(xnnpack["installed_providers"])}), so no XNNPACK run here.
"""
    print(write_section("npu", body))


if __name__ == "__main__":
    main()
