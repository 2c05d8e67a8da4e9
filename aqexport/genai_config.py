"""``genai_config.json``: what onnxruntime-genai needs to run an artifact unchanged.

Measured here: onnxruntime-genai runs a plain (unfused) export with the contract's I/O names as
long as ``search.past_present_share_buffer`` is false; sharing the buffer needs present tensors
written in place into past buffers preallocated at full length, which only GroupQueryAttention
graphs whose cache inputs feed nothing else do (``passes/shared_kv_buffer.py``). Those set it
true (the model builder's contract); plain graphs, and any whose attention did not all fuse,
keep it false.
"""

from __future__ import annotations

from typing import Any

from aqexport.capture import CacheLayout

__all__ = ["build_genai_config"]


def _token_ids(value: Any) -> int | list[int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) > 1 else int(value[0])
    return int(value)


def build_genai_config(
    hf_config: Any,
    generation_config: Any,
    layout: CacheLayout,
    genai_type: str,
    *,
    filename: str = "model.onnx",
    share_buffer: bool = False,
    provider: str | None = None,
    context_length: int | None = None,
) -> dict[str, Any]:
    """``context_length``: the positions the artifact is sized for (the mobile profile's
    ``max_context``); default the model's ``max_position_embeddings``. onnxruntime-genai takes it
    as the default ``max_length`` and, with a shared buffer, allocates every layer's KV cache at
    that length up front (SmolLM2: 377 MB at 8192 positions, 94 MB at 2048)."""
    text = hf_config.get_text_config()
    eos = _token_ids(getattr(generation_config, "eos_token_id", None) or text.eos_token_id)
    pad = getattr(text, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    context = context_length or int(getattr(text, "max_position_embeddings", 2048))
    return {
        "model": {
            "bos_token_id": _token_ids(text.bos_token_id),
            "context_length": context,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": [{provider: {}}] if provider else [],
                },
                "filename": filename,
                "head_size": layout.head_dims[0],
                "hidden_size": int(text.hidden_size),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": int(text.num_attention_heads),
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.kv_heads[0],
            },
            "eos_token_id": eos,
            "pad_token_id": int(pad) if pad is not None else 0,
            "type": genai_type,
            "vocab_size": int(text.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
