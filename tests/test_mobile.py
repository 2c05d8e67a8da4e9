"""The mobile profile: the cpu profile's int4 graph sized for a phone's CPU EP, its ``model.ort``
and the operator config a reduced ONNX Runtime build takes.

One plan (``plan_dir`` shared) is lowered twice, for ``profile: cpu`` and ``profile: mobile``:
the two artifacts must compute the same logits and greedy tokens, under our runtime and under
onnxruntime-genai; the ``.ort`` must give ``model.onnx``'s logits, and its operator config must
list every operator the ``.ort`` holds and every one a session on it runs. The reduced build
itself (ONNX Runtime compiled for the phone from that config) cannot be made here."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs

from aqexport.config import load_config
from aqexport.integrity import verify_artifact
from aqexport.mobile import OPERATOR_CONFIG, operator_config_entries
from aqexport.pipeline import build
from aqexport.runtime import create_session, decoder_for, generate
from tests.conftest import read_report, tiny_build_config, write_config
from tests.genai_support import genai_greedy
from tests.tiny_models import data_file

CONTEXT = 96
QUANTIZATION = {"recipe": "rtn", "preset": "w4a16"}
#: what profile mobile quantizes by default, spelled out for the cpu build of the same plan
EDGES = {"lm_head": "int4", "embedding": "tied"}
PROMPT = [11, 42, 97, 150, 33, 7, 260]


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    """``{"cpu": artifact, "mobile": artifact}`` lowered from one plan of the tiny Llama."""
    work = tmp_path_factory.mktemp("mobile-pair")
    calibration = {"data": str(data_file("valid")), "samples": 4, "seqlen": 32, "plan_dir": str(work / "shared.plan")}
    targets = {
        "cpu": ({**QUANTIZATION, **EDGES}, {"accuracy_level": 4}),
        "mobile": (QUANTIZATION, {"profile": "mobile", "max_context": CONTEXT}),
    }
    built = {}
    for name, (quantization, target) in targets.items():
        directory = work / name
        directory.mkdir()
        config = tiny_build_config(
            directory, tiny_model_dir("llama"), quantization=quantization, target=target, calibration=calibration
        )
        built[name] = build(load_config(config), directory)
    return built


def _graph(artifact):
    return onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph


def _ort_file_operators(path) -> set[tuple[str, str]]:
    """(domain, op) of every node of an ORT-format file, read from its flatbuffer."""
    graph = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(path.read_bytes(), 0).Model().Graph()
    nodes = (graph.Nodes(i) for i in range(graph.NodesLength()))
    return {(node.Domain().decode(), node.OpType().decode()) for node in nodes}


def _ort_file_tables(path, rows: int) -> dict[str, list[int]]:
    """Name → dims of every initializer of an ORT-format file with ``rows`` leading rows."""
    graph = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(path.read_bytes(), 0).Model().Graph()
    tensors = (graph.Initializers(i) for i in range(graph.InitializersLength()))
    dims = {t.Name().decode(): [t.Dims(j) for j in range(t.DimsLength())] for t in tensors}
    return {name: shape for name, shape in dims.items() if shape and shape[0] == rows}


def _prefill_and_step(decoder) -> list[np.ndarray]:
    prefix, last = np.asarray([PROMPT[:-1]]), np.asarray([PROMPT[-1:]])
    prefill, past = decoder.step(prefix, np.ones_like(prefix), decoder.empty_past(1))
    step, _ = decoder.step(last, np.ones((1, len(PROMPT)), dtype=np.int64), past)
    return [prefill, step]


def test_profile_defaults_fill_the_recorded_config(tmp_path):
    data = str(data_file("valid"))
    mobile = load_config(
        write_config(
            tmp_path,
            quantization=QUANTIZATION,
            calibration={"data": data},
            target={"profile": "mobile"},
            output={"dir": "out"},
        )
    )
    assert (mobile.quantization.lm_head, mobile.quantization.embedding) == ("int4", "auto")
    assert (mobile.target.max_context, mobile.target.accuracy_level) == (2048, 4)
    explicit = load_config(
        write_config(
            tmp_path,
            quantization={**QUANTIZATION, "lm_head": "int8", "embedding": "float"},
            calibration={"data": data},
            target={"profile": "mobile", "accuracy_level": 0},
            output={"dir": "out"},
        )
    )
    assert (explicit.quantization.lm_head, explicit.quantization.embedding) == ("int8", "float")
    assert explicit.target.accuracy_level == 0
    fp32 = load_config(write_config(tmp_path, target={"profile": "mobile"}, output={"dir": "out"}))
    assert fp32.quantization.recipe == "none"
    npu = load_config(write_config(tmp_path, target={"profile": "npu"}, output={"dir": "out"}))
    assert (npu.target.max_context, npu.target.npu, npu.target.accuracy_level) == (512, "coreml", None)
    cpu = load_config(
        write_config(tmp_path, quantization=QUANTIZATION, calibration={"data": data}, output={"dir": "out"})
    )
    assert (cpu.quantization.lm_head, cpu.target.max_context, cpu.target.npu) == ("float", None, None)


def test_mobile_is_the_cpu_graph_sized_for_a_phone(pair):
    cpu, mobile = pair["cpu"], pair["mobile"]
    graph = _graph(mobile)
    ops = {node.op_type for node in graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized", "GroupQueryAttention"} <= ops
    matmuls = [node for node in graph.node if node.op_type == "MatMulNBits"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in matmuls]
    assert {a["accuracy_level"] for a in attributes} == {4} and {a["bits"] for a in attributes} == {4}
    head = [node for node in matmuls if node.output[0] == "logits" or "lm_head" in node.name]
    assert head, "the LM head is not a MatMulNBits"
    # the tiny Llama ties its embedding to its head: one table, the head's codes, which the lookup reads
    (lookup,) = [node for node in graph.node if node.op_type == "GatherBlockQuantized"]
    assert lookup.input[0] == head[0].input[1]
    assert not [i for i in graph.initializer if i.name.startswith("model.embed_tokens.weight")]
    # the rotary tables hold max_context positions (the cpu build's: the model's context)
    caches = {i.name: i.dims[0] for i in graph.initializer if i.name.startswith("gqa_cos_cache")}
    cpu_caches = {i.name: i.dims[0] for i in _graph(cpu).initializer if i.name.startswith("gqa_cos_cache")}
    assert caches and set(caches.values()) == {CONTEXT} and set(cpu_caches.values()) != {CONTEXT}
    genai = json.loads((mobile / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == genai["search"]["max_length"] == CONTEXT
    assert genai["search"]["past_present_share_buffer"] is True
    report = read_report(mobile)
    assert report["quantization"]["accuracy_level"] == 4
    assert report["verification"]["accuracy_level"]["measured"] is False
    assert report["verification"]["greedy"]["identical_to_pytorch"] is not None
    # same plan, same graph family: the cpu artifact's logits and tokens
    ours, theirs = (decoder_for(create_session(artifact)[0]) for artifact in (mobile, cpu))
    for a, b in zip(_prefill_and_step(ours), _prefill_and_step(theirs), strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert generate(ours, PROMPT, 24).new_tokens == generate(theirs, PROMPT, 24).new_tokens


@pytest.mark.genai
def test_genai_runs_the_mobile_artifact_and_its_ort_copy(pair, tmp_path):
    cpu, mobile = pair["cpu"], pair["mobile"]
    tokens = genai_greedy(mobile, PROMPT, 16)
    assert tokens and tokens == genai_greedy(cpu, PROMPT, 16)
    # an app shipping the .ort alone: genai_config.json names it, no model.onnx beside it
    app = tmp_path / "app"
    shutil.copytree(mobile, app, ignore=shutil.ignore_patterns("model.onnx*"))
    genai = json.loads((app / "genai_config.json").read_text())
    genai["model"]["decoder"]["filename"] = "model.ort"
    (app / "genai_config.json").write_text(json.dumps(genai))
    assert genai_greedy(app, PROMPT, 16) == tokens


def test_ort_copy_gives_the_onnx_logits_and_ships_its_operator_config(pair):
    mobile = pair["mobile"]
    ort_file, config = mobile / "model.ort", mobile / OPERATOR_CONFIG
    manifest = json.loads((mobile / "manifest.json").read_text())
    assert {"model.ort", OPERATOR_CONFIG} <= set(manifest["files"])
    assert manifest["not_reproducible"]["files"] == ["report.json", "report.html", "model.ort"]
    assert verify_artifact(mobile).ok
    session = ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"])
    onnx_decoder = decoder_for(create_session(mobile)[0])
    for a, b in zip(_prefill_and_step(decoder_for(session)), _prefill_and_step(onnx_decoder), strict=True):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    verification = read_report(mobile)["verification"]["ort_format"]
    assert verification["greedy_identical_to_onnx"] and verification["logits_vs_onnx"]["decode_step"]["max_rel"] <= 1e-5

    # the tied table is stored once: ORT's optimizer folded no copy of the head's codes for the
    # lookup (only of the scales, viewed as [vocab, blocks, 1])
    vocab = onnx.load(str(mobile / "model.onnx"), load_external_data=False).graph.output[0].type
    vocab = vocab.tensor_type.shape.dim[-1].dim_value
    tables = _ort_file_tables(ort_file, vocab)
    assert [name for name, shape in tables.items() if len(shape) == 3 and shape[-1] > 1] == ["lm_head.weight_Q4"]

    listed = operator_config_entries(config)  # ONNX Runtime's own parser of the config
    assert listed == _ort_file_operators(ort_file)
    # model.onnx's operators are listed, but for what ORT fused at level all (x·sigmoid(x) -> QuickGelu)
    onnx_ops = {(node.domain, node.op_type) for node in _graph(mobile).node}
    assert onnx_ops - listed <= {("", "Sigmoid")} and ("com.microsoft", "QuickGelu") in listed
    # every kernel a session on the .ort runs (no optimizer at load, as in a minimal build)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(mobile.parent / "ort-profile")
    profiled = ort.InferenceSession(str(ort_file), options, providers=["CPUExecutionProvider"])
    generate(decoder_for(profiled), PROMPT, 4)
    events = json.loads(open(profiled.end_profiling()).read())
    ran = {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    assert ran and ran <= {op for _, op in listed}
    assert "MatMulNBits" in ran and "GatherBlockQuantized" in ran
