"""The captured graph traced from a weightless skeleton, its weights read from the checkpoint
(``aqexport.capture_weights``): the same graph, byte for byte, as from the loaded model."""

from __future__ import annotations

import filecmp
import json
import logging
import struct
from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from torch._subclasses.fake_tensor import is_fake
from transformers import AutoModelForCausalLM

from aqexport.capture import cache_layout, export_onnx, untie_lm_head
from aqexport.capture_weights import CheckpointWeights, skeleton_model
from aqexport.config import load_config
from aqexport.pipeline import build
from aqexport.source_tensors import safetensors_header
from tests.conftest import ARCHITECTURES, tiny_build_config
from tests.tiny_models import data_file, make_tiny_model


def _load(folder: Path) -> tuple[torch.nn.Module, bool]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, untie_lm_head(model)


def _saved(model: ir.Model, folder: Path) -> Path:
    folder.mkdir()
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    return folder


def _same_files(a: Path, b: Path) -> None:
    for name in ("model.onnx", "model.onnx.data"):
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize("kind", [k for k in ARCHITECTURES if k != "qwen2"])  # qwen2: the bfloat16 test
def test_checkpoint_weights_give_the_same_graph_bytes(kind, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(kind)
    model, tied = _load(folder)
    layout = cache_layout(model)
    from_memory, _ = export_onnx(model, layout)
    skeleton = skeleton_model(type(model), model.config, torch.float32)  # the untied config, as the build's
    assert all(is_fake(p) for p in skeleton.parameters())  # shapes and dtypes, no storage
    assert cache_layout(skeleton) == layout
    weights = CheckpointWeights.for_model(folder, skeleton, tied)
    assert weights is not None
    from_file, _ = export_onnx(skeleton, layout, weights=weights)
    lazy = [v.name for v in from_file.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
    # every linear (q_proj/fc1/...), the embedding, the norms and the LM head: nothing held in memory
    assert len(lazy) >= 2 + 7 * layout.num_layers - (3 if kind == "opt" else 0), lazy
    _same_files(_saved(from_memory, tmp_path / "memory"), _saved(from_file, tmp_path / "file"))


def test_a_bfloat16_checkpoint_is_cast_as_from_pretrained_casts_it(tmp_path):
    folder = make_tiny_model("qwen2", tmp_path / "model")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    model, tied = _load(folder)
    assert {entry["dtype"] for entry in safetensors_header(folder / "model.safetensors")[0].values()} == {"BF16"}
    layout = cache_layout(model)
    from_memory, _ = export_onnx(model, layout)
    from_file, _ = export_onnx(model, layout, weights=CheckpointWeights.for_model(folder, model, tied))
    _same_files(_saved(from_memory, tmp_path / "memory"), _saved(from_file, tmp_path / "file"))


def _rename_tensor(file: Path, old: str, new: str) -> None:
    """Rename one tensor in a safetensors header (data offsets count from the header's end)."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header[new] = header.pop(old)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def test_a_checkpoint_that_does_not_hold_a_parameter_is_not_used(tmp_path):
    folder = make_tiny_model("llama", tmp_path / "model")
    model, tied = _load(folder)
    _rename_tensor(folder / "model.safetensors", "model.norm.weight", "model.nurm.weight")
    assert CheckpointWeights.for_model(folder, model, tied) is None


def test_a_build_from_safetensors_equals_the_build_from_the_same_weights_in_memory(tmp_path, caplog):
    """The pipeline takes the checkpoint path for safetensors and the loaded model's weights for a
    ``pytorch_model.bin`` of the same model: the artifacts' graphs and weights are the same bytes."""
    safetensors = make_tiny_model("llama", tmp_path / "safetensors")
    pickled = tmp_path / "bin"
    pickled.mkdir()
    for file in safetensors.iterdir():  # config, tokenizer: everything but the weights
        if file.suffix != ".safetensors":
            (pickled / file.name).write_bytes(file.read_bytes())
    model = AutoModelForCausalLM.from_pretrained(safetensors)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    artifacts = []
    caplog.set_level(logging.INFO, logger="aqexport.pipeline")
    for source in (safetensors, pickled):
        work = tmp_path / f"build-{source.name}"
        work.mkdir()
        config = tiny_build_config(
            work,
            source,
            quantization={"recipe": "rtn", "preset": "w4a16g32"},
            calibration={"data": str(data_file("valid")), "samples": 2, "seqlen": 32},
        )
        artifacts.append(build(load_config(config), work))
        from_checkpoint = [r for r in caplog.records if "the graph reading its weights from" in r.getMessage()]
        assert len(from_checkpoint) == 1, source  # the safetensors build only
    _same_files(*artifacts)
