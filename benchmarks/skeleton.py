"""Walking-skeleton figures for SmolLM2-135M-Instruct fp32: build, parity, perplexity, speed.

Builds ``examples/smollm2-fp32.yaml`` (WikiText-2 test, seqlen 512, first 40 windows, PyTorch
and ONNX Runtime on the same windows), then times prefill and decode on the artifact with the
plain ONNX Runtime CPU session, and writes the table into BENCHMARKS.md between markers.

    python benchmarks/skeleton.py            # ~5 min on a 2-core machine
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import commit_id, write_section  # noqa: E402

from aqexport.config import load_config  # noqa: E402
from aqexport.pipeline import build  # noqa: E402
from aqexport.runtime import OnnxDecoder, create_session, generate  # noqa: E402

CONFIG = ROOT / "examples" / "smollm2-fp32.yaml"


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    import os

    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def speed(artifact: Path, repeats: int = 5) -> dict:
    session, info = create_session(artifact)
    decoder = OnnxDecoder(session)
    rng = np.random.default_rng(0)
    figures = {"providers": info.used}
    for length in (128, 512):
        ids = rng.integers(100, 20000, size=(1, length))
        decoder.step(ids, np.ones_like(ids), decoder.empty_past(1))  # warm-up
        seconds = timed(lambda ids=ids: decoder.step(ids, np.ones_like(ids), decoder.empty_past(1)), repeats)
        figures[f"prefill_{length}"] = [length / s for s in seconds]
    prompt = rng.integers(100, 20000, size=16).tolist()
    generate(decoder, prompt, 8)
    runs = [generate(decoder, prompt, 65) for _ in range(repeats)]
    figures["decode"] = [r.decode_tokens_per_second for r in runs]
    figures["ttft_16"] = [r.prefill_seconds * 1000 for r in runs]
    return figures


def stat(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    config = load_config(CONFIG)
    start = time.perf_counter()
    artifact = build(config, CONFIG.parent)
    build_seconds = time.perf_counter() - start
    report = json.loads((artifact / "report.json").read_text())
    verification = report["verification"]
    ppl = verification["perplexity"]
    figures = speed(artifact)
    commit = commit_id()
    rows = [
        ("export (torch.export + dynamo lowering)", f"{report['export_seconds']:.1f} s"),
        ("whole build (load, export, passes, write, verify)", f"{build_seconds:.1f} s"),
        ("artifact model size (model.onnx + data)", f"{report['model_bytes'] / 2**20:.1f} MiB"),
        (
            "logits max-abs vs PyTorch, prefill / decode step",
            f"{verification['logits_parity']['prefill']['max_abs']:.2e} / "
            f"{verification['logits_parity']['decode_step']['max_abs']:.2e}",
        ),
        (
            f"perplexity ONNX Runtime ({ppl['onnx']['windows']}×{ppl['onnx']['seqlen']})",
            f"{ppl['onnx']['perplexity']:.4f}",
        ),
        ("perplexity PyTorch (same windows)", f"{ppl['pytorch']['perplexity']:.4f}"),
        ("relative difference", f"{ppl['relative_difference']:.2e}"),
        ("64 greedy tokens identical to transformers generate", str(verification["greedy"]["identical_to_pytorch"])),
        ("prefill tok/s, 128 tokens, median (min–max of 5)", stat(figures["prefill_128"])),
        ("prefill tok/s, 512 tokens", stat(figures["prefill_512"])),
        ("decode tok/s, 64 tokens after a 16-token prompt", stat(figures["decode"])),
        ("time to first token, 16-token prompt (ms)", stat(figures["ttft_16"])),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    body = f"""
## Walking skeleton: SmolLM2-135M-Instruct, fp32, unquantized

Machine: {machine()}; onnxruntime {ort.__version__}, {", ".join(figures["providers"])},
default thread count. Measured {date.today()} at commit {commit} with
`python benchmarks/skeleton.py` (builds `examples/smollm2-fp32.yaml`).

| what | figure |
|---|---|
{table}

Perplexity is WikiText-2 test (the tokenized v1 release shipped in shared/data), the whole
split tokenized once with the model's tokenizer, non-overlapping windows, no BOS: not
comparable to papers' raw-WikiText figures. Decode runs the plain (unfused) graph, copying the
KV cache through numpy each step; fused attention and IO binding come with the targets issue.
"""
    section = write_section("skeleton", body)
    print(section)


if __name__ == "__main__":
    main()
