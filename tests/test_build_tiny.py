"""End to end on tiny random models of every supported family: build -> eval -> run."""

from __future__ import annotations

import hashlib
import json
import re

import onnx
import pytest
from click.testing import CliRunner

from aqexport.cli import cli
from tests.conftest import ARCHITECTURES, read_report
from tests.tiny_models import data_file


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_build_matches_pytorch(tiny_artifact, kind):
    artifact = tiny_artifact(kind)
    report = read_report(artifact)["verification"]
    for phase in ("prefill", "decode_step"):
        parity = report["logits_parity"][phase]
        assert parity["max_rel"] <= 1e-4, (phase, parity)
        assert parity["top1_agreement"] == 1.0
    assert report["greedy"]["identical_to_pytorch"] is True, report["greedy"]
    assert report["greedy"]["tokens"] == 12
    ppl = report["perplexity"]
    assert ppl["onnx"]["windows"] == 3 and ppl["onnx"]["seqlen"] == 48
    assert ppl["relative_difference"] <= 1e-4, ppl


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_artifact_contract(tiny_artifact, kind):
    artifact = tiny_artifact(kind)
    for name in (
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "manifest.json",
        "report.json",
        "report.html",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (artifact / name).is_file(), name
    graph = onnx.load(artifact / "model.onnx", load_external_data=False)
    inputs = [i.name for i in graph.graph.input]
    outputs = [o.name for o in graph.graph.output]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    assert graph.opset_import[0].version >= 21
    initializers = {i.name for i in graph.graph.initializer}
    # The LM head is its own initializer even where the checkpoint ties it to the embedding.
    assert "lm_head.weight" in initializers
    assert any(name.endswith("embed_tokens.weight") for name in initializers)
    # Stable names from module paths, not exporter counters.
    assert any(re.match(r"^/model/(decoder/)?layers\.0/", n.name) for n in graph.graph.node)
    projections = [name for name in initializers if re.search(r"layers\.0\..*(q_proj|fc1|up_proj)\.weight$", name)]
    assert projections, sorted(initializers)

    manifest = json.loads((artifact / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((artifact / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert "manifest.json" not in manifest["files"]
    assert manifest["source"]["kind"] == "local" and len(manifest["source"]["sha256"]) == 64
    assert len(manifest["config_sha256"]) == 64
    assert {"torch", "transformers", "onnxruntime"} <= set(manifest["versions"])
    genai = json.loads((artifact / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2
    # the fused graph takes the genai builder's in-place KV contract (tests/test_shared_kv_buffer.py)
    assert genai["search"]["past_present_share_buffer"] is (manifest["kv_cache"]["contract"] == "shared_buffer")


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_cli_eval_matches_build_report(tiny_artifact, kind):
    artifact = tiny_artifact(kind)
    result = CliRunner().invoke(
        cli,
        ["eval", str(artifact), "--text", str(data_file("test")), "--seqlen", "48", "--max-windows", "3", "--json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    expected = read_report(artifact)["verification"]["perplexity"]["onnx"]["perplexity"]
    assert payload["perplexity"] == pytest.approx(expected, rel=1e-9)
    assert payload["providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_cli_run_greedy_matches_build_report(tiny_artifact, kind):
    artifact = tiny_artifact(kind)
    greedy = read_report(artifact)["verification"]["greedy"]
    prompt = read_report(artifact)["verification"]["prompt"]
    # The build's check tokenizes without special tokens; this tokenizer adds none by default.
    result = CliRunner().invoke(cli, ["run", str(artifact), "--prompt", prompt, "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    tokens = payload["tokens"]
    # Same greedy tokens as the build's check, except that `run` stops at EOS.
    assert tokens == greedy["token_ids"][: len(tokens)]
    assert len(tokens) == 12 or tokens[-1] == 2
    sampled = [
        json.loads(
            CliRunner()
            .invoke(cli, ["run", str(artifact), "--prompt", prompt, "--sample", "--seed", "7", "--json"])
            .stdout
        )["tokens"]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1], "sampling with a seed must be reproducible"
    assert greedy["tokens"] == 12


def test_cli_inspect(tiny_artifact):
    result = CliRunner().invoke(cli, ["inspect", str(tiny_artifact("qwen2")), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ops"]["MatMul"] >= 2 * 7
    assert summary["inputs"][0]["name"] == "input_ids"
    assert summary["quantization"]["recipe"] == "none"


def test_cli_run_chat_without_template_is_one_clear_error(tiny_artifact, capsys):
    from aqexport.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tiny_artifact("llama")), "--prompt", "hi", "--chat"])
    assert exit_info.value.code == 1
    assert "no chat template" in capsys.readouterr().err
