"""The SmolLM2 artifacts issue 15's tables compare, built from the shipped example config.

Every variant is ``examples/smollm2-affinequant-w4a16g128.yaml`` (the default artifact: same
calibration budget, LM head int8, embedding int4, 40 × 512 evaluation windows) with only the
quantization keys below changed, so the tables compare what a user gets from the defaults:

* ``affinequant`` — the example itself (AffineQuant with the default norm-side form, diagonal for
  w4a16g128, and GPTQ rounding after the transforms);
* ``affinequant <form>`` — the same with ``transform: <form>`` (``dense``: the paper's form);
* ``rtn`` — round-to-nearest in the same format (no transforms, ``rounding: nearest``: the
  baseline people know as RTN), at the accuracy level its build measured;
* ``rtn level4`` — the same plan with ``target.accuracy_level: 4`` forced, the builder's level
  (the speed ceiling of the format, whatever it costs in perplexity);
* ``mobile`` — the default's plan lowered as ``examples/smollm2-mobile.yaml`` does, and
  ``affinequant mobile edges`` the same edges on the cpu profile (its greedy reference);
* ``affinequant tied`` — the default with ``embedding: tied`` (one int8 table for head and embedding);
* the other recipes for issue 18's peer table, each on the default's edges (int8 head, tied
  embedding) and calibration budget: ``affinequant nearest`` (the default without GPTQ rounding),
  ``rtn gptq`` (plain GPTQ), ``smoothquant`` / ``smoothquant gptq``, ``omniquant`` /
  ``omniquant gptq`` (w4a16g128), and ``llm int8`` (W8A8 with the outlier split: its own format).

Built into ``benchmarks/out/artifacts/<slug>`` (plans beside them, so a rebuild only lowers).

    python benchmarks/_smollm2_variants.py [name ...]     # build the missing ones
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2-affinequant-w4a16g128.yaml"
ARTIFACTS = ROOT / "benchmarks" / "out" / "artifacts"

VARIANTS: dict[str, dict] = {
    "affinequant": {},
    "affinequant dense": {"transform": "dense"},
    "rtn": {"recipe": "rtn", "rounding": "nearest"},
    "rtn level4": {"recipe": "rtn", "rounding": "nearest", "target": {"accuracy_level": 4}, "plan": "rtn"},
    "affinequant kronecker": {"transform": "kronecker"},
    "affinequant block_diagonal": {"transform": "block_diagonal"},
    "affinequant diagonal": {"transform": "diagonal"},
    # the shipped default's plan lowered as examples/smollm2-mobile.yaml lowers it: the mobile
    # profile's edges (int4 head, embedding reading the head's table) and its 2048-token context
    "mobile": {"lm_head": "int4", "embedding": "auto", "target": {"profile": "mobile"}, "plan": "affinequant"},
    # the same plan and edges on the cpu profile: the mobile artifact's greedy reference
    "affinequant mobile edges": {"lm_head": "int4", "embedding": "auto", "plan": "affinequant"},
    # the shipped default with its embedding reading the int8 head's table instead of an int4 copy
    "affinequant tied": {"embedding": "tied", "plan": "affinequant"},
    "affinequant nearest": {"rounding": "nearest"},
    "rtn gptq": {"recipe": "rtn"},
    "smoothquant": {"recipe": "smoothquant", "rounding": "nearest"},
    "smoothquant gptq": {"recipe": "smoothquant"},
    "omniquant": {"recipe": "omniquant", "rounding": "nearest"},
    "omniquant gptq": {"recipe": "omniquant"},
    # W8A8 per token: the method fixes its own schemes (no preset)
    "llm int8": {"recipe": "llm_int8", "preset": None, "rounding": "nearest"},
}


def slug(name: str) -> str:
    return "smollm2-" + name.replace(" ", "-")


def artifact_dir(name: str) -> Path:
    return ARTIFACTS / slug(name)


def write_config(name: str) -> Path:
    config = yaml.safe_load(EXAMPLE.read_text())
    variant = dict(VARIANTS[name])
    config["target"] = {**config.get("target", {}), **variant.pop("target", {})}
    plan = variant.pop("plan", name)  # variants that differ only in lowering share one plan
    config["quantization"].update(variant)
    config["quantization"] = {key: value for key, value in config["quantization"].items() if value is not None}
    for section, key in (("calibration", "data"), ("evaluation", "text")):
        config[section][key] = str((EXAMPLE.parent / config[section][key]).resolve())
    config["calibration"]["plan_dir"] = str(ARTIFACTS / f"{slug(plan)}.plan")
    config["output"]["dir"] = str(artifact_dir(name))
    path = ARTIFACTS / f"{slug(name)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build(name: str, rebuild: bool = False) -> Path:
    """Always through ``aqexport build``: its build cache returns an artifact that is up to date
    with the config and code in seconds, and rebuilds a stale one (an artifact left by an older
    config, say nearest rounding, must never be measured as the shipped default)."""
    directory = artifact_dir(name)
    start = time.perf_counter()
    command = [sys.executable, "-m", "aqexport.cli", "build", str(write_config(name))]
    subprocess.run([*command, *(["--force"] if rebuild else [])], check=True, cwd=ROOT)
    print(f"built {name} in {time.perf_counter() - start:.0f} s", flush=True)
    return directory


if __name__ == "__main__":
    for variant in sys.argv[1:] or VARIANTS:
        build(variant)
