"""``aqexport bench``: the IO-bound decode loop decodes what ``generate`` decodes, and the
report has every figure the issue asks for (no timing thresholds: figures live in BENCHMARKS.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from aqexport.cli import cli
from aqexport.runtime import OnnxDecoder, create_session, generate
from aqexport.runtime.bench import bench_session


@pytest.mark.parametrize("kind", ["llama", "gemma3_text"])  # gemma3: sliding window inside the context
def test_bound_decode_equals_generate(tiny_artifact, kind):
    session, _ = create_session(tiny_artifact(kind))
    result = bench_session(
        session, (8,), decode_tokens=12, decode_context=20, repeats=1, warmup=0, seed=3, vocab_size=100
    )
    context = np.random.default_rng(3)
    context.integers(0, 100, 8, dtype=np.int64)  # the prefill run's tokens come first
    prompt = context.integers(0, 100, 20, dtype=np.int64).tolist()
    expected = generate(OnnxDecoder(session), prompt, 13).new_tokens
    assert result.decoded_token_ids == expected


def test_bench_cli_json_has_every_figure(tiny_artifact):
    args = ["bench", str(tiny_artifact("llama")), "--prefill", "16,32", "--decode-tokens", "4", "--repeats", "2"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["prefill_tokens_per_second"]) == {"16", "32"}
    for spread in [*data["prefill_tokens_per_second"].values(), data["decode_tokens_per_second"]]:
        assert spread["runs"] == 2 and 0 < spread["min"] <= spread["median"] <= spread["max"]
    assert data["time_to_first_token_ms"]["median"] > 0 and data["peak_rss_mib"] >= data["rss_before_session_mib"] > 0
    assert data["providers"] == ["CPUExecutionProvider"]


def test_bench_cli_rejects_bad_lengths(tiny_artifact):
    result = CliRunner().invoke(cli, ["bench", str(tiny_artifact("llama")), "--prefill", "16,x"])
    assert result.exit_code == 2 and "comma-separated" in result.output
