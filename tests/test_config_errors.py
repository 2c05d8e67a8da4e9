"""Bad input gets one clear line naming the key and the fix, exit status 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from aqexport.cli import main
from aqexport.config import load_config
from aqexport.errors import ConfigError
from tests.conftest import write_config
from tests.tiny_models import data_file


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"model": {"sourc": "default"}, "output": {"dir": "out"}}, "unknown key 'model.sourc'"),
        ({"model": {"source": "default"}}, "missing key 'output'"),
        ({"evaluation": {"seqlen": "long"}, "output": {"dir": "out"}}, "bad value for 'evaluation.seqlen'"),
        ({"quantization": {"recipe": "gptq"}, "output": {"dir": "out"}}, "quantization.recipe"),
        ({"target": {"opset": 17}, "output": {"dir": "out"}}, "target.opset"),
        ({"evaluation": {"text": "nope.txt"}, "output": {"dir": "out"}}, "evaluation.text: file"),
        ({"target": {"profile": "mobile", "max_context": 32}, "output": {"dir": "out"}}, "target.max_context 32"),
        ({"target": {"profile": "npu", "max_context": 32}, "output": {"dir": "out"}}, "target.max_context 32"),
        (
            {
                "quantization": {"recipe": "rtn", "preset": "w4a16", "embedding": "int4"},
                "calibration": {"data": str(data_file("valid"))},
                "target": {"profile": "npu"},
                "output": {"dir": "out"},
            },
            "com.microsoft op no NPU EP runs",
        ),
        # what only the static graph took, on the mobile (CPU EP) profile: the fix names profile npu
        ({"target": {"profile": "mobile", "weight_format": "qdq8"}, "output": {"dir": "out"}}, "profile: npu"),
        ({"target": {"profile": "mobile", "providers": ["nnapi"]}, "output": {"dir": "out"}}, "profile: npu"),
        (
            {"target": {"profile": "mobile", "npu": "qnn"}, "output": {"dir": "out"}},
            "target.npu applies to profile npu",
        ),
        ({"target": {"max_context": 1024}, "output": {"dir": "out"}}, "target.max_context applies"),
        ({"target": {"profile": "npu", "npu": "hexagon"}, "output": {"dir": "out"}}, "target.npu"),
        (
            {"target": {"profile": "npu", "max_context": 1024, "prefill_tokens": 2048}, "output": {"dir": "out"}},
            "set target.prefill_tokens to at most 1024",
        ),
        (
            {"target": {"profile": "cpu", "prefill_tokens": 64}, "output": {"dir": "out"}},
            "target.prefill_tokens applies to profile npu",
        ),
        (
            {"target": {"profile": "npu", "kv_cache": "shared_buffer"}, "output": {"dir": "out"}},
            "the npu profile does not build",
        ),
        ({"target": {"formats": ["onnx", "ort"], "weight_format": "qdq"}, "output": {"dir": "out"}}, "qdq8"),
        (
            {"quantization": {"recipe": "rtn", "preset": "w4a16", "outlier_split": "static"}, "output": {"dir": "out"}},
            "missing key 'calibration.data'",
        ),
        ({"quantization": {"recipe": "affinequant"}, "output": {"dir": "out"}}, "missing key 'quantization.preset'"),
        (
            {"target": {"kv_cache": "shared_buffer", "fuse": False}, "output": {"dir": "out"}},
            "target.kv_cache shared_buffer",
        ),
        ({"target": {"kv_cache": "in_place"}, "output": {"dir": "out"}}, "target.kv_cache"),
        (
            {
                "quantization": {"recipe": "rtn", "preset": "w4a16", "embedding": "tied"},
                "calibration": {"data": str(data_file("valid"))},
                "output": {"dir": "out"},
            },
            "but lm_head is float",
        ),
        (
            {
                "quantization": {"recipe": "rtn", "preset": "w4a16", "lm_head": "int4", "embedding": "tied"},
                "calibration": {"data": str(data_file("valid"))},
                "target": {"weight_format": "qdq"},
                "output": {"dir": "out"},
            },
            "weight_format qdq stores none",
        ),
    ],
)
def test_config_errors_are_one_line_with_fix(tmp_path, capsys, sections, expected):
    config = write_config(tmp_path, **sections)
    code, err = run_cli(["build", str(config)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0] and "fix:" in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(["build", str(tmp_path / "absent.yaml")], capsys)
    assert code == 2 and "not found" in err


def test_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "model.yaml"
    bad.write_text("model: [unclosed\n")
    code, err = run_cli(["build", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err


def test_relative_paths_resolve_against_the_config(tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_text("hello")
    config = write_config(tmp_path, evaluation={"text": "data.txt"}, output={"dir": "out"})
    monkeypatch.chdir("/")
    loaded = load_config(config)
    assert loaded.evaluation.text == tmp_path / "data.txt"
    assert loaded.output.dir == tmp_path / "out"


def test_config_hash_ignores_formatting(tmp_path):
    a = write_config(tmp_path, output={"dir": "out"})
    other = tmp_path / "other"
    other.mkdir()
    b = other / "model.yaml"
    b.write_text(f"# a comment\noutput:\n  dir: {tmp_path / 'out'}\n")
    assert load_config(a).sha256() == load_config(b).sha256()


def test_cli_reports_missing_artifact(tmp_path, capsys):
    code, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert code == 1 and "no model.onnx" in err and "fix:" in err


def test_config_error_type():
    with pytest.raises(ConfigError):
        load_config(Path("/definitely/not/here.yaml"))


@pytest.mark.parametrize(
    "example", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_examples_validate(example):
    config = load_config(example)
    assert config.output.dir.is_absolute()
