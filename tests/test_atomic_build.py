"""A failed build leaves nothing half-written; a successful one replaces the old artifact whole."""

from __future__ import annotations

import dataclasses

import pytest

from aqexport import pipeline
from aqexport.config import load_config
from tests.conftest import tiny_build_config


def _fail(staging, **_):
    assert (staging / "model.onnx").is_file(), "the failing stage runs after the model was written"
    raise RuntimeError("verification exploded")


def test_failure_leaves_previous_artifact_and_no_temp_dirs(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "marker").write_text("previous build")
    config = load_config(
        tiny_build_config(tmp_path, tiny_model_dir("llama"), evaluation={"text": None, "generate_tokens": 0})
    )
    stages = tuple(
        dataclasses.replace(stage, run=_fail) if stage.name == "verify" else stage for stage in pipeline.STAGES
    )
    monkeypatch.setattr(pipeline, "STAGES", stages)
    with pytest.raises(RuntimeError, match="exploded"):
        pipeline.build(config, tmp_path)
    assert (out / "marker").read_text() == "previous build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "model.yaml"]


def test_success_replaces_previous_artifact(tiny_model_dir, tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "marker").write_text("previous build")
    config = load_config(
        tiny_build_config(tmp_path, tiny_model_dir("llama"), evaluation={"text": None, "generate_tokens": 0})
    )
    pipeline.build(config, tmp_path)
    assert not (out / "marker").exists() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "model.yaml"]
