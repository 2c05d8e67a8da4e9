"""``target.profile: cuda``: a float16 artifact (activations, scales, KV cache), checked
structurally here; it runs only where ONNX Runtime has the CUDA execution provider."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest

from aqexport.config import load_config
from aqexport.pipeline import build
from tests.conftest import read_report, tiny_build_config
from tests.tiny_models import data_file

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module", params=["int4", "tied"])
def cuda_artifact(request, tiny_model_dir, tmp_path_factory):
    """The tiny Llama's int4 build, its embedding an own int4 table or the head's (``tied``: the
    head's float16 scales viewed as [vocab, blocks, 1] for the lookup)."""
    work = tmp_path_factory.mktemp("cuda")
    config = tiny_build_config(
        work,
        tiny_model_dir("llama"),
        quantization={"recipe": "rtn", "preset": "w4a16g128", "lm_head": "int4", "embedding": request.param},
        calibration={"data": str(data_file("valid")), "samples": 2, "seqlen": 32},
        target={"profile": "cuda", "providers": ["cuda"]},
    )
    return build(load_config(config), work)


def test_cuda_artifact_is_float16_throughout(cuda_artifact):
    model = onnx.load(str(cuda_artifact / "model.onnx"))
    graph = model.graph
    kv_and_logits = [v for v in [*graph.input, *graph.output] if v.name.startswith(("past", "present", "logits"))]
    assert kv_and_logits and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in kv_and_logits)
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    scales = [  # a tied lookup reads the head's scales through a Reshape
        initializers.get(node.input[2]) or initializers[producers[node.input[2]].input[0]]
        for node in graph.node
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized")
    ]
    assert scales and all(s.data_type == onnx.TensorProto.FLOAT16 for s in scales)
    float32 = [init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT]
    consumers = {name: [n.op_type for n in graph.node if name in n.input] for name in float32}
    assert all(
        ops and set(ops) <= {"Cast", "Max", "Min", "Range", "CumSum", "ReduceMax", "ReduceMin"}
        for ops in consumers.values()
    ), consumers
    attentions = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    fusions = json.loads((cuda_artifact / "manifest.json").read_text())["fusions"]
    if fusions["rotary_embedding_layers"]:  # our rotary match (torch 2.13): the packed q/k/v goes
        # into the attention, which rotates it (PackedQkvAttentionPass)
        assert attentions and all(node.input[1] == "" and node.input[7].startswith("gqa_cos") for node in attentions)
        assert not [node for node in graph.node if node.op_type == "RotaryEmbedding"]
    else:  # torch 2.11's export meets onnxscript's rotary rule first (device run): left as it was, said why
        assert len(fusions["packed_qkv_left_unfused"]) == len(attentions)
    genai = json.loads((cuda_artifact / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


def test_cuda_artifact_runs_its_plan_on_a_gpu(cuda_artifact):
    verification = read_report(cuda_artifact)["verification"]
    if not HAS_CUDA:
        assert "no CUDA execution provider" in verification["skipped"]
        pytest.skip(
            "this onnxruntime has no CUDA execution provider: the float16 artifact is only checked structurally"
        )
    assert verification["providers"]["used"][0] == "CUDAExecutionProvider"
    assert verification["logits_parity"]["prefill"]["top1_agreement"] >= 0.95  # float16 against float32 PyTorch
