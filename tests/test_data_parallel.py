"""Calibration shared among torchrun ranks (``aqexport.calibrate.data_parallel``): two gloo
ranks on this machine make the plan one process makes, and the commands that must not run
once per rank say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aqexport.calibrate.data_parallel import from_environment
from aqexport.calibrate.plan import QuantPlan
from aqexport.config import load_config
from aqexport.errors import ConfigError
from tests.conftest import tiny_build_config
from tests.tiny_models import data_file

AQEXPORT = str(Path(sys.executable).parent / "aqexport")
#: What "the same plan" means across rank counts: the step's mean gradient is summed in another
#: order, so float tensors may differ in their last bits, never by more than this.
TOLERANCE = 1e-6


def _config(tmp_path: Path, model_dir: Path, name: str, stream: str = "never") -> Path:
    work = tmp_path / name
    work.mkdir()
    return tiny_build_config(
        work,
        model_dir,
        build={"stream": stream},
        quantization={"recipe": "affinequant", "preset": "w4a16g128"},
        calibration={
            "data": str(data_file("valid")),
            "samples": 8,
            "seqlen": 32,
            "epochs": 2,
            "windows_per_step": 4,
        },
    )


def _run(command: list[str], cwd: Path) -> None:
    # One thread per process, as torchrun gives each rank, so both runs compute alike.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def _plan(config: Path) -> QuantPlan:
    plan_dir = config.parent / "artifact.plan"
    saved = json.loads((plan_dir / "plan.json").read_text())
    return QuantPlan.open(plan_dir, saved["recipe"], saved["model"])


def test_two_gloo_ranks_make_the_plan_one_process_makes(tiny_model_dir, tmp_path):
    """The ranks also stream the model (``build.stream: always``: one block each), the single
    process holds it whole: the plan must not tell."""
    model_dir = tiny_model_dir("llama")
    single, shared = _config(tmp_path, model_dir, "single"), _config(tmp_path, model_dir, "shared", "always")
    _run([AQEXPORT, "calibrate", str(single)], single.parent)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run([*torchrun, "--no-python", AQEXPORT, "calibrate", str(shared)], shared.parent)

    one, two = _plan(single), _plan(shared)
    assert one.recipe["windows_per_step"] == 4 and one.recipe == two.recipe
    assert sorted(one.blocks) == sorted(two.blocks) == [0, 1]
    for index in one.blocks:
        expected, got = one.blocks[index].tensors(), two.blocks[index].tensors()
        assert expected.keys() == got.keys()
        for key, tensor in expected.items():
            if tensor.is_floating_point():
                gap = float((tensor.double() - got[key].double()).abs().max()) if tensor.numel() else 0.0
                assert gap <= TOLERANCE, (index, key, gap)
            else:  # the integer codes: identical
                assert torch.equal(tensor, got[key]), (index, key)
    report = json.loads((shared.parent / "artifact.plan" / "report.json").read_text())
    assert report["ranks"] == 2 and report["evaluation"]["fake_quant_perplexity"] > 0
    assert sorted(p.name for p in shared.parent.glob("*") if p.name != "model.yaml") == ["artifact.plan"]


def test_fewer_windows_per_step_than_ranks_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="windows_per_step is 2 but 4 ranks") as refused:
        from_environment(2)
    assert "set calibration.windows_per_step to 4" in str(refused.value)


def test_build_under_torchrun_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    from aqexport.pipeline import build

    config = tiny_build_config(tmp_path, tiny_model_dir("llama"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="aqexport build runs in one process") as refused:
        build(load_config(config), tmp_path)
    assert "aqexport calibrate CONFIG" in str(refused.value)
    assert not (tmp_path / "artifact").exists()
