"""The capture without the model in memory (issue 17): a weightless skeleton traced by
``torch.export``, its graph's weights read from the safetensors checkpoint when written.

Per checkpoint (each in its own process, so its peak RSS is its own): seconds and peak RSS of
building the skeleton and exporting it (``aqexport.capture.export_onnx`` with
``CheckpointWeights``), then of writing the float graph with external data, every weight read
from the checkpoint as it is written (``onnx_ir.save``). Rows: the random Llama of 1.17 B
parameters of ``build_memory.py`` (real data) and the Llama-2-7B-shaped checkpoint (6.74 B,
25.1 GiB of float32; a sparse file, so its weights read as zeros at memory speed: the write's
time is the disk's, its peak RSS is what matters).

    python benchmarks/capture_weightless.py
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _report import commit_id, write_section  # noqa: E402
from build_memory import OUT, random_llama_1b, sparse_llama_7b  # noqa: E402
from skeleton import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "capture_weightless.json"

_CHILD = """
import json, resource, sys, time
from pathlib import Path
import onnx_ir as ir, torch
from transformers import AutoConfig, AutoModelForCausalLM
from aqexport.capture import cache_layout, export_onnx
from aqexport.capture_weights import CheckpointWeights, skeleton_model

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
start = time.perf_counter()
config = AutoConfig.from_pretrained(folder)
model_class = AutoModelForCausalLM._model_mapping[type(config)]
skeleton = skeleton_model(model_class, config, torch.float32)
layout = cache_layout(skeleton)
weights = CheckpointWeights.for_model(folder, skeleton, head_tied=False)
assert weights is not None, "the checkpoint does not hold the skeleton's parameters"
graph, export_s = export_onnx(skeleton, layout, weights=weights)
row = {"capture_s": time.perf_counter() - start, "export_s": export_s, "capture_peak_mib": peak()}
start = time.perf_counter()
ir.save(graph, out / "model.onnx", external_data="model.onnx.data")
row |= {"write_s": time.perf_counter() - start, "write_peak_mib": peak()}
row["written_gib"] = (out / "model.onnx.data").stat().st_size / 2**30
print(json.dumps(row))
"""


def measure(folder: Path) -> dict:
    out = OUT / "capture-weightless"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(folder), str(out)], capture_output=True, text=True, check=True
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = {
        "random Llama 1.17B (4.4 GiB fp32)": {"params_b": 1.17, **measure(random_llama_1b(OUT / "random-llama-1b"))},
        "Llama-2-7B shape 6.74B (25.1 GiB fp32, sparse)": {
            "params_b": 6.74,
            **measure(sparse_llama_7b(OUT / "sparse-llama-7b")),
        },
    }
    RESULTS.write_text(json.dumps({"commit": commit_id(), "machine": machine(), "rows": rows}, indent=1) + "\n")
    lines = [
        f"| {name} | {row['capture_s']:.0f} s | {row['capture_peak_mib']:.0f} MiB | {row['write_s']:.0f} s | "
        f"{row['written_gib']:.1f} GiB | {row['write_peak_mib']:.0f} MiB |"
        for name, row in rows.items()
    ]
    body = f"""
## Capture without the model in memory: a weightless skeleton, weights read from the checkpoint

`python benchmarks/capture_weightless.py` at commit {commit_id()}, {date.today()}. Machine: {machine()}.
Each row is one process: build the model's skeleton (fake parameters: shapes, no storage),
`torch.export` it and run the exporter's optimizer (`aqexport.capture.export_onnx` with
`CheckpointWeights`), then write the float graph with external data, each weight read from the
safetensors file as it is written. Peak RSS is the process's running peak (`ru_maxrss`) after
each step; the float32 weights are 4.4 and 25.1 GiB. The build's capture stage takes this path
for every local safetensors checkpoint; the rest of a build (calibration, verification) still
loads the model whole (issue 17).

| checkpoint | skeleton + export | peak RSS | write | written | peak RSS after writing |
|---|---|---|---|---|---|
{chr(10).join(lines)}
"""
    print(write_section("capture-weightless", body))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
