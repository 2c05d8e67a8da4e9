"""``aqexport diff --run``: intermediates compared in order, the first divergence named.

Two kinds of subject: a synthetic bare ``.onnx`` (no tokenizer, no KV cache: milliseconds),
and the tiny Llama artifact every other test builds (GroupQueryAttention, fused norms, a
tokenizer, the perplexity protocol), once as is and once with one weight perturbed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from aqexport.diff import execution
from aqexport.diff.execution import compare_execution, module_path, tensor_metrics
from aqexport.diff.opening import open_side
from aqexport.diff.side import GraphSide
from aqexport.errors import AqexportError
from tests.conftest import read_report
from tests.tiny_models import data_file

VOCAB, HIDDEN, WIDE = 32, 8, 16


def same_name_pairs(a: GraphSide, b: GraphSide) -> list[tuple[str, str]]:
    """What the lead's alignment gives for graphs of one structure: values of equal names."""
    names_b = {value.name for node in b.model.graph for value in node.outputs}
    return [(value.name, value.name) for node in a.model.graph for value in node.outputs if value.name in names_b]


def synthetic_model(directory: Path, weights: dict[str, np.ndarray]) -> Path:
    """input_ids -> embedding -> up (MatMul) -> Relu -> down (MatMul) -> lm_head -> logits,
    named as the exporter names nodes, weights in an external data file."""
    directory.mkdir(parents=True, exist_ok=True)
    nodes = [
        helper.make_node("Gather", ["embed.weight", "input_ids"], ["embedding"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["embedding", "up.weight"], ["up"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Relu", ["up"], ["act"], name="/model/layers.0/mlp/act_fn/Relu"),
        helper.make_node("MatMul", ["act", "down.weight"], ["down"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("Add", ["embedding", "down"], ["hidden"], name="/model/layers.0/Add"),
        helper.make_node("MatMul", ["hidden", "lm_head.weight"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = directory / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def synthetic_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": (VOCAB, HIDDEN), "up.weight": (HIDDEN, WIDE), "down.weight": (WIDE, HIDDEN)}
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    weights["lm_head.weight"] = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    return weights


def test_metrics_define_sqnr_of_b_against_a():
    a = np.ones(100, np.float32)
    assert tensor_metrics(a, a) == {"cosine": 1.0, "sqnr_db": None, "max_abs": 0.0, "identical": True}
    noisy = tensor_metrics(a, a + np.float32(0.1))
    assert noisy["sqnr_db"] == pytest.approx(20.0, abs=1e-3) and not noisy["identical"]
    assert noisy["max_abs"] == pytest.approx(0.1, rel=1e-5)
    assert execution.diverges(noisy, 20.5) and not execution.diverges(noisy, 19.5)
    masked = np.array([1.0, -np.inf, 2.0], np.float32)  # equal -inf (a mask) is left out
    assert tensor_metrics(masked, masked)["identical"]
    moved = tensor_metrics(masked, np.array([1.0, 2.0, -np.inf], np.float32))
    assert moved["sqnr_db"] is None and not moved["identical"] and moved["nonfinite_mismatch"] == 2
    assert execution.diverges(moved, 20.0)
    # float16 against float32: compared as float64
    assert tensor_metrics(a.astype(np.float16), a)["identical"]


def test_module_path_from_stable_names():
    assert module_path("/model/layers.3/mlp/down_proj/MatMulNBits") == "model.layers.3.mlp.down_proj"
    assert module_path("/lm_head/MatMul") == "lm_head"
    assert module_path("node_RotaryEmbedding_7") is None


def test_synthetic_identical_then_perturbed(tmp_path):
    weights = synthetic_weights()
    a = open_side(synthetic_model(tmp_path / "a", weights))
    same = compare_execution(a, a, same_name_pairs(a, a))
    json.dumps(same)  # plain JSON, no numpy scalars
    assert same["first_divergence"] is None
    assert same["logits"]["top1_agreement"] == 1.0 and same["logits"]["identical"]
    assert [t["a"] for t in same["tensors"]] == ["embedding", "up", "act", "down", "hidden", "logits"]
    assert all(t["identical"] and t["sqnr_db"] is None for t in same["tensors"])
    assert same["inputs"]["prompt"] is None and "random" in same["inputs"]["token_source"]
    assert same["inputs"]["tokens"] == execution.RANDOM_PROMPT_TOKENS and same["perplexity"] is None

    weights["down.weight"] = weights["down.weight"] + np.random.default_rng(1).standard_normal((WIDE, HIDDEN)).astype(
        np.float32
    )
    b = open_side(synthetic_model(tmp_path / "b", weights))
    before = sorted(p.name for p in (tmp_path / "b").iterdir())
    report = compare_execution(a, b, same_name_pairs(a, b) + [("up", "down"), ("act", "missing")])
    first = report["first_divergence"]
    assert first["a"] == "down" and first["a_node"] == "/model/layers.0/mlp/down_proj/MatMul"
    assert first["a_op"] == "MatMul" and first["module"] == "model.layers.0.mlp.down_proj"
    assert first["sqnr_db"] < report["threshold_db"]
    upstream = [t for t in report["tensors"] if t["a"] in ("embedding", "up", "act")]
    assert all(t["identical"] for t in upstream)
    reasons = {(s["a"], s["b"]): s["reason"] for s in report["skipped"]}
    tokens = execution.RANDOM_PROMPT_TOKENS
    assert reasons[("up", "down")] == f"shape [1, {tokens}, {WIDE}] vs [1, {tokens}, {HIDDEN}]"
    assert "missing" in reasons[("act", "missing")]
    assert report["coverage"]["ignored"]["not_intermediate"] == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == before  # nothing written beside the model


def test_exposure_is_capped(tmp_path, monkeypatch):
    a = open_side(synthetic_model(tmp_path / "a", synthetic_weights()))
    monkeypatch.setattr(execution, "MAX_EXPOSED", 2)
    report = compare_execution(a, a, same_name_pairs(a, a))
    assert [t["a"] for t in report["tensors"]] == ["embedding", "up"]
    assert report["coverage"]["capped"] == 4 and report["coverage"]["notes"]


def test_text_without_tokenizer_is_refused(tmp_path):
    a = open_side(synthetic_model(tmp_path / "a", synthetic_weights()))
    with pytest.raises(AqexportError, match="tokenizer"):
        compare_execution(a, a, [], text=data_file("test"))


def test_tiny_artifact_against_itself(tiny_artifact):
    artifact = tiny_artifact("llama")
    a, b = open_side(artifact), open_side(artifact)
    prompt, text = "The history of the city", data_file("test")
    report = compare_execution(a, b, same_name_pairs(a, b), prompt=prompt, text=text, windows=3, seqlen=48)
    json.dumps(report)
    assert report["first_divergence"] is None and not report["skipped"]
    assert report["coverage"]["instrumentation_max_abs"] == {"a": 0.0, "b": 0.0}
    assert report["logits"]["top1_agreement"] == 1.0 and report["logits"]["identical"]
    ops = {t["op"] for t in report["tensors"]}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding", "MatMul"} <= ops
    ppl = report["perplexity"]
    assert ppl["change"] == 0.0 and ppl["top1_agreement"] == 1.0 and ppl["windows"] == 3
    # the same protocol as the build's verification (and 'aqexport eval')
    built = read_report(artifact)["verification"]["perplexity"]["onnx"]["perplexity"]
    assert ppl["a"] == pytest.approx(built, rel=1e-6)


def test_tiny_artifact_with_one_weight_perturbed(tiny_artifact, tmp_path):
    artifact = tiny_artifact("llama")
    perturbed = tmp_path / "perturbed"
    shutil.copytree(artifact, perturbed, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
    model = ir.load(artifact / "model.onnx")
    weight = model.graph.initializers["model.layers.1.mlp.up_proj.weight"]
    original = weight.const_value.numpy()
    noise = np.random.default_rng(0).standard_normal(original.shape).astype(original.dtype) * original.std()
    weight.const_value = ir.tensor(original + noise, name=weight.name)
    ir.save(model, perturbed / "model.onnx", external_data="model.onnx.data")

    a, b = open_side(artifact), open_side(perturbed)
    report = compare_execution(a, b, same_name_pairs(a, b), prompt="The history of the city")
    first = report["first_divergence"]
    assert first["a_node"] == "/model/layers.1/mlp/up_proj/MatMul", first
    assert first["b_node"] == first["a_node"] and first["module"] == "model.layers.1.mlp.up_proj"
    before = report["tensors"][: first["index"]]
    assert before and all(t["identical"] for t in before)  # layer 0 and layer 1's attention untouched
    assert report["logits"]["max_abs"] > 0
