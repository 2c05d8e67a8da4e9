"""A tiny random Llama written as a GGUF file, the way llama.cpp's converter writes one.

What a user's GGUF holds: the architecture's metadata, the tokenizer (copied here from the
packaged SmolLM2 GGUF, so transformers rebuilds a real 49152-token BPE tokenizer from it),
and the tensors under GGUF's names, with the query and key rows permuted for llama.cpp's
rotary layout (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``) and the matrices stored as
Q8_0 blocks, so reading it back exercises transformers' name map, its reverse permutation and
gguf's dequantization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["write_tiny_gguf"]

#: the tokenizer's metadata keys copied from the packaged GGUF
_TOKENIZER_PREFIX = "tokenizer."


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rotary halves interleaved."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_gguf(path: Path, donor: Path, seed: int = 0) -> LlamaForCausalLM:
    """Write the GGUF of a random tiny Llama (hidden 64, 2 layers, the donor's vocabulary) to
    ``path``, with ``donor``'s tokenizer; returns the model it holds (before Q8_0 rounding)."""
    import gguf

    donor_reader = gguf.GGUFReader(str(donor))
    tokens = donor_reader.fields["tokenizer.ggml.tokens"]
    config = LlamaConfig(
        vocab_size=len(tokens.data),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm read wrongly shows
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    for key, field in donor_reader.fields.items():
        if key.startswith(_TOKENIZER_PREFIX):
            value = field.contents()
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, parameter in model.state_dict().items():
        if name == "lm_head.weight":  # tied: GGUF stores the embedding only
            continue
        stem, suffix = name.rsplit(".", 1)
        weights = parameter.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            weights = _permute(weights, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weights = _permute(weights, config.num_key_value_heads)
        target = f"{names.get_name(stem)}.{suffix}"
        if weights.ndim == 2:
            quantized = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(target, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(target, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
