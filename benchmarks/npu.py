"""The npu profile on SmolLM2-135M-Instruct: what each NPU EP would take of the static step
graph (ONNX Runtime's usability checker), the ``.ort`` file, and the static graph's agreement
with PyTorch, for an fp32 and an AffineQuant int4 (LM head int8) build.

Builds into ``benchmarks/out/artifacts/npu-*`` (the int4 one lowers the plan of
``benchmarks/calibration.py`` when present), then reads each report.

    python benchmarks/npu.py [--context 512] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _builds import OUT, write_smollm2_config  # noqa: E402
from _report import commit_id, write_section  # noqa: E402
from skeleton import machine  # noqa: E402

ARTIFACTS = OUT / "artifacts"
VARIANTS = {
    "npu fp32": {"recipe": "none"},
    "npu int4": {"recipe": "affinequant", "preset": "w4a16g128", "lm_head": "int8"},
}
EPS = ("nnapi", "coreml_neuralnetwork", "coreml_mlprogram")


def build(name: str, variant: dict, context: int, rebuild: bool) -> Path:
    directory = ARTIFACTS / name.replace(" ", "-")
    if rebuild and directory.exists():
        shutil.rmtree(directory)
    if not (directory / "report.json").exists():
        variant = {**variant, "target": {"profile": "npu", "max_context": context}}
        path = write_smollm2_config(variant, directory, ARTIFACTS / f"{directory.name}.yaml", 4, 32, seqlen=context)
        subprocess.run([sys.executable, "-m", "aqexport.cli", "build", str(path)], check=True, cwd=ROOT)
    return directory


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
        ppl = verification["perplexity"]
        rows.append(
            f"| {name} | {onnx_bytes / 2**20:.0f} MiB | {verification['ort_format']['bytes'] / 2**20:.0f} MiB | "
            f"{verification['ort_format']['greedy_identical_to_onnx']} | {ppl['onnx']['perplexity']:.3f} | "
            f"{ppl['pytorch']['perplexity']:.3f} | {verification['logits_parity']['decode_step']['max_rel']:.1e} | "
            f"{verification['greedy']['identical_to_pytorch']} | "
            f"{verification['greedy']['decode_tokens_per_second']:.1f} |"
        )
        for ep in EPS:
            e = eps[ep]
            ep_rows.append(
                f"| {name} | {ep} | {e['supported_nodes']} / {e['nodes']} ({100 * e['fraction']:.1f} %) | "
                f"{e['partitions']} | {', '.join(e['unsupported_ops']) or '–'} | {e['verdict']} |"
            )
        xnnpack = eps["xnnpack"]
    body = f"""
## NPU profile: SmolLM2-135M-Instruct as a static step graph

`python benchmarks/npu.py --context {args.context}` at commit {commit_id()}, {date.today()}.
Machine: {machine()}. Static contract: batch 1, one token per call, {args.context} cache slots,
attention by an additive mask input; QDQ weights in 8-bit storage (the ORT format has no 4-bit
type); `model.ort` written at basic optimization level. Perplexity: WikiText-2 test, 4 windows of
{args.context} tokens, fed token by token through the static graph. Decode tok/s: the static
graph on this machine's CPU EP (32 greedy tokens), not a phone.

| build | model.onnx | model.ort | .ort greedy = .onnx | ppl ONNX | ppl PyTorch | step logits rel \
| greedy = PyTorch | decode tok/s (CPU) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

ONNX Runtime's usability checker (`onnxruntime.tools.mobile_helpers`; op types and static
shapes against its published support tables, not a device run):

| build | EP | nodes it takes | partitions | unsupported ops | checker's verdict |
|---|---|---|---|---|---|
{chr(10).join(ep_rows)}

XNNPACK: {"offered" if xnnpack["available"] else "not offered"} by the installed onnxruntime
({", ".join(xnnpack["installed_providers"])}), so no XNNPACK run here.
"""
    print(write_section("npu", body))


if __name__ == "__main__":
    main()
