"""Tiny randomly initialised models of each supported family, saved as real HF folders.

Built from ``transformers`` configs and a small BPE tokenizer trained here on WikiText-2, so the
tests exercise the same loading path as a user's local folder without downloading anything.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
VOCAB = 384
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def data_file(split: str) -> Path:
    path = SHARED_DATA / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: tests need ../shared/data/wikitext-2 beside the repo")
    return path


def train_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    lines = data_file("valid").read_text(encoding="utf-8").splitlines()[:3000]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.save_pretrained(directory)
    return fast


def _common(kind: str) -> dict:
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if kind == "opt":
        return {
            **ids,
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "word_embed_proj_dim": 64,
        }
    return {
        **ids,
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }


CONFIGS = {
    "llama": lambda: LlamaConfig(**_common("llama"), tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**_common("qwen2"), tie_word_embeddings=False),
    "opt": lambda: OPTConfig(**_common("opt")),
    # Sliding window shorter than the test windows, so windowed attention is exercised.
    "gemma3_text": lambda: Gemma3TextConfig(
        **_common("gemma3"),
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
}


def make_tiny_model(kind: str, directory: Path, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind]())
    # Random init gives near-uniform logits; a wider spread makes greedy decoding and
    # top-1 comparisons meaningful instead of a coin toss between ties.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(directory)
    train_tokenizer(directory)
    return directory
