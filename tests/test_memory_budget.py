"""``build.max_memory`` (``aqexport.memory_budget``): a build that cannot fit is refused before
loading, one that outgrows its budget is stopped with one clear error naming the stage, and
neither leaves an artifact behind."""

from __future__ import annotations

import json
import signal
import struct
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from aqexport import memory_budget
from aqexport.config import load_config
from aqexport.errors import ConfigError
from aqexport.memory_budget import MemoryBudgetError, MemoryGuard, parse_size, resident_bytes, source_parameters
from aqexport.pipeline import build
from tests.conftest import read_report, tiny_build_config

MIB = 2**20


@pytest.mark.parametrize(
    "value, expected",
    [(16, 16 * 2**30), ("16GB", 16 * 2**30), ("16 GiB", 16 * 2**30), ("512MiB", 512 * MIB), ("0.5", 2**29)],
)
def test_sizes_are_read_as_people_write_them(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1", "0GB", 0])
def test_a_size_that_is_not_one_is_refused_with_the_key(tmp_path, tiny_model_dir, value):
    config = tiny_build_config(tmp_path, tiny_model_dir("llama"), build={"max_memory": value})
    with pytest.raises(ConfigError, match="build.max_memory"):
        load_config(config)


def test_parameters_are_counted_from_safetensors_headers(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert source_parameters(folder, None) == (sum(p.numel() for p in model.parameters()), "safetensors headers")


def test_parameters_are_counted_from_gguf_tensor_sizes(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    codes = np.zeros((6, 64 // block * type_size), np.uint8)  # 6 x 64 weights in Q8_0 blocks
    writer.add_tensor("blk.0.attn_q.weight", codes, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert source_parameters(tmp_path, "m.gguf") == (4 * 32 + 6 * 64, "GGUF tensor sizes")


def test_a_model_larger_than_the_budget_is_refused_before_loading(tmp_path, tiny_model_dir, monkeypatch):
    config = tiny_build_config(tmp_path, tiny_model_dir("llama"), build={"max_memory": "1MiB"})
    loaded = []
    monkeypatch.setattr("aqexport.pipeline.load_model", lambda *a, **k: loaded.append(a))
    with pytest.raises(ConfigError) as refused:
        build(load_config(config), tmp_path)
    message = str(refused.value)
    assert "B parameters (safetensors headers)" in message and "the budget is 0.0 GiB (build.max_memory)" in message
    assert "raise build.max_memory" in message
    assert not loaded and not (tmp_path / "artifact").exists()


def _sparse_checkpoint(folder, rows: int, columns: int):
    """A safetensors file of one float32 [rows, columns] tensor whose data is a hole in the file:
    a multi-GB checkpoint's header at no disk cost (the check reads headers only)."""
    folder.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, columns], "data_offsets": [0, rows * columns * 4]}})
    header += " " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header.encode())
        handle.truncate(8 + len(header) + rows * columns * 4)
    return folder


def test_a_4_gib_checkpoint_is_refused_at_once_under_a_2_gib_budget(tmp_path):
    model = _sparse_checkpoint(tmp_path / "big", 2**15, 2**15)
    config = tiny_build_config(tmp_path, model, build={"max_memory": "2GiB"})
    start = time.perf_counter()
    # build.stream auto streams it (4 GiB > 40 % of 2), and streamed it still holds its one unnumbered tensor
    held = r"4\.0 GiB of float32 weights, streamed, a build still holds 4\.0 GiB"
    with pytest.raises(ConfigError, match=r"1\.07 B parameters \(safetensors headers\): " + held):
        build(load_config(config), tmp_path)
    assert time.perf_counter() - start < 60  # refused before hashing or loading 4 GiB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "model.yaml"]


def test_the_report_names_the_budget(tiny_artifact):
    budget = read_report(tiny_artifact("llama"))["memory"]["budget"]
    assert budget["from"] == "90% of this machine's memory" and budget["mib"] > 0


def test_the_guard_stops_the_main_thread_when_memory_passes_the_budget():
    before = signal.getsignal(signal.SIGUSR1)
    held = None  # the guard may stop the thread while it is still filling the tensor
    with pytest.raises(MemoryBudgetError, match="in stage filling, over its budget") as stopped:
        with MemoryGuard(resident_bytes() + 64 * MIB, "a test's budget") as guard:
            guard.stage = "filling"
            held = torch.ones(64 * MIB)  # 256 MiB, every page touched
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.05)
    del held
    assert "a test's budget" in str(stopped.value)
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("after", ["next stage", "exit"])
def test_a_swallowed_budget_error_is_raised_again(after):
    """Library code that catches ``Exception`` (torch's ONNX exporter, registering its ops) can
    swallow the signal's error; the guard raises it again at the next stage or on the way out."""
    swallowed = []
    with pytest.raises(MemoryBudgetError, match="in stage swallowing, over its budget"):
        with MemoryGuard(1, "a test's budget") as guard:
            guard.stage = "swallowing"
            deadline = time.monotonic() + 10
            while not swallowed and time.monotonic() < deadline:
                try:
                    time.sleep(0.05)
                except Exception as error:  # noqa: BLE001 - what the exporter does
                    swallowed.append(error)
            if after == "next stage":
                guard.stage = "after"
    assert len(swallowed) == 1 and isinstance(swallowed[0], MemoryBudgetError)


def test_a_build_that_outgrows_its_budget_is_stopped_and_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    """The guard's wiring in a real build: resident memory reads as over the budget from the
    capture stage on (the real reading is the test above); the guard looks every 0.2 s, so it
    stops whichever stage is running by then."""
    config = tiny_build_config(tmp_path, tiny_model_dir("llama"), build={"max_memory": "20GiB"})
    stages: list[str] = []
    real = memory_budget.resident_bytes
    monkeypatch.setattr(memory_budget, "resident_bytes", lambda: 2**50 if "capture" in stages else real())
    with pytest.raises(MemoryBudgetError, match=r"in stage \w+, over its budget of 20.0 GiB") as stopped:
        build(load_config(config), tmp_path, on_stage=stages.append)
    assert "build.max_memory" in str(stopped.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.yaml"]
