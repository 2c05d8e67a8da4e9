"""The build's measured accuracy level (``aqexport.accuracy_level``): level 4 is kept when the
verified perplexity is within tolerance of the fake-quant model's, else the written artifact's
2-4-bit MatMulNBits are rewritten to level 0 and verified again; both branches on a real tiny
int4 artifact (the verification's figures are supplied, the rewrite and the session are real)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from aqexport.accuracy_level import _relevel, choose_accuracy_level, low_bit_matmuls
from aqexport.config import load_config
from aqexport.pipeline import build
from aqexport.runtime import OnnxDecoder, create_session
from tests.conftest import read_report, tiny_build_config
from tests.tiny_models import data_file


@pytest.fixture(scope="module")
def int4_artifact(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("level")
    config = tiny_build_config(
        work,
        tiny_model_dir("llama"),
        quantization={"recipe": "rtn", "preset": "w4a16", "lm_head": "int8"},
        calibration={"data": str(data_file("valid")), "samples": 2, "seqlen": 32},
    )
    return build(load_config(config), work)


def _levels(artifact) -> dict[int, set[int]]:
    """accuracy_level per bit width over the artifact's MatMulNBits."""
    seen: dict[int, set[int]] = {}
    for node in onnx.load(artifact / "model.onnx", load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            seen.setdefault(attrs["bits"], set()).add(attrs.get("accuracy_level", 0))
    return seen


def _verification(onnx_ppl: float, reference: float) -> dict:
    return {"perplexity": {"onnx": {"perplexity": onnx_ppl}, "pytorch": {"perplexity": reference}}}


def test_the_build_records_its_measured_choice(int4_artifact):
    choice = read_report(int4_artifact)["verification"]["accuracy_level"]
    assert choice["measured"] and choice["trials"][0]["level"] == 4
    levels = _levels(int4_artifact)
    assert levels[8] == {4}  # the int8 head: level 4 whatever is chosen
    assert levels[4] == {choice["chosen"]}
    if choice["chosen"] == 4:
        assert choice["cost"] == choice["trials"][0]["vs_fake_quant"] <= choice["tolerance"]
    else:
        assert choice["trials"][0]["vs_fake_quant"] > choice["tolerance"] and choice["trials"][1]["level"] == 0


def test_out_of_tolerance_rewrites_to_level_0_and_verifies_again(int4_artifact, tmp_path):
    staging = tmp_path / "artifact"
    shutil.copytree(int4_artifact, staging)
    _relevel(staging, 4)  # start from the fast level, whatever the build chose
    answers = iter([_verification(10.5, 10.0), _verification(10.01, 10.0)])
    verification, choice = choose_accuracy_level(staging, lambda: next(answers), 0.01, can_measure=True)
    assert choice["chosen"] == 0 and [t["level"] for t in choice["trials"]] == [4, 0]
    assert choice["cost"] == pytest.approx(0.001)
    assert _levels(staging) == {4: {0}, 8: {4}}
    assert low_bit_matmuls(staging / "model.onnx") == 4 * 2  # per layer: packed q/k/v, o, packed gate/up, down
    session, _ = create_session(staging)  # the rewritten artifact still runs
    decoder = OnnxDecoder(session)
    logits, _ = decoder.step(np.array([[5, 6, 7]]), np.ones((1, 3), np.int64), decoder.empty_past(1))
    assert np.isfinite(logits).all()


def test_within_tolerance_keeps_level_4_and_unmeasurable_takes_level_0(int4_artifact, tmp_path):
    staging = tmp_path / "artifact"
    shutil.copytree(int4_artifact, staging)
    _relevel(staging, 4)
    _, kept = choose_accuracy_level(staging, lambda: _verification(10.05, 10.0), 0.01, can_measure=True)
    assert kept["chosen"] == 4 and _levels(staging)[4] == {4}
    _, safe = choose_accuracy_level(staging, lambda: {}, 0.01, can_measure=False)
    assert safe == {**safe, "chosen": 0, "measured": False} and _levels(staging)[4] == {0}
