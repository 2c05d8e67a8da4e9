"""The packaged SmolLM2-135M-Instruct end to end: build -> parity -> eval -> run -> onnxruntime-genai.

One real model through the whole path, once: the shipped default's recipe and edges
(affinequant w4a16g128, int8 LM head, tied embedding) on a small calibration budget. Its parity
ladder checks the exported float graph against Hugging Face eager (and the folded one) before
any rounding; verification checks the artifact against the fake-quant model of its plan; eval,
chat and onnxruntime-genai run the artifact. The float build's 64-greedy-token and perplexity
parity is tested on the tiny models; the full 40-window figures live in ``benchmarks/``
(BENCHMARKS.md). One build, not a float one beside it, keeps CI's real-model time to one export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from aqexport.cli import cli
from aqexport.config import ModelSpec
from aqexport.errors import ConfigError
from aqexport.memory_budget import source_parameters
from aqexport.sources import resolve_source
from tests.conftest import read_report, write_config
from tests.genai_support import genai_greedy
from tests.tiny_models import data_file

pytestmark = pytest.mark.slow


def _default_gguf():
    try:
        source = resolve_source(ModelSpec(source="default"))
    except ConfigError as exc:
        pytest.fail(f"the packaged default model must be installed for this test: {exc}")
    return Path(source.location), source.gguf_file


@pytest.fixture(scope="module")
def smollm2_int4_artifact(tmp_path_factory):
    """affinequant w4a16g128 with the shipped default's edges (int8 LM head, the embedding reading
    its table), and a deliberately small calibration (CI time): the lowering is the same whatever
    the calibration budget; quality figures live in BENCHMARKS.md."""
    _default_gguf()
    work = tmp_path_factory.mktemp("smollm2-int4")
    config = write_config(
        work,
        model={"source": "default"},
        quantization={"recipe": "affinequant", "preset": "w4a16g128", "lm_head": "int8", "embedding": "tied"},
        calibration={"data": str(data_file("valid")), "samples": 2, "seqlen": 64, "epochs": 2},
        evaluation={"text": str(data_file("test")), "seqlen": 512, "max_windows": 4, "generate_tokens": 32},
        output={"dir": str(work / "artifact")},
    )
    result = CliRunner().invoke(cli, ["build", str(config)])
    assert result.exit_code == 0, result.output
    return work / "artifact"


def test_smollm2_int4_artifact_runs_the_plan(smollm2_int4_artifact):
    report = read_report(smollm2_int4_artifact)
    verification = report["verification"]
    # ONNX Runtime against the PyTorch fake-quant model of the same plan. The int8 LM head runs
    # MatMulNBits at accuracy_level 4 (the default for 8-bit weights, the only fast CPU kernel),
    # and the int4 linears at the level the build measured (aqexport.accuracy_level): 4 rounds
    # their inputs to int8 per block, so the bound is the tolerance, 1 %, not float equality.
    choice = verification["accuracy_level"]
    integer = report["quantization"]["integer_activation_linears"]
    assert integer == ["lm_head"] if choice["chosen"] == 0 else len(integer) == 30 * 7 + 1
    assert choice["measured"] and choice["trials"][0]["level"] == 4
    assert verification["perplexity"]["relative_difference"] <= 1e-2
    assert verification["logits_parity"]["prefill"]["top1_agreement"] >= 0.95
    # The ragged last group (576 = 4.5 × 128) is lowered, and the artifact shrinks.
    manifest = json.loads((smollm2_int4_artifact / "manifest.json").read_text())
    roles = [info.get("role") for info in manifest["quantization"]["linears"].values()]
    assert roles.count(None) == 30 * 7 and roles.count("lm_head") == roles.count("embedding") == 1
    assert manifest["quantization"]["linears"]["model.embed_tokens"]["reads"] == "lm_head"
    # One int8 table for the LM head and the embedding (SmolLM2 ties them): 92.6 MiB of 513 MiB fp32
    fp32_bytes = 4 * source_parameters(*_default_gguf())[0]
    assert report["model_bytes"] <= 0.20 * fp32_bytes
    assert report["calibration"]["min_dominance_margin"] > 0
    # The float rungs: the exported graph against Hugging Face eager, and with the transforms
    # folded in (before rounding): the real model's export and folding are exact.
    ladder = report["parity_ladder"]
    assert ladder["folded_fp_vs_eager"]["max_rel"] <= 1e-4 and ladder["exported_fp_vs_eager"]["max_rel"] <= 1e-4
    assert ladder["exported_fp_vs_eager"]["top1_agreement"] == 1.0
    assert report["untied_lm_head"] is True
    assert report["memory"]["budget"]["mib"] > 0
    # onnxruntime-genai runs the quantized artifact unchanged and decodes what our runtime decodes.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_int4_artifact)
    prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    theirs = genai_greedy(smollm2_int4_artifact, prompt, 32)
    assert theirs and verification["greedy"]["token_ids"][: len(theirs)] == theirs


def test_smollm2_eval_cli_matches_report(smollm2_int4_artifact):
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            str(smollm2_int4_artifact),
            "--text",
            str(data_file("test")),
            "--seqlen",
            "512",
            "--max-windows",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    expected = read_report(smollm2_int4_artifact)["verification"]["perplexity"]["onnx"]["perplexity"]
    assert json.loads(result.stdout)["perplexity"] == pytest.approx(expected, rel=1e-9)


def test_smollm2_chat_answers(smollm2_int4_artifact):
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(smollm2_int4_artifact),
            "--prompt",
            "What is the capital of France?",
            "--chat",
            "--max-new-tokens",
            "24",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in json.loads(result.stdout)["text"]
