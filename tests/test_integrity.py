"""Artifacts are checked against their manifest before they run; finished ones are world-readable."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from aqexport.artifact import atomic_directory, current_umask
from aqexport.cli import main
from aqexport.config import load_config
from aqexport.errors import ConfigError
from aqexport.integrity import check_artifact, is_loaded_by_runtime, verify_artifact
from aqexport.pipeline import build
from tests.conftest import tiny_build_config
from tests.tiny_models import data_file


@pytest.fixture
def copy(tiny_artifact, tmp_path):
    """A private copy of the session's tiny llama artifact, free to tamper with."""
    target = tmp_path / "artifact"
    shutil.copytree(tiny_artifact("llama"), target)
    return target


def _flip_byte(path):
    """Flip the lowest bit of one byte near the end: the weights' last value barely moves, so
    the model still loads and runs, but the sha256 is another."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))


def _cli(capsys, *args):
    """Run ``aqexport`` as the console script does: (exit status, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def _run_args(artifact):
    return ["run", str(artifact), "--prompt", "The history", "--max-new-tokens", "2", "--json"]


def _eval_args(artifact):
    return ["eval", str(artifact), "--text", str(data_file("test")), "--seqlen", "48", "--max-windows", "1", "--json"]


def test_intact_artifact_verifies(tiny_artifact, capsys):
    artifact = tiny_artifact("llama")
    report = verify_artifact(artifact)
    listed = json.loads((artifact / "manifest.json").read_text())["files"]
    assert report.ok and report.status == "intact" and report.intact == sorted(listed)
    assert report.bytes_hashed == sum(entry["bytes"] for entry in listed.values())
    code, out, _ = _cli(capsys, "verify", str(artifact))
    assert code == 0 and "matches its manifest" in out
    code, out, _ = _cli(capsys, "verify", str(artifact), "--json")
    assert code == 0 and json.loads(out)["status"] == "intact"


def test_flipped_byte_fails_verify_naming_the_file(copy, capsys):
    _flip_byte(copy / "model.onnx.data")
    report = verify_artifact(copy)
    assert not report.ok and [change.path for change in report.changed] == ["model.onnx.data"]
    assert report.changed[0].actual_sha256 is not None  # same size: found by its hash
    code, _, err = _cli(capsys, "verify", str(copy))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "fails its manifest: model.onnx.data changed (sha256" in err and "--no-verify" in err
    code, out, _ = _cli(capsys, "verify", str(copy), "--json")
    assert code == 2 and json.loads(out)["changed"][0]["path"] == "model.onnx.data"


def test_deleted_and_truncated_files_are_named_in_one_error(copy):
    (copy / "tokenizer.json").unlink()
    with (copy / "model.onnx").open("r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ConfigError) as error:
        check_artifact(copy)
    assert error.value.exit_code == 2
    assert "tokenizer.json missing" in error.value.cause
    assert "model.onnx changed (100 bytes, manifest" in error.value.cause
    assert "rebuild it, or copy it again" in error.value.fix


def test_unlisted_files_fail_only_when_the_runtime_loads_them(copy):
    (copy / "NOTES.txt").write_text("deployed by hand\n")
    report = check_artifact(copy)
    assert report.ok and report.extra == ["NOTES.txt"] and "NOTES.txt" in report.summary()
    shutil.copy(copy / "model.onnx", copy / "model_other.onnx")
    with pytest.raises(ConfigError, match="model_other.onnx not in the manifest"):
        check_artifact(copy)
    assert is_loaded_by_runtime("tokenizer_config.json") and is_loaded_by_runtime("sub/model.ort")
    assert not is_loaded_by_runtime("README.md") and not is_loaded_by_runtime("report.json")


def test_a_manifest_pointing_outside_the_artifact_fails(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../model.yaml"] = {"sha256": "0" * 64, "bytes": 1}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="a path outside the artifact"):
        check_artifact(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="manifest.json unreadable"):
        check_artifact(copy)


@pytest.mark.parametrize("command", [_run_args, _eval_args], ids=["run", "eval"])
def test_run_and_eval_refuse_a_tampered_artifact_unless_no_verify(copy, capsys, command):
    _flip_byte(copy / "model.onnx.data")
    code, out, err = _cli(capsys, *command(copy))
    assert code == 2 and out == "" and "model.onnx.data changed" in err
    code, out, err = _cli(capsys, *command(copy), "--no-verify")
    assert code == 0, err
    assert json.loads(out)["providers"] == ["CPUExecutionProvider"]


def test_an_artifact_without_manifest_runs_with_a_note(copy, capsys):
    (copy / "manifest.json").unlink()
    report = verify_artifact(copy)
    assert report.ok and not report.has_manifest and report.status == "no manifest"
    code, _, err = _cli(capsys, "verify", str(copy))
    assert code == 0 and "no manifest.json" in err
    code, out, err = _cli(capsys, *_run_args(copy))
    assert code == 0 and "no manifest.json; its files were not verified" in err
    assert len(json.loads(out)["tokens"]) >= 1


@pytest.fixture
def umask():
    """Set the process umask for one test; restore it after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def test_built_artifact_is_readable_by_others_under_umask_022(umask, tiny_model_dir, tmp_path):
    umask(0o022)
    assert current_umask() == 0o022
    config = load_config(
        tiny_build_config(tmp_path, tiny_model_dir("llama"), evaluation={"text": None, "generate_tokens": 0})
    )
    artifact = build(config, tmp_path)
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o755
    assert stat.S_IMODE((artifact / "model.onnx").stat().st_mode) == 0o644
    assert check_artifact(artifact).ok


def test_atomic_directory_follows_a_stricter_umask(umask, tmp_path):
    umask(0o027)
    assert current_umask() == 0o027
    with atomic_directory(tmp_path / "out") as staging:
        assert stat.S_IMODE(staging.stat().st_mode) == 0o700  # private while it is written
        (staging / "file").write_text("x")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "file").stat().st_mode) == 0o640
