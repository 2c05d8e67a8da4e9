"""Block-streamed builds (``build.stream``, ``aqexport.streamed_model``): the model holds one
decoder block's weights at a time, and the artifact is the one a build holding the whole model
writes, byte for byte."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from aqexport.calibrate import residency
from aqexport.calibrate.input_hooks import InputState, input_state, install_input_hooks
from aqexport.calibrate.residency import FileTensors, resident
from aqexport.config import load_config
from aqexport.errors import AqexportError, ConfigError
from aqexport.memory_budget import streamed_parameters
from aqexport.pipeline import build
from aqexport.reference import torch_greedy, torch_teacher_forced
from aqexport.stream_choice import STREAM_SHARE, choose_streaming
from aqexport.streamed_model import edges_released, streamed_model
from tests.conftest import ARCHITECTURES, tiny_build_config
from tests.tiny_models import data_file

#: every file of an artifact that is not a measurement (report.json, report.html: timings,
#: memory; manifest.json: the config, which says build.stream)
_SAME = ("model.onnx", "model.onnx.data", "genai_config.json", "config.json", "tokenizer.json")


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_a_streamed_model_computes_the_loaded_models_logits(kind, tiny_model_dir):
    folder = tiny_model_dir(kind)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    streamed = streamed_model(type(loaded), loaded.config, folder, torch.float32)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, streamed(ids).logits)
    blocks = [m for m in streamed.modules() if hasattr(m, "_hf_hook")]
    assert len(blocks) == loaded.config.num_hidden_layers
    # between forwards a block holds nothing; resident() lends it its weights
    assert all(p.device.type == "meta" for block in blocks for p in block.parameters())
    with resident(blocks[0]):
        assert all(p.device.type == "cpu" for p in blocks[0].parameters())
    assert all(p.device.type == "meta" for p in blocks[0].parameters())


def test_a_streamed_blocks_inverses_wait_on_disk_between_forwards(tiny_model_dir, monkeypatch):
    """A fake-quant streamed block keeps its transforms' inverses in files once released (held, a
    7B model's 32 blocks kept 4 GiB of them); its forward reads them back: the same logits."""
    monkeypatch.setattr(residency, "SPILL_BYTES", 0)  # a tiny block's are below the size that spills
    folder = tiny_model_dir("llama")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    streamed = streamed_model(type(loaded), loaded.config, folder, torch.float32)
    block = streamed.model.layers[0]
    size = loaded.config.hidden_size
    inverse = torch.eye(size) + 0.05 * torch.randn(size, size, generator=torch.Generator().manual_seed(1))
    mlp = SimpleNamespace(linears=("mlp.gate_proj", "mlp.up_proj"), group_of=lambda _: SimpleNamespace(norm="mlp"))
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with resident(block):
            install_input_hooks(block, mlp, InputState(inverses={"mlp": inverse}))
            held = streamed(ids).logits
        assert isinstance(input_state(block).inverses, FileTensors)
        assert torch.equal(streamed(ids).logits, held)
        assert not torch.allclose(held, loaded(ids).logits)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # tied, untied
def test_released_edges_come_back_as_they_were(kind, tiny_model_dir):
    """Verification spills the edges while ONNX Runtime runs: they hold no storage meanwhile,
    and come back with the values they had (fake-quant ones, not the checkpoint's) and ties."""
    folder = tiny_model_dir(kind)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    streamed = streamed_model(type(loaded), loaded.config, folder, torch.float32)
    head = streamed.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(0.5)  # as quantize_lm_head rewrites it in place
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = streamed(ids).logits
    tied = head.weight is streamed.get_input_embeddings().weight
    with edges_released(streamed):
        assert all(p.numel() == 0 for p in streamed.parameters() if p.device.type != "meta")
    assert (head.weight is streamed.get_input_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, before)


def test_a_checkpoint_without_the_models_names_is_refused_with_the_fix(tmp_path, tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(AqexportError, match="holds no safetensors"):
        streamed_model(type(loaded), loaded.config, tmp_path, torch.float32)


def _config(work: Path, model: Path, stream: str, quantization: dict) -> Path:
    return tiny_build_config(
        work,
        model,
        quantization=quantization,
        calibration={"data": str(data_file("valid")), "samples": 2, "seqlen": 32, "epochs": 2},
        build={"stream": stream},
    )


@pytest.mark.parametrize(
    "kind, quantization",
    [
        ("llama", {"recipe": "rtn", "preset": "w4a16g32", "lm_head": "int8", "embedding": "tied"}),
        ("qwen2", {"recipe": "affinequant", "preset": "w4a16g32", "rounding": "gptq"}),
    ],
)
def test_a_streamed_build_writes_the_same_artifact(kind, quantization, tiny_model_dir, tmp_path):
    artifacts = {}
    for stream in ("never", "always"):
        work = tmp_path / stream
        work.mkdir()
        artifacts[stream] = build(load_config(_config(work, tiny_model_dir(kind), stream, quantization)), work)
    for name in _SAME:
        assert filecmp.cmp(artifacts["never"] / name, artifacts["always"] / name, shallow=False), name
    never, always = (json.loads((artifacts[s] / "report.json").read_text()) for s in ("never", "always"))
    assert always["memory"]["streamed"] == {"streamed": True, "why": "build.stream: always"}
    assert never["memory"]["streamed"]["streamed"] is False
    # the same verification: the streamed fake-quant model is the same reference
    for side in ("onnx", "pytorch"):
        figures = [r["verification"]["perplexity"][side]["perplexity"] for r in (always, never)]
        assert figures[0] == figures[1], side
    # the folded rung and the per-linear errors: the streamed build reads its float blocks from
    # the checkpoint, one at a time, and finds what the build holding a copy of them finds
    assert always["parity_ladder"] == never["parity_ladder"]
    assert always["parity_ladder"]["folded_fp_vs_exported_fp"]["max_rel"] <= 1e-5
    errors = [r["calibration"]["linear_errors"]["linears"] for r in (always, never)]
    assert errors[0] == errors[1] and len(errors[0]) > 0
    # greedy: generate() in PyTorch for the loaded model, one teacher-forced forward for the streamed one
    greedy = [r["verification"]["greedy"] for r in (always, never)]
    assert greedy[0]["token_ids"] == greedy[1]["token_ids"]
    assert greedy[0]["identical_to_pytorch"] == greedy[1]["identical_to_pytorch"]
    assert greedy[0]["first_divergence"] == greedy[1]["first_divergence"]
    assert greedy[0]["pytorch_reference"].startswith("teacher-forced") and "pytorch_reference" not in greedy[1]


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_teacher_forced_greedy_gives_generates_verdict(kind, tiny_model_dir):
    """One forward over the prompt and a token list says where ``generate`` would first differ."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(kind), dtype=torch.float32).eval()
    prompt = [5, 17, 99, 3, 250]
    theirs = torch_greedy(model, prompt, 12)
    assert torch_teacher_forced(model, prompt, theirs) == theirs
    changed = [*theirs[:7], (theirs[7] + 1) % 300, *theirs[8:]]
    chosen = torch_teacher_forced(model, prompt, changed)
    assert chosen[:7] == theirs[:7] and chosen[7] == theirs[7] != changed[7]


def test_auto_streams_when_the_weights_take_more_than_their_share_of_the_budget(tiny_model_dir):
    folder = tiny_model_dir("llama")
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    below = choose_streaming("auto", "local", folder, None, "float32", f"{int(weights / STREAM_SHARE * 1.2)}B")
    above = choose_streaming("auto", "local", folder, None, "float32", f"{int(weights / STREAM_SHARE * 0.8)}B")
    assert (below.streamed, above.streamed) == (False, True), (below, above)
    # a local GGUF streams whatever its size; a Hub id never does
    assert choose_streaming("auto", "gguf", folder, "model.gguf", "float32", "1000GB").streamed
    assert not choose_streaming("auto", "hub", folder, "model.gguf", "float32", 1.0).streamed


def test_always_on_a_source_that_cannot_stream_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="build.stream: always needs a local safetensors checkpoint or GGUF"):
        choose_streaming("always", "hub", tmp_path, None, "float32", None)


def test_the_pre_check_counts_what_a_streamed_build_holds(tiny_model_dir):
    """All but the blocks, and the largest block: from the headers, as the model counts it."""
    folder = tiny_model_dir("qwen2")
    model = AutoModelForCausalLM.from_pretrained(folder)
    blocks = model.model.layers
    in_blocks = sum(p.numel() for p in blocks.parameters())
    expected = (
        sum(p.numel() for p in model.parameters())
        - in_blocks
        + max(sum(p.numel() for p in block.parameters()) for block in blocks)
    )
    assert streamed_parameters(folder) == expected
