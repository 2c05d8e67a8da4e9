"""An unchanged rebuild returns the artifact already there; a second build into a running
build's output is refused (issue 16, cache and lock)."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from aqexport.build_cache import build_lock, lock_path, up_to_date
from aqexport.config import load_config
from aqexport.errors import ConfigError
from aqexport.pipeline import build
from tests.conftest import read_report, tiny_build_config
from tests.tiny_models import data_file

RTN = {"recipe": "rtn", "preset": "w4a16g128"}
CALIBRATION = {"data": str(data_file("valid")), "samples": 4, "seqlen": 32, "epochs": 2}


def _build(config_path, work, **kwargs) -> tuple[list[str], dict]:
    stages: list[str] = []
    artifact = build(load_config(config_path), work, on_stage=stages.append, **kwargs)
    return stages, read_report(artifact)


def test_unchanged_rebuild_is_up_to_date_and_force_or_edits_rebuild(tiny_model_dir, tmp_path, caplog):
    config_path = tiny_build_config(tmp_path, tiny_model_dir("llama"), quantization=RTN, calibration=CALIBRATION)
    artifact = tmp_path / "artifact"
    stages, first = _build(config_path, tmp_path)
    assert "capture" in stages and first["calibration"]["resumed_from_block"] == 0
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["build_identity"]) == {
        "config_sha256",
        "source_sha256",
        "source_files_sha256",
        "aqexport_version",
        "aqexport_code_sha256",
        "versions",
    }
    assert manifest["build_identity"]["source_sha256"] == manifest["source"]["sha256"]
    before = (artifact / "model.onnx").stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger="aqexport.pipeline"):
        stages, _ = _build(config_path, tmp_path)
    why = [r.getMessage() for r in caplog.records if r.getMessage().startswith("building: ")]
    assert stages == ["up to date"], why  # nothing loaded, exported or verified
    assert any(r.getMessage().startswith("up to date: ") for r in caplog.records)
    assert (artifact / "model.onnx").stat().st_mtime_ns == before

    stages, forced = _build(config_path, tmp_path, force=True)
    assert "capture" in stages and "verify" in stages
    assert forced["calibration"]["resumed_from_block"] == 2  # the finished plan is lowered, not recalibrated

    raw = yaml.safe_load(config_path.read_text())
    raw["evaluation"]["max_windows"] = 2  # only evaluation changes: re-verify, no recalibration
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    stages, edited = _build(config_path, tmp_path)
    assert "verify" in stages and edited["calibration"]["resumed_from_block"] == 2
    assert edited["verification"]["perplexity"]["onnx"]["windows"] == 2
    assert json.loads((artifact / "manifest.json").read_text())["config_sha256"] != manifest["config_sha256"]


def test_a_changed_file_or_identity_is_not_up_to_date(tiny_artifact):
    artifact = tiny_artifact("llama")
    identity = json.loads((artifact / "manifest.json").read_text())["build_identity"]
    assert up_to_date(artifact, identity)[0]
    fresh, why = up_to_date(artifact, {**identity, "source_sha256": "0" * 64})
    assert not fresh and why == "build_identity changed: source_sha256"
    assert not up_to_date(artifact.parent / "elsewhere", identity)[0]


def test_a_tampered_artifact_is_rebuilt(tiny_artifact, tmp_path):
    import shutil

    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact("llama"), copy)
    identity = json.loads((copy / "manifest.json").read_text())["build_identity"]
    (copy / "genai_config.json").write_text("{}")
    fresh, why = up_to_date(copy, identity)
    assert not fresh and "genai_config.json changed" in why


def test_a_second_build_into_a_locked_output_is_refused(tiny_model_dir, tmp_path):
    config = load_config(tiny_build_config(tmp_path, tiny_model_dir("llama")))
    out = tmp_path / "artifact"
    with build_lock(out) as held:
        assert held == lock_path(out) == tmp_path / ".artifact.lock"
        with pytest.raises(ConfigError, match=r"being built by pid \d+") as raised:
            build(config, tmp_path)
        assert ".artifact.lock" in raised.value.cause and raised.value.exit_code == 2
        with pytest.raises(ConfigError, match="being built"):  # the same call the pipeline makes
            with build_lock(out):
                pass
    assert not held.exists() and not out.exists()  # the lock is gone, nothing was built
    with build_lock(out):  # and can be taken again
        pass
