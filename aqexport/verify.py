"""The parity ladder for a built artifact: PyTorch (the exported model) vs ONNX Runtime.

Three checks, from cheapest to most telling: logits of a prefill and of a cached decode step
(max-abs, relative, top-1 agreement), greedy generation token by token, and perplexity on the
evaluation text by the same windows for both. The figures go to ``report.json``; thresholds
are applied by the caller (tests, ``aqexport diff``), not hidden here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from aqexport.config import EvaluationSpec
from aqexport.errors import ConfigError
from aqexport.reference import torch_greedy, torch_logits_of, torch_step, torch_teacher_forced
from aqexport.runtime import (
    PROVIDER_NAMES,
    OnnxDecoder,
    create_session,
    decoder_for,
    generate,
    perplexity,
    prefill_session,
    split_windows,
)
from aqexport.runtime.perplexity import PerplexityResult, onnx_logits_of

__all__ = [
    "EVALUATION_TEXT",
    "TorchReference",
    "check_greedy_after",
    "compare_logits",
    "logits_parity",
    "release_weights",
    "text_windows",
    "tokenize_text",
    "torch_reference",
    "verify_artifact",
    "verify_ort_format",
]

#: How a config names the evaluation text and its window length (``text_windows``' ``names``).
EVALUATION_TEXT = ("evaluation.text", "evaluation.seqlen")

logger = logging.getLogger(__name__)


def compare_logits(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    scale = float(np.abs(reference).max()) or 1.0
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / scale),
        "top1_agreement": float(np.mean(ours.argmax(-1) == reference.argmax(-1))),
    }


def tokenize_text(tokenizer: Any, path: Path) -> np.ndarray:
    """The whole split as one text, no special tokens (ALGORITHMS.md §7)."""
    text = Path(path).read_text(encoding="utf-8")
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def text_windows(
    tokenizer: Any, path: Path, seqlen: int, max_windows: int | None, names: tuple[str, str]
) -> np.ndarray:
    """``path``'s perplexity windows. A text shorter than one window is bad input: one
    ``ConfigError`` naming the text and the setting, ``names`` (text, seqlen) as the user spells
    them (``evaluation.text`` / ``evaluation.seqlen`` in a config, ``--text`` / ``--seqlen``)."""
    text_name, seqlen_name = names
    try:
        tokens = tokenize_text(tokenizer, path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{text_name} '{path}' is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None
    try:
        return split_windows(tokens, seqlen, max_windows)
    except ValueError:
        shorter = f", or set {seqlen_name} to at most {tokens.size}" if tokens.size >= 8 else ""
        raise ConfigError(
            f"{text_name} '{path}' has {tokens.size} tokens, fewer than one window of {seqlen} ({seqlen_name})",
            f"use a longer text{shorter}",
        ) from None


def _prompt_tokens(tokenizer: Any, spec: EvaluationSpec) -> list[int]:
    """The evaluation prompt's ids; at least two (a prefill and one cached step)."""
    prompt = list(tokenizer(spec.prompt, add_special_tokens=False)["input_ids"])
    return prompt * 2 if len(prompt) < 2 else prompt


@dataclass
class TorchReference:
    """Everything the PyTorch side contributes to a verification, computed before any ONNX
    Runtime session exists (``torch_reference``): the build then lets the model's weights go
    (``release_weights``), so the session's copy of the quantized weights never shares the
    process with the float model (a 7B build: ~1 GiB of float embedding and head, a decoder
    block, and the forward's activations), and a build that verifies twice (the accuracy-level
    choice) runs the PyTorch side once."""

    prompt: list[int]
    #: logits of a prefill on all but the last prompt token, then of one cached step on the last
    prefill_logits: np.ndarray
    step_logits: np.ndarray
    #: Hugging Face ``generate``'s greedy tokens (``None``: not compared)
    greedy: list[int] | None = None
    #: perplexity on the evaluation windows and its seconds (``None``: not compared)
    perplexity: tuple[PerplexityResult, float] | None = None
    #: the evaluation text's windows (``None``: no text), tokenized once for every verification
    windows: np.ndarray | None = None


def torch_reference(model: Any, tokenizer: Any, spec: EvaluationSpec, greedy: bool = True) -> TorchReference:
    """``greedy`` False: leave the greedy tokens to ``check_greedy_after`` (a streamed model)."""
    prompt = _prompt_tokens(tokenizer, spec)
    prefix, last = np.asarray([prompt[:-1]]), np.asarray([prompt[-1:]])
    prefill, cache = torch_step(model, prefix, None, 0)
    step, _ = torch_step(model, last, cache, prefix.shape[1])
    reference = TorchReference(prompt, prefill, step)
    if greedy and spec.generate_tokens and spec.compare_pytorch:
        reference.greedy = torch_greedy(model, prompt, spec.generate_tokens)
    if spec.text is not None:
        reference.windows = text_windows(tokenizer, spec.text, spec.seqlen, spec.max_windows, EVALUATION_TEXT)
    if reference.windows is not None and spec.compare_pytorch:
        start = time.perf_counter()
        ref = perplexity(torch_logits_of(model), reference.windows, lambda it: tqdm(it, desc="ppl torch", leave=False))
        reference.perplexity = (ref, time.perf_counter() - start)
    return reference


def check_greedy_after(report: dict[str, Any], model: Any, reference: TorchReference, spec: EvaluationSpec) -> None:
    """Fill ``report["greedy"]``'s comparison with PyTorch from the artifact's own tokens
    (``torch_teacher_forced``: one forward, the verdict ``torch_greedy`` would give). For a
    block-streamed model, where ``generate`` would read every block once per token: 64 reads
    of a 7B model's 25 GiB instead of one."""
    greedy = report.get("greedy")
    if greedy is None or not spec.compare_pytorch:
        return
    ours = greedy["token_ids"]
    chosen = torch_teacher_forced(model, reference.prompt, ours)
    diverged = next((i for i, (a, b) in enumerate(zip(ours, chosen)) if a != b), None)
    greedy.update(
        pytorch_tokens=len(chosen),
        identical_to_pytorch=diverged is None,
        first_divergence=diverged,
        pytorch_reference="teacher-forced: PyTorch's greedy choice after each prefix of these tokens, one forward",
    )


def release_weights(model: torch.nn.Module) -> None:
    """Move every parameter and buffer to the meta device: the memory goes back wherever else the
    model is still referenced. For a model whose last forward has run (``torch_reference``)."""
    model.to("meta")


def logits_parity(reference: TorchReference, decoder: OnnxDecoder) -> dict[str, Any]:
    """The artifact's prefill and cached step against the reference's (``torch_reference``)."""
    prompt = reference.prompt
    prefix, last = np.asarray([prompt[:-1]]), np.asarray([prompt[-1:]])
    ours_prefill, past = decoder.step(prefix, np.ones_like(prefix), decoder.empty_past(1))
    ours_step, _ = decoder.step(last, np.ones((1, len(prompt)), dtype=np.int64), past)
    return {
        "prefill": compare_logits(ours_prefill, reference.prefill_logits),
        "decode_step": compare_logits(ours_step, reference.step_logits),
    }


def verify_artifact(
    artifact_dir: Path,
    reference: TorchReference,
    tokenizer: Any,
    spec: EvaluationSpec,
    providers: tuple[str, ...] = ("cpu",),
    accuracy_level: int = 0,
    weight_format: str | None = None,
) -> dict[str, Any]:
    """The artifact against ``reference`` (``torch_reference`` of the same plan's model)."""
    options = {"accuracy_level": accuracy_level, "weight_format": weight_format}
    session, info = create_session(artifact_dir, providers, **options)
    decoder = decoder_for(session, prefill=prefill_session(artifact_dir, providers, **options))
    prompt = reference.prompt
    report: dict[str, Any] = {"providers": info.as_dict(), "prompt": spec.prompt}
    report["logits_parity"] = logits_parity(reference, decoder)

    if spec.generate_tokens:
        ours = generate(decoder, prompt, spec.generate_tokens)
        theirs = reference.greedy
        same, diverged = None, None
        if theirs is not None:
            pairs = zip(ours.new_tokens, theirs)
            diverged = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            if diverged is None and len(ours.new_tokens) != len(theirs):
                diverged = min(len(ours.new_tokens), len(theirs))
            same = diverged is None
        report["greedy"] = {
            "tokens": len(ours.new_tokens),
            "pytorch_tokens": None if theirs is None else len(theirs),
            "identical_to_pytorch": same,
            "first_divergence": diverged,
            "token_ids": ours.new_tokens,
            "text": tokenizer.decode(ours.new_tokens),
            "prefill_tokens_per_second": ours.prefill_tokens_per_second,
            "decode_tokens_per_second": ours.decode_tokens_per_second,
        }

    if reference.windows is not None:
        windows = reference.windows
        section: dict[str, Any] = {"text": str(spec.text), "tokenizer": getattr(tokenizer, "name_or_path", "")}
        start = time.perf_counter()
        onnx = perplexity(onnx_logits_of(decoder), windows, lambda it: tqdm(it, desc="ppl onnx", leave=False))
        section["onnx"] = {**onnx.as_dict(), "seconds": time.perf_counter() - start}
        if reference.perplexity is not None:
            ref, seconds = reference.perplexity
            section["pytorch"] = {**ref.as_dict(), "seconds": seconds}
            section["relative_difference"] = abs(onnx.perplexity - ref.perplexity) / ref.perplexity
        report["perplexity"] = section
    return report


def verify_ort_format(
    artifact_dir: Path, tokenizer: Any, spec: EvaluationSpec, weight_format: str | None = None
) -> dict[str, Any]:
    """``model.ort`` loads on the CPU EP (and on XNNPACK where this onnxruntime offers it),
    gives ``model.onnx``'s logits (a prefill and a cached step, as ``logits_parity``) and
    generates exactly what ``model.onnx`` generates."""
    prompt, tokens = _prompt_tokens(tokenizer, spec), max(spec.generate_tokens, 1)

    def decoder(name: str, providers: tuple[str, ...]) -> tuple[Any, Any]:
        session, info = create_session(artifact_dir / name, providers, weight_format=weight_format)
        return decoder_for(session), info

    def logits(ours: Any) -> list[np.ndarray]:
        prefix, last = np.asarray([prompt[:-1]]), np.asarray([prompt[-1:]])
        prefill, past = ours.step(prefix, np.ones_like(prefix), ours.empty_past(1))
        step, _ = ours.step(last, np.ones((1, len(prompt)), dtype=np.int64), past)
        return [prefill, step]

    onnx_decoder, _ = decoder("model.onnx", ("cpu",))
    expected = generate(onnx_decoder, prompt, tokens).new_tokens
    expected_logits = logits(onnx_decoder)
    ort_decoder, info = decoder("model.ort", ("cpu",))
    ours = generate(ort_decoder, prompt, tokens).new_tokens
    report: dict[str, Any] = {
        "file": "model.ort",
        "bytes": (artifact_dir / "model.ort").stat().st_size,
        "greedy_tokens": tokens,
        "loads_on": info.used,
        "greedy_identical_to_onnx": ours == expected,
        "logits_vs_onnx": dict(
            zip(("prefill", "decode_step"), map(compare_logits, logits(ort_decoder), expected_logits), strict=True)
        ),
    }
    if PROVIDER_NAMES["xnnpack"] in ort.get_available_providers():
        xnnpack, info = decoder("model.ort", ("xnnpack", "cpu"))
        report["xnnpack"] = {
            "used": info.used,
            "greedy_identical_to_onnx": generate(xnnpack, prompt, tokens).new_tokens == expected,
        }
    else:
        report["xnnpack"] = {"skipped": f"not offered by this onnxruntime ({', '.join(ort.get_available_providers())})"}
    return report
