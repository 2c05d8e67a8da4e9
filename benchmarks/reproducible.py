"""Two clean builds of the shipped default config give the same bytes.

Builds ``examples/smollm2-affinequant-w4a16g128.yaml`` twice from scratch (calibration included),
each into its own output and plan directory, and compares the sha256 of every file: the
artifact's files as its manifest lists them but those the manifest declares
``not_reproducible`` (``report.json`` and ``report.html``, which hold wall times), the manifests
without that section and without those files' entries, and every plan file but ``timings.json``
(wall times by design).

    python benchmarks/reproducible.py     # two full builds: about 2 × 10 minutes on 2 cores
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import commit_id, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2-affinequant-w4a16g128.yaml"


def _config_into(directory: Path) -> Path:
    """The example with its relative paths made absolute and its output (and plan) in ``directory``."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["calibration"]["data"] = str((EXAMPLE.parent / config["calibration"]["data"]).resolve())
    config["evaluation"]["text"] = str((EXAMPLE.parent / config["evaluation"]["text"]).resolve())
    config["output"]["dir"] = str(directory / "artifact")
    path = directory / "model.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _reproducible_manifest(artifact: Path) -> dict:
    """The manifest without ``not_reproducible`` and without the entries of the files it names
    (their sha256 changes with the wall times they hold)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    varying = set(manifest.pop("not_reproducible")["files"])
    manifest["files"] = {name: entry for name, entry in manifest["files"].items() if name not in varying}
    return manifest


def _digests(directory: Path) -> dict[str, str]:
    artifact, plan = directory / "artifact", directory / "artifact.plan"
    manifest = _reproducible_manifest(artifact)
    found = {f"artifact/{name}": entry["sha256"] for name, entry in manifest["files"].items()}
    found["artifact/manifest.json (without not_reproducible)"] = hashlib.sha256(
        json.dumps(manifest, sort_keys=True).encode()
    ).hexdigest()
    for path in sorted(plan.rglob("*")):
        if path.is_file() and path.name != "timings.json":
            found[f"plan/{path.relative_to(plan)}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _first_difference(a: object, b: object, path: str = "") -> str:
    """Where two JSON values first differ, as a key path (for the report, not for a fix)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{index}]")
    return f"{path}: {str(a)[:80]} != {str(b)[:80]}"


def main() -> None:
    runs, seconds, perplexities, stages, manifests = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="aqexport-reproducible-") as scratch:
        for name in ("a", "b"):
            directory = Path(scratch) / name
            directory.mkdir()
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "aqexport.cli", "build", str(_config_into(directory))],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            seconds.append(time.perf_counter() - start)
            runs.append(_digests(directory))
            report = json.loads((directory / "artifact" / "report.json").read_text())
            manifest = json.loads((directory / "artifact" / "manifest.json").read_text())
            manifests.append(_reproducible_manifest(directory / "artifact"))
            perplexities.append(report["verification"]["perplexity"]["onnx"]["perplexity"])
            stages.append(manifest["not_reproducible"]["stage_seconds"])
    differing = sorted(name for name in runs[0].keys() | runs[1].keys() if runs[0].get(name) != runs[1].get(name))
    if manifests[0] != manifests[1]:
        differing.append(f"(manifest first differs at {_first_difference(manifests[0], manifests[1])})")
    lines = [
        "## Reproducible builds: the SmolLM2 default config built twice from scratch",
        "",
        f"Measured {date.today()} at commit {commit_id()} on {platform.machine()} "
        f"({platform.processor() or 'cpu'}, 2 cores) with `python benchmarks/reproducible.py`.",
        "",
        f"- builds: {seconds[0]:.0f} s and {seconds[1]:.0f} s (calibration included, each with its own plan dir)",
        f"- files compared by sha256: {len(runs[0])} (artifact files but those `not_reproducible` names, the manifest "
        "without that key and those files' entries, plan files but `timings.json`)",
        f"- differing: {', '.join(differing) if differing else 'none — byte-identical'}",
        f"- WikiText-2 test perplexity of the artifact under ONNX Runtime (40 × 512): {perplexities[0]:.4f} / "
        f"{perplexities[1]:.4f} (fp 25.6153: {perplexities[0] / 25.615251724237332:.3f}×)",
        "- stage seconds of the first build: " + ", ".join(f"{k} {v:.0f}" for k, v in stages[0].items()),
    ]
    print(write_section("reproducible", "\n".join(lines)))
    if differing:
        sys.exit(1)


if __name__ == "__main__":
    main()
