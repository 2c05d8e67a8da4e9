"""A PyTorch causal LM that holds one decoder block's weights at a time.

The model is built without weights (``accelerate.init_empty_weights``); what lies outside the
decoder blocks (embedding, final norm, LM head, rotary tables) is read from the checkpoint once,
and each block gets accelerate's offload hook (``AlignDevicesHook(offload=True)``), which
before the block's forward sets its parameters from a weights map and after it puts them back
on the meta device. The map reads the checkpoint (``aqexport.source_tensors``); given a plan,
its planned linears' weights are the plan's fake-quant weights instead (dequantized codes,
computed when the block runs) and each planned block gets the plan's input hooks, as
``engine.apply_block_plan`` makes a loaded block fake-quant. So the same model is the float
reference and the plan's block-streamed fake-quant reference, which issue 17's verification of a
model larger than memory compares the artifact with.

Peak memory: the parts outside the blocks, plus one block's parameters, plus the activations.
The forward is the model's own code on the same values: its logits equal the loaded model's
(``tests/test_streamed_build.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import PrefixedDataset, set_module_tensor_to_device
from torch import nn

from aqexport import heap
from aqexport.calibrate.engine import install_plan_input_hooks
from aqexport.calibrate.plan import QuantPlan
from aqexport.calibrate.residency import edges_released, spill_inverses
from aqexport.calibrate.structure import decoder_blocks
from aqexport.errors import AqexportError
from aqexport.gguf_tensors import checkpoint_tensors, float_checkpoint
from aqexport.source_tensors import CheckpointTensors

__all__ = ["CheckpointMap", "edges_released", "float_linears", "streamed_model"]


class CheckpointMap(Mapping[str, torch.Tensor]):
    """The model's parameters by state-dict name, read from the checkpoint when asked (cast to
    ``dtype`` as ``from_pretrained`` casts), except a planned linear's weight and bias once
    ``plan`` holds its block: then the plan's fake-quant ones (what ``engine.apply_block_plan``
    copies into a loaded block). The plan is read at each request, so a plan that calibration is
    still filling serves float weights for the blocks to come and fake-quant ones for the rest."""

    def __init__(self, tensors: CheckpointTensors, names: list[str], dtype: torch.dtype) -> None:
        self._tensors, self._names, self._dtype = tensors, names, dtype
        self.plan: QuantPlan | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        planned = self._planned(name)
        return planned if planned is not None else self._tensors.read(name, self._dtype)

    @property
    def tensors(self) -> CheckpointTensors:
        """The checkpoint this reads (a GGUF's float shards, ``gguf_tensors.float_checkpoint``)."""
        return self._tensors

    def float(self, name: str) -> torch.Tensor:
        """The checkpoint's tensor, whatever the plan holds."""
        return self._tensors.read(name, self._dtype)

    def _planned(self, name: str) -> torch.Tensor | None:
        plan = self.plan
        if plan is None or not plan.blocks_path or not name.startswith(plan.blocks_path + "."):
            return None
        index, _, rest = name[len(plan.blocks_path) + 1 :].partition(".")
        block = plan.blocks.get(int(index)) if index.isdigit() else None
        linear, _, kind = rest.rpartition(".")
        entry = None if block is None else block.linears.get(linear)
        if entry is None:
            return None
        if kind == "weight":
            return entry.effective_weight().to(self._dtype)
        if kind == "bias" and entry.bias is not None:
            return entry.bias.to(self._dtype)
        return None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _ties_head(config) -> bool:
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", False))


def streamed_model(
    model_class: type[nn.Module],
    config,
    folder: Path,
    dtype: torch.dtype,
    plan: QuantPlan | None = None,
    gguf_file: str | None = None,
    scratch: Path | None = None,
) -> nn.Module:
    """The model of ``config`` over the checkpoint in ``folder`` (its safetensors files, or its
    ``gguf_file``), streamed block by block; with ``plan``, its fake-quant model (each planned
    block's weights from the plan, and its input hooks: the transforms' inverses, activation
    quantization). ``model_class``: the causal LM class (the loaded model's, remote code
    included). ``scratch``: where a GGUF's float shards go (``gguf_tensors.float_checkpoint``)."""
    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    tensors = checkpoint_tensors(folder, gguf_file, model)
    if tensors is None:
        raise AqexportError(
            f"'{folder}' holds no safetensors checkpoint to stream from",
            "convert the checkpoint to safetensors (save_pretrained writes it)",
        )
    heap.map_large_allocations()  # a block's weights go back to the system after its forward
    head = model.get_output_embeddings()
    names = [
        name
        for name, parameter in model.named_parameters()
        # a tied head is the embedding: tie_weights below, not a tensor of its own
        if not (_ties_head(config) and head is not None and parameter is head.weight and name not in tensors)
    ]
    missing = [name for name in names if name not in tensors]
    if missing:
        raise AqexportError(
            f"the checkpoint in '{folder}' does not hold {missing[0]} (and {len(missing) - 1} more) under the "
            "model's names",
            "stream only checkpoints saved by transformers for this architecture",
        )
    if gguf_file:  # dequantized once, not at every forward (aqexport.gguf_tensors)
        tensors = float_checkpoint(tensors, names, dtype, scratch)
    weights = CheckpointMap(tensors, names, dtype)
    weights.plan = plan
    path, blocks = decoder_blocks(model)
    in_blocks = tuple(f"{path}.{index}." for index in range(len(blocks)))
    for name in names:
        if not name.startswith(in_blocks):
            set_module_tensor_to_device(model, name, "cpu", value=weights[name])
    model.tie_weights()  # a tied head reads the embedding just loaded
    for index, block in enumerate(blocks):
        hook = AlignDevicesHook(
            execution_device="cpu",
            offload=True,
            weights_map=PrefixedDataset(weights, f"{path}.{index}."),
            place_submodules=True,
        )
        add_hook_to_module(block, hook)
        if plan is not None and index in plan.blocks:
            install_plan_input_hooks(block, plan.blocks[index])
            spill_inverses(block)
    model.streamed_weights = weights  # calibration points it at the plan it fills (engine.calibrate)
    return model.eval()


def float_linears(model: nn.Module, index: int) -> nn.Module:
    """A module tree holding block ``index``'s float parameters from the checkpoint, under the
    block's names: what a copy of the loaded block gives the folded rung and the per-linear
    errors (``fold.FoldedWeights``). Its own module, not the streamed block: the errors are
    computed inside that block's forward, whose weights the offload hook owns."""
    weights = model.streamed_weights
    path, _ = decoder_blocks(model)
    prefix = f"{path}.{index}."
    holder = nn.Module()
    for name in weights:
        if not name.startswith(prefix):
            continue
        *parents, leaf = name[len(prefix) :].split(".")
        module = holder
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(weights.float(name), requires_grad=False))
    for module in holder.modules():  # a linear without a bias has bias None, as nn.Linear does
        if "weight" in module._parameters and "bias" not in module._parameters:
            module.register_parameter("bias", None)
    return holder
