"""RTN fake-quant perplexity of SmolLM2-135M-Instruct: the floor every calibration recipe must beat.

PyTorch fake-quant (weights quantize-dequantized in place, activations in float), WikiText-2
test, seqlen 512, first 40 windows, the same windows and scorer as the build's verification.
Writes its table into BENCHMARKS.md between markers.

    python benchmarks/rtn_baseline.py        # ~4 min on a 2-core machine
"""

from __future__ import annotations

import copy
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import commit_id, write_section  # noqa: E402

from aqexport.calibrate.quantizer import QuantScheme  # noqa: E402
from aqexport.calibrate.rtn import rtn_fake_quantize_  # noqa: E402
from aqexport.config import ModelSpec  # noqa: E402
from aqexport.reference import torch_logits_of  # noqa: E402
from aqexport.runtime import perplexity, split_windows  # noqa: E402
from aqexport.sources import load_model  # noqa: E402
from aqexport.verify import tokenize_text  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
SCHEMES = {
    "w4a16 (per channel)": QuantScheme(4, None),
    "w4a16g128": QuantScheme(4, 128),
    "w3a16g128": QuantScheme(3, 128),
    "w8a16 (per channel)": QuantScheme(8, None),
}


def main() -> None:
    loaded = load_model(ModelSpec(source="default"))
    windows = split_windows(tokenize_text(loaded.tokenizer, TEXT), 512, 40)
    fp_state = copy.deepcopy(loaded.model.state_dict())
    fp = perplexity(torch_logits_of(loaded.model), windows).perplexity
    rows = [("fp32", f"{fp:.4f}", "1.000", "–")]
    for label, scheme in SCHEMES.items():
        loaded.model.load_state_dict(fp_state)
        start = time.perf_counter()
        rtn_fake_quantize_(loaded.model, scheme)
        seconds = time.perf_counter() - start
        ppl = perplexity(torch_logits_of(loaded.model), windows).perplexity
        rows.append((f"rtn {label}", f"{ppl:.4f}", f"{ppl / fp:.3f}", f"{seconds:.1f} s"))
        print(rows[-1], flush=True)
    commit = commit_id()
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    body = f"""
## RTN baseline: SmolLM2-135M-Instruct, PyTorch fake-quant (weights only)

WikiText-2 test, seqlen 512, first 40 windows ({windows.shape[0] * (windows.shape[1] - 1)} predicted tokens).
Every linear of the decoder blocks quantized, asymmetric, LM head and embedding in float.
Measured {date.today()} at commit {commit} with `python benchmarks/rtn_baseline.py`.

| scheme | perplexity | ratio to fp | quantize time |
|---|---|---|---|
{table}

The checkpoint was stored as GGUF Q4_1 (groups of 32), so 4-bit schemes on a coarser grid are
the informative ones (DESIGN.md).
"""
    section = write_section("rtn", body)
    print(section)


if __name__ == "__main__":
    main()
