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

__all__ = ["Target", "WeightFormat"]

WeightFormat = Literal["matmul_nbits", "qdq", "qdq8"]


@dataclass(frozen=True)
class Target:
    profile: Literal["cpu", "cuda", "mobile"] = "cpu"
    weight_format: WeightFormat = "matmul_nbits"
    #: The configured MatMulNBits accuracy_level; ``None`` is "auto" (``accuracy_level_for``).
    accuracy_level: int | None = None
    #: Auto on the cpu profile: the largest relative perplexity increase over the fake-quant
    #: model that the fast level may cost (``aqexport.accuracy_level``).
    accuracy_tolerance: float = 0.01
    fuse: bool = True
    #: ``auto`` | ``shared_buffer`` | ``growing``; the static mobile graph has its own cache contract.
    kv_cache: str = "auto"
    providers: tuple[str, ...] = ("cpu",)
    formats: tuple[str, ...] = ("onnx",)
    opset: int = 21
    max_context: int = 512

    @classmethod
    def from_spec(cls, spec) -> Target:
        """``spec``: a ``config.TargetSpec``. The mobile profile always stores QDQ weights in 8-bit
        tensors (the ORT format has no 4-bit type) and never fuses into contrib ops (mobile EPs
        run portable ops only)."""
        mobile = spec.profile == "mobile"
        return cls(
            profile=spec.profile,
            weight_format="qdq8" if mobile else spec.weight_format,
            accuracy_level=spec.accuracy_level,
            accuracy_tolerance=spec.accuracy_tolerance,
            fuse=spec.fuse and not mobile,
            kv_cache="growing" if mobile or not spec.fuse else spec.kv_cache,
            providers=tuple(spec.providers),
            formats=tuple(spec.formats),
            opset=spec.opset,
            max_context=spec.max_context,
        )

    @property
    def static_graph(self) -> bool:
        """The mobile step graph: batch 1, one token per call, a fixed cache."""
        return self.profile == "mobile"

    @property
    def writes_ort(self) -> bool:
        return self.static_graph or "ort" in self.formats

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

    def accuracy_level_for(self, bits: int) -> int:
        """MatMulNBits ``accuracy_level`` of a linear with ``bits``-bit weights. Auto: 4 for 8-bit
        weights (ONNX Runtime 1.32's CPU EP has no fast float kernel for them: 50 ms vs 0.24 ms
        for SmolLM2's LM head); for 2-4-bit ones 4 where the build measures it
        (``measures_accuracy_level``), else 0 (float activations, what the plan was calibrated for)."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if bits == 8 or self.measures_accuracy_level else 0
