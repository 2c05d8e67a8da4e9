"""Two builds of one config on one machine write the same bytes (issue 16, determinism).

Byte-identical: ``model.onnx``, ``model.onnx.data``, ``genai_config.json``, ``config.json``, the
tokenizer files and the plan (``plan.json``, ``block_NNN.safetensors``). ``manifest.json`` is
identical except under ``not_reproducible`` (stage and pass wall times) and the sha256 of the
files that key names (``report.json``: timings, throughput, memory; ``report.html``, the page
made from it); the plan's ``timings.json`` holds its blocks' wall times. No absolute
build-machine path is written into the artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

from aqexport.config import load_config
from aqexport.pipeline import build
from tests.conftest import tiny_build_config
from tests.faults.harness import reproducible_manifest
from tests.tiny_models import data_file

RTN = {"recipe": "rtn", "preset": "w4a16g128"}
CALIBRATION = {"data": str(data_file("valid")), "samples": 4, "seqlen": 32, "epochs": 2}


def _build(directory, model_dir):
    directory.mkdir()
    config = tiny_build_config(directory, model_dir, quantization=RTN, calibration=CALIBRATION)
    return build(load_config(config), directory)


def _strings(value):
    if isinstance(value, dict):
        yield from (s for item in value.items() for s in _strings(list(item)))
    elif isinstance(value, list):
        yield from (s for item in value for s in _strings(item))
    elif isinstance(value, str):
        yield value


def test_two_builds_are_byte_identical(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    first, second = _build(tmp_path / "a", model_dir), _build(tmp_path / "b", model_dir)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "config.json", "tokenizer.json", "report.html"):
        assert name in files
    for name in files:
        if name not in ("manifest.json", "report.json", "report.html"):
            assert (first / name).read_bytes() == (second / name).read_bytes(), name

    plans = [artifact.with_name(artifact.name + ".plan") for artifact in (first, second)]
    plan_files = sorted(p.name for p in plans[0].iterdir())
    assert "plan.json" in plan_files and "block_000.safetensors" in plan_files
    for name in plan_files:
        if name != "timings.json":  # the blocks' wall times
            assert (plans[0] / name).read_bytes() == (plans[1] / name).read_bytes(), name

    manifests = [json.loads((artifact / "manifest.json").read_text()) for artifact in (first, second)]
    assert manifests[0]["not_reproducible"]["files"] == ["report.json", "report.html"]
    assert set(manifests[0]["not_reproducible"]) == {"files", "stage_seconds", "pass_seconds"}
    assert all("seconds" not in record for record in manifests[0]["passes"])
    assert reproducible_manifest(manifests[0]) == reproducible_manifest(manifests[1])
    assert manifests[0]["config"]["output"]["dir"] == "artifact"

    for artifact in (first, second):  # paths are relative to the config's folder, never absolute
        for name in ("manifest.json", "report.json"):
            absolute = [s for s in _strings(json.loads((artifact / name).read_text())) if Path(s).is_absolute()]
            assert not [s for s in absolute if Path(s).exists()], name  # graph node names start with / too
        page = (artifact / "report.html").read_text()
        assert str(tmp_path) not in page and str(model_dir) not in page
    report = json.loads((first / "report.json").read_text())
    assert report["calibration"]["plan_dir"] == "artifact.plan"
