"""A second calibration into a plan directory that one is calibrating is refused by its lock,
and the running one is not disturbed; ``aqexport calibrate``'s ``report.json`` holds no
absolute path (issue 16, faults and the plan's portability)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from aqexport.calibration_run import run_calibration
from aqexport.config import load_config
from aqexport.errors import ConfigError
from tests.faults.harness import PLAN, differences, start_cli
from tests.tiny_models import data_file


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_a_second_calibration_into_a_busy_plan_dir_is_refused(reference, work):
    config = work / "model.yaml"
    raw = yaml.safe_load(config.read_text())  # with a perplexity, so the report names a text
    raw["evaluation"].update({"text": str(data_file("test")), "seqlen": 48, "max_windows": 2})
    config.write_text(yaml.safe_dump(raw, sort_keys=False))

    first = start_cli(work, "calibrate", "model.yaml", fault="calibrate.block@1:stop")
    _, status = os.waitpid(first.pid, os.WUNTRACED)  # stopped holding the lock, block 0 written
    if not os.WIFSTOPPED(status):
        pytest.fail(f"the first calibration did not reach block 1: {first.stderr.read()}")
    try:
        with pytest.raises(ConfigError) as refused:  # what `aqexport calibrate` and a build call
            run_calibration(load_config(config), work)
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr

    message = str(refused.value)
    assert f"plan_dir '{work / PLAN}' is being calibrated by pid {first.pid}" in message
    assert "set calibration.plan_dir to another directory" in message and "\n" not in message
    assert refused.value.exit_code == 2
    # the first calibration went on undisturbed: its plan is the uninterrupted build's
    assert [d for d in differences(reference.work, work, (PLAN,)) if not d.startswith(f"{PLAN}/report.json")] == []
    assert not (work / f".{PLAN}.lock").exists()

    report = json.loads((work / PLAN / "report.json").read_text())
    assert report["plan_dir"] == "."
    text = report["evaluation"]["text"]  # relative to the plan dir (config paths are resolved: symlinks too)
    assert not Path(text).is_absolute() and (work / PLAN / text).resolve() == data_file("test").resolve()
    assert not [s for s in _strings(report) if Path(s).is_absolute()]
