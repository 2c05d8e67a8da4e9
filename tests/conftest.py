from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import data_file, make_tiny_model

ARCHITECTURES = ("llama", "qwen2", "opt", "gemma3_text")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return made[kind]

    return get


def write_config(directory: Path, **sections) -> Path:
    path = directory / "model.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def tiny_build_config(directory: Path, model_dir: Path, **overrides) -> Path:
    sections = {
        "model": {"source": str(model_dir)},
        "quantization": {"recipe": "none"},
        "evaluation": {
            "text": str(data_file("test")),
            "seqlen": 48,
            "max_windows": 3,
            "generate_tokens": 12,
            "prompt": "The history of the city",
        },
        "output": {"dir": str(directory / "artifact")},
    }
    sections.update(overrides)
    return write_config(directory, **sections)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory):
    """Build each tiny architecture once per session; tests share the artifacts read-only."""
    from aqexport.config import load_config
    from aqexport.pipeline import build

    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            work = tmp_path_factory.mktemp(f"build-{kind}")
            config_path = tiny_build_config(work, tiny_model_dir(kind))
            built[kind] = build(load_config(config_path), work)
        return built[kind]

    return get


def read_report(artifact: Path) -> dict:
    return json.loads((artifact / "report.json").read_text())
