"""PyTorch-side references that an artifact is checked against.

Kept apart from ``aqexport.runtime`` (which knows only ONNX Runtime) so the runtime package can
ship to a deployment without torch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from transformers import DynamicCache, GenerationConfig

__all__ = ["torch_greedy", "torch_logits_of", "torch_step", "torch_teacher_forced"]


def torch_logits_of(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Logits function for ``runtime.perplexity``: one window, no cache carried over."""

    @torch.no_grad()
    def run(window: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(window[None].astype(np.int64))
        return model(input_ids=ids, use_cache=False).logits[0].float().numpy()

    return run


@torch.no_grad()
def torch_step(
    model: torch.nn.Module, input_ids: np.ndarray, cache: DynamicCache | None, past_length: int
) -> tuple[np.ndarray, DynamicCache]:
    """One forward with an explicit cache and positions, mirroring ``OnnxDecoder.step``."""
    cache = cache if cache is not None else DynamicCache()
    ids = torch.from_numpy(input_ids.astype(np.int64))
    total = past_length + ids.shape[1]
    out = model(
        input_ids=ids,
        attention_mask=torch.ones(ids.shape[0], total, dtype=torch.long),
        position_ids=torch.arange(past_length, total)[None].expand(ids.shape[0], -1),
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits.float().numpy(), out.past_key_values


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, prompt_tokens: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face ``generate`` itself, greedy, with EOS stopping off so lengths are comparable.

    ``eos_token_id=[]``, not ``None``: ``None`` means "unset" and is filled from the model's own
    generation config, which stops at EOS.
    """
    ids = torch.tensor([prompt_tokens], dtype=torch.long)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[], pad_token_id=0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt_tokens) :].tolist()


@torch.no_grad()
def torch_teacher_forced(model: torch.nn.Module, prompt_tokens: list[int], tokens: list[int]) -> list[int]:
    """The model's greedy choice after the prompt and each prefix of ``tokens``, from one forward
    over ``prompt + tokens[:-1]``. ``tokens`` is the model's own greedy output exactly when the
    two lists are equal, and where they first differ is where greedy decoding would first
    differ: the same verdict as ``torch_greedy``, for one pass over the weights instead of one
    per token (a streamed model reads every block again for each forward)."""
    if not tokens:
        return []
    ids = torch.tensor([list(prompt_tokens) + list(tokens[:-1])], dtype=torch.long)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_tokens) - 1 :]
    return logits.argmax(-1).tolist()
