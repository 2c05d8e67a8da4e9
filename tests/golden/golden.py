"""The graph this project ships, pinned: a tiny build diffed against a committed description.

CI (``.ci/run``) runs ``python -m tests.golden.golden check``: it builds a tiny random Llama
(seeded) with the recipe below, then ``aqexport diff tests/golden/tiny-llama-rtn-w4.json
<artifact> --policy tests/golden/policy.yaml --markdown``. The policy pins the structure (ops,
node set and wiring, graph I/O), not the weight bytes: calibration arithmetic may differ in the
last bit between CPU types, the graph must not. A pull request that changes the graph on
purpose updates the golden with one command and commits the JSON, so the change is reviewed
as a readable diff:

    python -m tests.golden.golden update
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "tiny-llama-rtn-w4.json"
POLICY = HERE / "policy.yaml"
QUANTIZATION = {"recipe": "rtn", "preset": "w4a16g128", "lm_head": "int8", "embedding": "int4"}


def build_tiny(work: Path) -> Path:
    from aqexport.config import load_config
    from aqexport.pipeline import build
    from tests.conftest import tiny_build_config
    from tests.tiny_models import data_file, make_tiny_model

    model_dir = make_tiny_model("llama", work / "tiny-llama", seed=0)
    config = tiny_build_config(
        work,
        model_dir,
        quantization=QUANTIZATION,
        calibration={"data": str(data_file("valid")), "samples": 2, "seqlen": 32},
    )
    return build(load_config(config), work)


def _aqexport(*args: str) -> int:
    return subprocess.run([sys.executable, "-m", "aqexport.cli", *args]).returncode


def main(action: str) -> int:
    with tempfile.TemporaryDirectory(prefix="aqexport-golden-") as tmp:
        artifact = build_tiny(Path(tmp))
        if action == "update":
            return _aqexport("diff", "--describe", str(artifact), "-o", str(GOLDEN))
        return _aqexport("diff", str(GOLDEN), str(artifact), "--policy", str(POLICY), "--markdown")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("check", "update"):
        sys.exit("usage: python -m tests.golden.golden check|update")
    sys.exit(main(sys.argv[1]))
