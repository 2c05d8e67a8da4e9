"""Where the captured graph's weights come from, without the copy the exporter used to make.

torch's exporter, when it optimizes, folds each linear's ``Transpose(W)`` into a new initializer
holding Wᵀ, a view of the PyTorch parameter: the graph can only be as big as the model if the
model is in memory. So the capture exports unoptimized, then ``fold_weight_transposes``
replaces each ``Transpose`` of a parameter by an initializer of the same name (the name the
optimizer's folder would give it) whose bytes come from a ``WeightSource``:

* ``ModelWeights``: the loaded PyTorch model's parameters, as transposed views (what the
  optimizer's folder made: ``np.transpose`` of the parameter's memory);
* ``CheckpointWeights``: the checkpoint's safetensors files (``aqexport.source_tensors``), read
  and transposed each time a pass or the writer asks for the bytes (``ir.LazyTensor``, not
  cached), so the graph holds none of the model; every other parameter initializer (embedding,
  norms) reads from the file too.

Then the exporter's own optimizer runs (``onnxscript``'s ``optimize_ir`` and ONNX fusions, as
``ONNXProgram.optimize``) on a graph with nothing large left to fold. Both sources give the
same graph and, the checkpoint's tensors cast by torch as ``from_pretrained`` casts them, the
same bytes (``tests/test_capture_weights.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype
from onnxscript.optimizer._constant_folding import FOLDED_FROM_KEY
from torch import nn

from aqexport.gguf_tensors import checkpoint_tensors
from aqexport.source_tensors import CheckpointTensors

__all__ = [
    "CheckpointWeights",
    "ModelWeights",
    "WeightSource",
    "fold_weight_transposes",
    "parameter_name",
    "skeleton_model",
]

logger = logging.getLogger(__name__)

#: the capture wrappers hold the causal LM as ``self.model`` (``aqexport.capture``)
_WRAPPER_PREFIX = "model."


def parameter_name(initializer: str) -> str:
    """The causal LM's state-dict key of an initializer the exporter named after a parameter."""
    return initializer.removeprefix(_WRAPPER_PREFIX)


class WeightSource:
    """Gives the graph a parameter's tensor, as it is or transposed."""

    def tensor(self, name: str, value: ir.Value, transposed: bool) -> ir.TensorProtocol | None:
        """The initializer's tensor; ``None`` keeps what the exporter put there."""
        raise NotImplementedError


class ModelWeights(WeightSource):
    """The loaded model's own tensors, as the exporter's folder gave them: a transposed *view*
    of the parameter (no copy; the bytes are laid out when written), so the graph shares memory
    with the PyTorch model and sees calibration's in-place fake-quant weights (the parity ladder
    replaces them for its folded rung, ``FloatWeightsPass``)."""

    def tensor(self, name: str, value: ir.Value, transposed: bool) -> ir.TensorProtocol | None:
        if not transposed:
            return None
        return ir.Tensor(value.const_value.numpy().T, name=name)


class CheckpointWeights(WeightSource):
    """Reads from the checkpoint's files; ``tied`` maps a parameter the checkpoint does not store
    (an LM head tied to the embedding) to the one it reads."""

    def __init__(self, tensors: CheckpointTensors, dtype: torch.dtype, tied: dict[str, str]) -> None:
        self._tensors = tensors
        self._dtype = dtype
        self._tied = tied

    @classmethod
    def for_model(
        cls,
        folder: Path,
        model: nn.Module,
        head_tied: bool,
        gguf_file: str | None = None,
        tensors: CheckpointTensors | None = None,
    ) -> CheckpointWeights | None:
        """``None`` where the checkpoint cannot stand in for the model's parameters: no
        safetensors (nor ``gguf_file``), or a parameter whose name or shape the files do not
        hold (a checkpoint whose keys transformers renames on load, say). ``head_tied``: the
        checkpoint's LM head is its embedding (``capture.untie_lm_head`` gave the model a copy).
        ``tensors``: the checkpoint already open (a streamed model's), else opened here."""
        tensors = tensors or checkpoint_tensors(folder, gguf_file, model)
        if tensors is None:
            return None
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        tied = {}
        if head_tied:
            head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
            tied[names[id(head.weight)]] = names[id(embedding.weight)]
        for name, parameter in model.named_parameters(remove_duplicate=False):
            stored = name if name in tensors else tied.get(name)
            if stored not in tensors or tensors.shape(stored) != tuple(parameter.shape):
                logger.info("capture: weights from memory (the checkpoint holds no '%s' of this shape)", name)
                return None
        dtype = next(model.parameters()).dtype
        return cls(tensors, dtype, {k: v for k, v in tied.items() if k not in tensors})

    def tensor(self, name: str, value: ir.Value, transposed: bool) -> ir.TensorProtocol | None:
        stored = self._tied.get(name, name)
        if stored not in self._tensors:
            return None
        read = self._reader(stored, transposed)
        shape = ir.Shape(self._tensors.shape(stored)[::-1] if transposed else self._tensors.shape(stored))
        return ir.LazyTensor(read, dtype=from_torch_dtype(self._dtype), shape=shape, name=name)

    def _reader(self, stored: str, transposed: bool) -> Callable[[], ir.TensorProtocol]:
        def read() -> ir.TensorProtocol:
            tensor = self._tensors.read(stored, self._dtype)
            return TorchTensor(tensor.T.contiguous() if transposed else tensor)

        return read


def fold_weight_transposes(model: ir.Model, source: WeightSource) -> int:
    """Replace each ``Transpose`` whose only input is a parameter used nowhere else by an
    initializer holding the transposed parameter, and give every other parameter initializer
    the source's tensor. Returns the transposes folded."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if weight is None or not weight.is_initializer() or len(weight.uses()) != 1:
            continue
        if list(node.attributes.get("perm", ir.AttrInt64s("perm", [1, 0])).value) != [1, 0]:
            continue
        tensor = source.tensor(parameter_name(weight.name), weight, transposed=True)
        if tensor is None:
            continue
        output = node.outputs[0]
        folded_value = ir.Value(name=output.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
        folded_value.const_value = tensor
        # what onnxscript's folder records on a folded value (StableNamesPass names the weight by it)
        folded_value.meta[FOLDED_FROM_KEY] = {weight.name}
        folded_value.metadata_props[FOLDED_FROM_KEY] = repr([weight.name])
        output.replace_all_uses_with(folded_value)
        graph.remove(node, safe=True)
        graph.initializers.pop(weight.name)
        graph.register_initializer(folded_value)
        folded += 1
    for name, value in list(graph.initializers.items()):
        if value.const_value is not None and value.uses():
            tensor = source.tensor(parameter_name(name), value, transposed=False)
            if tensor is not None:
                value.const_value = tensor
    return folded


def skeleton_model(model_class: type[nn.Module], config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` with no weights: parameters are fake tensors (shape and dtype,
    no storage), buffers the model computes at construction (rotary frequencies, Gemma's
    embedding scale) are real. ``torch.export`` traces it like the loaded model, and with
    ``CheckpointWeights`` the graph comes out byte for byte the same: a 7B graph is captured in
    the memory of its buffers. ``model_class``: the loaded model's class (remote code included:
    it is already imported); layers run as the loaded model's do, ``attn_implementation`` sdpa."""
    from accelerate import init_empty_weights
    from torch._subclasses.fake_tensor import FakeTensorMode

    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            with fake:
                value = torch.empty(parameter.shape, dtype=parameter.dtype, device="cpu")
            setattr(module, name, nn.Parameter(value, requires_grad=False))
    model.tie_weights()  # a tied head is the embedding's (fake) tensor again, as on load
    return model.eval()
