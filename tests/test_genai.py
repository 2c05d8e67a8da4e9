"""Artifacts run unchanged under onnxruntime-genai and decode the same greedy tokens as ours."""

from __future__ import annotations

import json

import pytest

from aqexport.runtime import OnnxDecoder, create_session, generate
from tests.conftest import ARCHITECTURES
from tests.genai_support import genai_greedy

pytestmark = pytest.mark.genai


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_genai_greedy_matches_our_runtime(tiny_artifact, kind):
    artifact = tiny_artifact(kind)
    prompt = [11, 42, 97, 150, 33]
    theirs = genai_greedy(artifact, prompt, 16)
    eos = json.loads((artifact / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
    session, _ = create_session(artifact)
    ours = generate(OnnxDecoder(session), prompt, 16, eos_token_ids=eos_ids).new_tokens
    assert theirs, "genai produced no tokens"
    assert theirs == ours
