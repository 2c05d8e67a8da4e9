"""Which Hugging Face architectures a build accepts, and what onnxruntime-genai calls them.

This is deliberately *not* a table of layer names: capture and structure discovery work from
the traced graph. The table only says which decoder families have been verified end to end
(export parity, KV cache layout, genai run) and which ``type`` string onnxruntime-genai needs
in ``genai_config.json``. Adding a Llama-like family is one line here plus a test.
"""

from __future__ import annotations

from dataclasses import dataclass

from aqexport.errors import ConfigError

__all__ = ["ArchitectureInfo", "SUPPORTED_ARCHITECTURES", "check_architecture"]


@dataclass(frozen=True)
class ArchitectureInfo:
    model_type: str
    genai_type: str
    """``model.type`` for onnxruntime-genai; ``decoder`` is its generic decoder-only model."""


SUPPORTED_ARCHITECTURES: dict[str, ArchitectureInfo] = {
    info.model_type: info
    for info in (
        ArchitectureInfo("llama", "llama"),
        ArchitectureInfo("mistral", "mistral"),
        ArchitectureInfo("qwen2", "qwen2"),
        ArchitectureInfo("gemma3_text", "gemma3_text"),
        ArchitectureInfo("opt", "decoder"),
    )
}


def _causal(class_name: str) -> bool:
    """A transformers class with a language-model head that predicts the next token."""
    return class_name.endswith(("ForCausalLM", "LMHeadModel"))


def check_architecture(model_type: str, where: str, classes: list[str] | None = None) -> ArchitectureInfo:
    """Refuse anything not verified, before any weights are loaded. ``classes``: the config's
    ``architectures`` (the classes the checkpoint was saved from): a supported family saved as
    an encoder or a classifier (``LlamaForSequenceClassification``) has no LM head to compile."""
    info = SUPPORTED_ARCHITECTURES.get(model_type)
    causal = not classes or any(_causal(name) for name in classes)
    if info is not None and causal:
        return info
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    if model_type == "gemma3":
        raise ConfigError(
            f"model '{where}' has architecture 'gemma3', which aqexport does not support (for Gemma 3 use a "
            "text-only checkpoint, model_type gemma3_text)",
            f"use a model of one of these architectures: {supported}",
        )
    if not causal:
        raise ConfigError(
            f"model '{where}' is a {classes[0]} (model_type '{model_type}'), not a causal language model: "
            "aqexport compiles decoder-only models with a next-token head",
            f"use a ...ForCausalLM checkpoint of one of these architectures: {supported}",
        )
    raise ConfigError(
        f"model '{where}' has architecture '{model_type}', which aqexport does not support",
        f"use a model of one of these architectures: {supported}",
    )
