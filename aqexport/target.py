"""The *where* of a build, resolved once from ``target:``: what every later stage must agree on.

Before this existed the same decisions were re-derived in many places (the mobile profile's
8-bit QDQ storage four times, the accuracy-level default in the weight pass and again in
verification, "is it mobile" at six lines). A ``Target`` is computed once by
``Target.from_spec`` and handed to the stages and passes that need it, so a rule changes in one
place and every consumer sees the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FAST_LEVEL", "SAFE_LEVEL", "Target", "WeightFormat"]

WeightFormat = Literal["matmul_nbits", "qdq", "qdq8"]


#: MatMulNBits accuracy levels (``aqexport.accuracy_level`` measures between them on the cpu profile).
FAST_LEVEL = 4  # int8 activations per block: the CPU EP's fast int4 path
SAFE_LEVEL = 0  # float activations: what the plan was calibrated for


@dataclass(frozen=True)
class Target:
    """``mobile`` is the cpu profile's graph for a phone's CPU EP; ``npu`` the static step graph
    for NNAPI / CoreML / QNN (``static_graph``)."""

    profile: Literal["cpu", "cuda", "mobile", "npu"] = "cpu"
    weight_format: WeightFormat = "matmul_nbits"
    #: The configured MatMulNBits accuracy_level; ``None`` is "auto" (``accuracy_level_for``).
    accuracy_level: int | None = None
    #: Auto on the cpu profile: the largest relative perplexity increase over the fake-quant
    #: model that the fast level may cost (``aqexport.accuracy_level``).
    accuracy_tolerance: float = 0.01
    fuse: bool = True
    #: ``auto`` | ``shared_buffer`` | ``growing``; the static npu graph has its own cache contract.
    kv_cache: str = "auto"
    providers: tuple[str, ...] = ("cpu",)
    formats: tuple[str, ...] = ("onnx",)
    opset: int = 21
    #: mobile: positions the artifact is sized for (genai_config.json, rotary tables); npu: cache
    #: slots; ``None`` on cpu / cuda (the model's own context).
    max_context: int | None = None
    #: npu: the EP the static graph is meant for (``nnapi`` | ``coreml`` | ``qnn``).
    npu: str | None = None
    #: npu: tokens per call of the prefill graph (``aqexport.prefill_graph``); ``None`` elsewhere.
    prefill_tokens: int | None = None

    @classmethod
    def from_spec(cls, spec) -> Target:
        """``spec``: a ``config.TargetSpec``. The npu profile always stores QDQ weights in 8-bit
        tensors (the ORT format has no 4-bit type) and never fuses into contrib ops (NPU EPs run
        portable ops only). The mobile profile runs MatMulNBits at ``FAST_LEVEL`` unless told
        (``mobile_accuracy_level``)."""
        npu = spec.profile == "npu"
        level = spec.accuracy_level
        if level is None and spec.profile == "mobile":
            level = FAST_LEVEL
        return cls(
            profile=spec.profile,
            weight_format="qdq8" if npu else spec.weight_format,
            accuracy_level=level,
            accuracy_tolerance=spec.accuracy_tolerance,
            fuse=spec.fuse and not npu,
            kv_cache="growing" if npu or not spec.fuse else spec.kv_cache,
            providers=tuple(spec.providers),
            formats=tuple(spec.formats),
            opset=spec.opset,
            max_context=spec.max_context,
            npu=spec.npu,
            prefill_tokens=spec.prefill_tokens,
        )

    @property
    def static_graph(self) -> bool:
        """The npu step graph: batch 1, one token per call, a fixed cache."""
        return self.profile == "npu"

    @property
    def dequantized_weights(self) -> bool:
        """The CoreML npu graph stores its weights as the float16 values the QDQ weights
        dequantize to: ONNX Runtime's CoreML EP has no ``DequantizeLinear``, so QDQ weights would
        leave every dequantization on the CPU (SmolLM2: 90.4 % of the step graph's nodes on
        CoreML). Core ML compresses weights itself (``passes/dequantize_constant_weights.py``).
        NNAPI and QNN run QDQ weights as they are."""
        return self.profile == "npu" and self.npu == "coreml"

    @property
    def uint16_activations(self) -> bool:
        """The QNN npu graph quantizes each QDQ linear's input and output to uint16
        (``passes/uint16_activations.py``): without it QNN's NPU leaves every weight's
        ``DequantizeLinear`` on the CPU."""
        return self.profile == "npu" and self.npu == "qnn"

    @property
    def attention_takes_packed_qkv(self) -> bool:
        """``PackedQkvAttentionPass`` on the cuda profile only: there the attention's own unpack
        and rotation replace four kernel launches per layer (SmolLM2 on an H100: 1.85 ms of a
        13.6 ms decode step). On the CPU EP it was slower at long contexts (SmolLM2 GPTQ int4, 2
        threads, decode after 2048 tokens: 42.4 tok/s with it against 45.9 without, medians of 3
        alternating rounds; no gain at 128 / 512), so cpu and mobile keep the separate rotations."""
        return self.profile == "cuda" and self.fuse

    @property
    def writes_ort(self) -> bool:
        return self.profile in ("mobile", "npu") or "ort" in self.formats

    @property
    def writes_operator_config(self) -> bool:
        """``required_operators_and_types.config`` beside a fully optimized ``model.ort``: the
        mobile profile's, for a reduced ONNX Runtime build (``aqexport.mobile``)."""
        return self.profile == "mobile"

    @property
    def writes_genai_config(self) -> bool:
        """onnxruntime-genai has no static-cache contract."""
        return not self.static_graph

    @property
    def session_accuracy_level(self) -> int:
        """What sessions on the artifact set ``session.qdq_matmulnbits_accuracy_level`` to."""
        return self.accuracy_level or 0

    @property
    def measures_accuracy_level(self) -> bool:
        """Auto level on the cpu profile's MatMulNBits: emit the fast level 4 for 2-4-bit weights
        and let verification keep or lower it (``aqexport.accuracy_level``). The CUDA kernels take
        no int8-activation path, so elsewhere auto stays at the float level."""
        return self.accuracy_level is None and self.profile == "cpu" and self.weight_format == "matmul_nbits"

    @property
    def mobile_accuracy_level(self) -> bool:
        """The mobile profile's MatMulNBits run at ``FAST_LEVEL`` unless the config names a level.

        MLAS (ONNX Runtime's CPU kernels) computes a level-4 MatMulNBits by quantizing each block
        of the input to int8 at run time and running integer dot products: on ARM64 that is the
        path with NEON ``SDOT`` / ``SMMLA`` (i8mm) kernels and, on the builds that enable it, Arm's
        KleidiAI micro-kernels for 4-bit weights with int8 activations. Level 0 keeps float
        activations and dequantizes weights to float per tile, which ARM cores run without those
        instructions. The cost is the per-block int8 rounding of activations, which the cpu
        profile measures against the plan's perplexity; the mobile build records it (verify
        stage) instead of falling back, because the fast path is the reason the artifact exists.
        ``target.accuracy_level: 0`` keeps the exact plan."""
        return self.profile == "mobile" and self.accuracy_level == FAST_LEVEL

    def accuracy_level_for(self, bits: int) -> int:
        """MatMulNBits ``accuracy_level`` of a linear with ``bits``-bit weights. Auto: 4 for 8-bit
        weights (ONNX Runtime 1.32's CPU EP has no fast float kernel for them: 50 ms vs 0.24 ms
        for SmolLM2's LM head); for 2-4-bit ones 4 where the build measures it
        (``measures_accuracy_level``) or on the mobile profile, else 0 (float activations, what
        the plan was calibrated for)."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return FAST_LEVEL if bits == 8 or self.measures_accuracy_level or self.profile == "mobile" else SAFE_LEVEL

    def rotary_positions(self, model_positions: int | None) -> int | None:
        """Rows of the fused rotary tables: the model's context, or the mobile profile's
        ``max_context`` where that is shorter (positions past it are never fed)."""
        if self.profile != "mobile" or self.max_context is None:
            return model_positions
        return self.max_context if model_positions is None else min(self.max_context, model_positions)
