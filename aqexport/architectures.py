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


def check_architecture(model_type: str, where: str) -> ArchitectureInfo:
    """Refuse anything not verified, before any weights are loaded."""
    info = SUPPORTED_ARCHITECTURES.get(model_type)
    if info is not None:
        return info
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    hint = ""
    if model_type == "gemma3":
        hint = " (for Gemma 3 use a text-only checkpoint, model_type gemma3_text)"
    raise ConfigError(
        f"model '{where}' has architecture '{model_type}', which aqexport does not support{hint}",
        f"use a model of one of these architectures: {supported}",
    )
