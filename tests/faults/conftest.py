from __future__ import annotations

import json

import pytest

from aqexport.config import load_config
from aqexport.pipeline import build
from tests.faults.harness import ARTIFACT, PLAN, Reference, write_config


@pytest.fixture(scope="package")
def reference(tiny_model_dir, tmp_path_factory) -> Reference:
    """One uninterrupted build of the fault config (in this process: a child process builds the
    same bytes, which the faulted builds' comparisons with it check every time)."""
    work = tmp_path_factory.mktemp("reference")
    model_dir = tiny_model_dir("llama")
    artifact = build(load_config(write_config(work, model_dir)), work)
    manifest = json.loads((artifact / "manifest.json").read_text())
    plan = json.loads((work / PLAN / "plan.json").read_text())
    return Reference(
        work=work,
        model_dir=model_dir,
        stage_seconds=manifest["not_reproducible"]["stage_seconds"],
        passes=len(manifest["passes"]),
        blocks=len(plan["blocks"]),
        plan_bytes={p.name: p.stat().st_size for p in (work / PLAN).iterdir()},
        artifact_bytes={p.name: p.stat().st_size for p in (work / ARTIFACT).iterdir()},
    )


@pytest.fixture
def work(reference, tmp_path):
    """A fresh work directory beside the reference's, with the same ``model.yaml``."""
    write_config(tmp_path, reference.model_dir)
    return tmp_path
