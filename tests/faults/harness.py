"""What the fault-injection tests share: the tiny config, running the CLI in a child process
(optionally with ``AQEXPORT_FAULT`` set, ``aqexport.faults``), and comparing a work directory's
artifact and plan with the uninterrupted reference build's, file by file.

Every work directory (the reference's included) is a direct child of pytest's base temp
directory and holds ``model.yaml`` with ``output.dir: artifact``, so the paths the manifest and
report record relative to the config (``../tiny-llama0``) are the same in all of them and the
artifacts can be compared byte for byte.

Random kill points come from ``random.Random(SEED)``; ``AQEXPORT_FAULT_SEED=<n>`` replays (or
explores) another draw. Each test prints the points it drew.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aqexport.faults import ENV

SEED = int(os.environ.get("AQEXPORT_FAULT_SEED", "16"))
REPO = Path(__file__).resolve().parents[2]
ARTIFACT, PLAN = "artifact", "artifact.plan"
#: report.json keys that hold wall times, memory, or say how the build got there (not what it built)
_VOLATILE_REPORT_KEYS = ("seconds", "per_second", "timings", "resumed_from_block", "rss")
#: Files compared for being there only: wall times by design (the plan's block times; the page
#: made from report.json, which shows them)
_PRESENCE_ONLY = ("timings.json", "report.html")


def config_text(model_dir: Path) -> str:
    """AffineQuant on the tiny 2-layer Llama: two calibration blocks, a real plan directory, the
    smallest budget the config allows (epochs 2), and a verification without perplexity."""
    from tests.tiny_models import data_file  # here: the full-disk driver imports this module, not torch

    sections = {
        "model": {"source": str(model_dir)},
        "quantization": {"recipe": "affinequant", "preset": "w4a16g128"},
        "calibration": {"data": str(data_file("valid")), "samples": 2, "seqlen": 32, "epochs": 2},
        "evaluation": {"text": None, "generate_tokens": 4, "prompt": "The history of the city", "ladder": False},
        "output": {"dir": ARTIFACT},
    }
    return yaml.safe_dump(sections, sort_keys=False)


def write_config(work: Path, model_dir: Path) -> Path:
    path = work / "model.yaml"
    path.write_text(config_text(model_dir))
    return path


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "aqexport.cli", *args]


def child_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if fault is not None:
        env[ENV] = fault
    return env


def run_cli(work: Path, *args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``aqexport <args>`` in ``work`` (a child process), its output captured."""
    return subprocess.run(
        cli_command(*args), cwd=work, env=child_env(fault), capture_output=True, text=True, timeout=timeout
    )


def start_cli(work: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(*args),
        cwd=work,
        env=child_env(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(directory: Path) -> dict[str, str]:
    """Posix relative path -> sha256 of every file under ``directory`` (hidden ones included)."""
    if not directory.is_dir():
        return {}
    return {p.relative_to(directory).as_posix(): sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def _strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if not any(word in k for word in _VOLATILE_REPORT_KEYS)}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def reproducible_manifest(manifest: dict) -> dict:
    """The manifest without what it declares not reproducible (wall times, their files)."""
    manifest = dict(manifest)
    varying = manifest.pop("not_reproducible")
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k not in varying["files"]}
    return manifest


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if a == b else path or "."


def _difference(name: str, reference: Path, candidate: Path) -> str | None:
    """Why ``candidate`` is not what ``reference`` is; ``None`` if it is. Byte for byte, except
    the files that hold wall times: the manifest outside ``not_reproducible``, the report
    without its timings (both compared as JSON: the first differing key is named), and the
    plan's ``timings.json`` and the artifact's ``report.html`` only for being there."""
    if name in _PRESENCE_ONLY:
        return None
    if name in ("manifest.json", "report.json"):
        canonical = reproducible_manifest if name == "manifest.json" else _strip_volatile
        key = _first_difference(*(canonical(json.loads(p.read_text())) for p in (reference, candidate)))
        return None if key is None else f"{key} differs"
    if reference.read_bytes() == candidate.read_bytes():
        return None
    return f"sha256 {sha256(candidate)[:12]} != uninterrupted {sha256(reference)[:12]}"


def differences(reference: Path, work: Path, subdirs: tuple[str, ...] = (ARTIFACT, PLAN)) -> list[str]:
    """One line per file of the artifact and the plan that is missing, extra or different in
    ``work`` compared with ``reference`` (both work directories)."""
    problems = []
    for subdir in subdirs:
        expected, got = digests(reference / subdir), digests(work / subdir)
        for name in sorted(expected.keys() | got.keys()):
            where = f"{subdir}/{name}"
            if name not in got:
                problems.append(f"{where}: missing")
            elif name not in expected:
                problems.append(f"{where}: not in the uninterrupted build")
            elif expected[name] != got[name]:
                why = _difference(Path(name).name, reference / where, work / where)
                if why is not None:
                    problems.append(f"{where}: {why}")
    return problems


def plan_prefix(reference: Path, work: Path) -> tuple[int, list[str]]:
    """``(m, problems)``: the plan in ``work`` must list blocks ``0..m-1`` and nothing else, each
    with the reference's metadata and sha256, its file byte-identical to the reference's. A
    missing plan is ``m = 0``."""
    index = work / PLAN / "plan.json"
    if not index.is_file():
        return 0, []
    saved = json.loads(index.read_text())
    expected = json.loads((reference / PLAN / "plan.json").read_text())
    keys = sorted(saved["blocks"], key=int)
    problems = [] if keys == [str(i) for i in range(len(keys))] else [f"plan.json lists blocks {keys}"]
    for key in keys:
        name = f"block_{int(key):03d}.safetensors"
        if saved["blocks"][key] != expected["blocks"][key]:
            problems.append(f"plan.json block {key}: metadata differs from the uninterrupted build")
        if saved["block_sha256"].get(key) != expected["block_sha256"][key]:
            problems.append(f"plan.json block {key}: sha256 differs from the uninterrupted build")
        if sha256(work / PLAN / name) != sha256(reference / PLAN / name):
            problems.append(f"{name}: differs from the uninterrupted build")
    return len(keys), problems


def names(work: Path) -> set[str]:
    """What ``work`` holds at its top level (hidden names included)."""
    return {p.name for p in work.iterdir()}


def staging_leftovers(work: Path) -> list[str]:
    return sorted(n for n in names(work) if n.startswith((f".{ARTIFACT}.tmp-", f".{ARTIFACT}.old-")))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@dataclass(frozen=True)
class Reference:
    """The uninterrupted build every faulted one is compared with."""

    work: Path
    model_dir: Path
    stage_seconds: dict[str, float]
    passes: int
    blocks: int
    plan_bytes: dict[str, int]
    artifact_bytes: dict[str, int]
