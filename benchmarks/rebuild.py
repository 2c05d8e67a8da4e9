"""An unchanged rebuild of the SmolLM2 default config: a forced build, then the same command again.

The second build finds the manifest's ``build_identity`` (config by content, source weights,
code, tool versions) unchanged and the files intact (``aqexport verify``), and returns the
artifact as "up to date" instead of re-exporting and re-verifying. The forced build lowers the
finished plan (calibration is resumed, not redone), so it is the cost a rebuild would pay
without the check.

    python benchmarks/rebuild.py        # needs benchmarks/out/artifacts/smollm2-affinequant.yaml
                                        # (python benchmarks/_smollm2_variants.py affinequant)
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import commit_id, write_section  # noqa: E402
from _smollm2_variants import write_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed_build(config: Path, *flags: str) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "aqexport.cli", "build", str(config), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    said = next(
        (line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("built", "up to date"))), ""
    )
    return time.perf_counter() - start, said.split("/")[0].strip()  # "built" / "up to date", no path


def main() -> None:
    config = write_config("affinequant")
    forced, forced_line = timed_build(config, "--force")
    unchanged, unchanged_line = timed_build(config)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = [
        "## Unchanged rebuild: SmolLM2 default config (`examples/smollm2-affinequant-w4a16g128.yaml`)",
        "",
        f"`python benchmarks/rebuild.py` at commit {commit_id()}, {date.today().isoformat()}, "
        f"{platform.machine()}, 2 cores. Wall time of each `aqexport build` process.",
        "",
        "| build | wall (s) | says |",
        "|---|---|---|",
        f"| `--force` (lowers the finished plan, exports, verifies) | {forced:.1f} | {forced_line} |",
        f"| the same command again | {unchanged:.1f} | {unchanged_line} |",
        f"| ratio | {unchanged / forced:.1%} | |",
        "",
        f"Peak RSS of the larger child: {peak:.0f} MiB. The unchanged build imports torch and onnx, hashes the "
        "config's texts, the source GGUF and the package code, and checks every file's sha256 against the manifest.",
    ]
    print(write_section("rebuild", "\n".join(lines)))


if __name__ == "__main__":
    main()
